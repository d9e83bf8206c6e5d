"""bench/time_to_quality.py end to end: trains through `accelerate launch train.py` with a checkpoint every step,
scores each checkpoint's export beside the teacher's DDIM at the same step counts, and names the first checkpoint
that beats the teacher on both FD and accuracy. The FDs of a 2-step random model mean nothing; the plumbing and the
verdict logic are what is tested."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import time_to_quality as ttq


def test_first_win_needs_both_metrics_and_takes_the_earliest_checkpoint():
    teacher = {4: {"fd": 2.0, "attr_acc": 0.8}, 2: {"fd": 5.0, "attr_acc": 0.5}}
    rows = [{"steps": 4, "train_step": 100, "fd": 1.9, "attr_acc": 0.7, "minutes": 1.0},   # FD only
            {"steps": 4, "train_step": 300, "fd": 1.5, "attr_acc": 0.9, "minutes": 3.0},
            {"steps": 4, "train_step": 200, "fd": 1.8, "attr_acc": 0.85, "minutes": 2.0},  # first on both
            {"steps": 2, "train_step": 300, "fd": 5.0, "attr_acc": 0.9, "minutes": 3.0}]   # ties on FD: no win
    wins = ttq.first_wins(rows, teacher)
    assert wins[4]["train_step"] == 200 and wins[2] is None


def test_the_report_tells_a_step_count_never_won_from_one_never_sampled():
    teacher = [{"steps": k, "fd": 2.0, "attr_acc": 0.8} for k in (1, 4)]
    rows = [{"steps": 4, "train_step": 60, "order": 1, "stage": "", "minutes": 1.0, "fd": 3.0, "attr_acc": 0.7,
             "beats_teacher": False}]
    table = ttq.markdown({"steps": [1, 4], "teacher": teacher, "rows": rows, "minutes_to_beat": {1: None, 4: None},
                          "first_win_step": {1: None, 4: None}, "first_win_stage": {1: None, 4: None}})
    assert "- 4 steps: never beats the teacher's DDIM-4" in table
    assert "- 1 steps: not sampled" in table and "DDIM-1 on both" not in table


def test_time_to_quality_trains_scores_every_checkpoint_and_reports(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "ttq.json"
    result = ttq.main(["--experiment", "lcm_lora_tiny", "--every", "1", "--steps", "1", "2", "-n", "8",
                       "--teacher", "distill:random-sdxl", "--run-dir", str(run), "--out", str(out),
                       "+debug=fast", "trainer.validation_prompts=[]", "trainer.progress_bar=false"])
    launched = json.loads((run / "ttq_launch.json").read_text())
    assert "+experiment=lcm_lora_tiny" in launched["command"] and "accelerate" in launched["command"][0]
    assert sorted({(r["train_step"], r["steps"]) for r in result["rows"]}) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    minutes = {r["train_step"]: r["minutes"] for r in result["rows"]}
    assert 0 < minutes[1] <= minutes[2]  # wall clock since the launch, checkpoint by checkpoint
    teacher = {t["steps"]: t for t in result["teacher"]}
    assert sorted(teacher) == [1, 2] and all(t["method"].startswith("ddim") for t in teacher.values())
    for r in result["rows"]:
        t = teacher[r["steps"]]
        assert r["beats_teacher"] == (r["fd"] < t["fd"] and r["attr_acc"] > t["attr_acc"])
    for k in (1, 2):  # the report agrees with the rows
        wins = [r for r in result["rows"] if r["steps"] == k and r["beats_teacher"]]
        assert result["first_win_step"][k] == (min(r["train_step"] for r in wins) if wins else None)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert "teacher DDIM" in out.with_suffix(".md").read_text()
    # re-scoring an earlier run reads its launch time instead of training again
    again = ttq.main(["--run", str(run), "--experiment", "lcm_lora_tiny", "--steps", "1", "-n", "8",
                      "--teacher", "distill:random-sdxl", "--out", str(tmp_path / "again.json")])
    assert [r["minutes"] for r in again["rows"]] == [r["minutes"] for r in result["rows"] if r["steps"] == 1]


def test_a_stage_chain_is_scored_stage_by_stage_on_one_clock(tiny_data, tmp_path):
    run = tmp_path / "chain"
    result = ttq.main(["--experiment", "pcm_lora_tiny", "--every", "1", "--steps", "1", "2", "-n", "8",
                       "--teacher", "distill:random-sdxl", "--run-dir", str(run), "--out", str(tmp_path / "c.json"),
                       "+debug=fast", "method.segment_stages=[2,1]", "method.segment_steps=[2]",
                       "trainer.validation_prompts=[]", "data.batch_size=2"])
    stages = sorted(p.name for p in (run / "stages").iterdir())
    assert len(stages) == 2
    ckpts = sorted({(r["order"], r["stage"], r["train_step"]) for r in result["rows"]})
    assert [(s, k) for _, s, k in ckpts] == [(stages[0], 1), (stages[0], 2), (stages[1], 1), (stages[1], 2)]
    minutes = [next(r["minutes"] for r in result["rows"] if r["order"] == o) for o, _, _ in ckpts]
    assert minutes == sorted(minutes) and minutes[0] > 0  # one clock from the launch across the stages
    for k in (1, 2):
        wins = sorted((r["order"], r["stage"]) for r in result["rows"] if r["steps"] == k and r["beats_teacher"])
        assert result["first_win_stage"][k] == (wins[0][1] if wins else None)
    assert stages[1] in (tmp_path / "c.md").read_text()
