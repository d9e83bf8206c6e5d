"""bench/quality.py end to end on a 2-step LCD run: the teacher rows at chosen steps and guidance scales, a
consistency student sampled with its card's scheduler, with LCMScheduler and with TCDScheduler, at other CFG scales;
JSON, markdown table and grid written. The FDs of a 2-step random model mean nothing; the plumbing is what is tested."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality


def test_quality_bench_samplers_and_guidance(tiny_data, tmp_path):
    from helpers import train

    run = train(["+experiment=lcm_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "trainer.validation_prompts=[]",
                 "trainer.export_dtype=fp32", "method.w_embedding_dim=32"])
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["scheduler"] == "TCDScheduler" and info["eta"] == 0.0  # lcm_tiny samples deterministically
    out = tmp_path / "q.json"
    result = quality.main(["-n", "8", "--teacher", info["teacher"], "--teacher-steps", "50", "2",
                           "--teacher-guidance", "5", "3", "--runs", str(run), "--student-guidance", "3",
                           "--student-sampler", "card", "lcm", "0.5", "--reward", "distill:tiny-reward",
                           "--out", str(out)])
    rows = result["rows"]
    teacher = [(r["method"], r["steps"]) for r in rows if r["model"] == "teacher"]
    assert teacher == [("ddim-trailing-cfg5", 50), ("ddim-trailing-cfg5", 2), ("ddim-trailing-cfg3", 50),
                       ("ddim-trailing-cfg3", 2)]
    students = [r for r in rows if r["model"] != "teacher"]
    by = {(r["method"], r["steps"]): r for r in students}
    assert {m for m, _ in by} == {"lcd-cfg3-tcd0", "lcd-cfg3-lcm", "lcd-cfg3-tcd0.5"}
    assert all(r["guidance"] == 3.0 for r in students) and {s for _, s in by} == {1, 2, 4, 8}
    # mse_t50 is measured against the FIRST guidance's 50-step teacher: zero for that row only
    assert rows[0]["mse_t50"] == 0 and rows[2]["mse_t50"] > 0
    # one step: the samplers differ only in TCD's final abar_0 re-noise; several steps: they differ
    assert by[("lcd-cfg3-lcm", 1)]["mse_t50"] == pytest.approx(by[("lcd-cfg3-tcd0", 1)]["mse_t50"], rel=0.05)
    assert by[("lcd-cfg3-lcm", 4)]["mse_t50"] != by[("lcd-cfg3-tcd0", 4)]["mse_t50"]
    assert json.loads(out.read_text())["rows"] == rows
    assert "lcd-cfg3-tcd0.5" in out.with_suffix(".md").read_text()
    import math

    assert all(math.isfinite(r["reward"]) for r in rows) and "reward |" in out.with_suffix(".md").read_text()
    assert len({r["reward"] for r in rows}) > 1  # scored per row, not a constant
    grid = Image.open(out.with_suffix(".png"))
    # columns: teacher 50 (once), teacher 2 at each guidance, and 3 samplers x steps 1, 2, 4
    assert grid.width > (1 + 2 + 9) * 32 * 3
    # --student-steps replaces the card's step counts (a 4-step DMD2 student sampled at 1 and 2 of its timesteps)
    few = quality.main(["-n", "8", "--teacher", info["teacher"], "--teacher-steps", "50", "--runs", str(run),
                        "--student-steps", "3", "--out", str(tmp_path / "few.json")])["rows"]
    assert [r["steps"] for r in few if r["model"] != "teacher"] == [3]
    with pytest.raises(SystemExit):
        quality.main(["--teacher-steps", "4", "--out", str(tmp_path / "x.json")])
