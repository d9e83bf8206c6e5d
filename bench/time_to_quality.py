"""Time to quality: train an experiment, export checkpoints along the way, and report the wall-clock minutes at which
the student first beats the teacher's own DDIM at the same step count on BOTH FD and attribute accuracy.

    python bench/time_to_quality.py --experiment lcm_lora_tiny --max-steps 600 --every 150 --out ttq.json \
        [--steps 1 2 4] [-- key=value ...]

The run goes through `accelerate launch train.py` as users launch it (threads as the trainer chooses them); each
checkpoint is exported with `python -m distill.export --checkpoint step_N`, and one `bench/quality.py --quick` call
scores all of them against the teacher rows (FD and attr_acc, N=240). Minutes are the run's own `time` column of
metrics.jsonl at that step (training wall clock since start, excluding the exports and the bench), so they include
data loading, logging and checkpoint pauses. The load average is recorded beside them: on a shared machine the
minutes are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def train(experiment: str, run: Path, max_steps: int, every: int, overrides: list[str]) -> None:
    acc = str(Path(sys.executable).with_name("accelerate"))
    _run([acc, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "train.py", f"+experiment={experiment}", f"output_dir={run}",
          f"trainer.max_steps={max_steps}", f"trainer.checkpoint_every_steps={every}", "trainer.checkpoints_keep=1000",
          "trainer.export_at_end=false", *overrides])


def minutes_at(run: Path) -> dict[int, float]:
    """Training wall-clock minutes at each logged step (metrics.jsonl `time`)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]): float(r["time"]) / 60.0 for r in rows}


def _teacher(rows: list[dict]) -> dict[int, dict]:
    """The teacher's DDIM rows at the bench's reference guidance (its first scale), by step count."""
    ref = next(r["guidance"] for r in rows if r["model"] == "teacher")
    return {r["steps"]: r for r in rows if r["model"] == "teacher" and r["guidance"] == ref}


def first_win(rows: list[dict], steps: list[int]) -> dict:
    """Per student step count: the earliest checkpoint whose FD is below AND attr_acc at least the teacher's DDIM at
    the same step count."""
    teacher = _teacher(rows)
    out = {}
    for n in steps:
        wins = sorted((r["ckpt_step"], r) for r in rows if r.get("ckpt_step") is not None and r["steps"] == n
                      and r["fd"] < teacher[n]["fd"] and r["attr_acc"] >= teacher[n]["attr_acc"])
        out[n] = wins[0][0] if wins else None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True, help="checkpoint (and evaluate) every this many steps")
    p.add_argument("--run", default=None, help="run folder (default runs/ttq_<experiment>)")
    p.add_argument("--reuse", action="store_true", help="score an existing run folder, do not train")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    a = p.parse_args(argv)
    run = Path(a.run or ROOT / "runs" / f"ttq_{a.experiment}").resolve()
    load_before = os.getloadavg()
    if not a.reuse:
        train(a.experiment, run, a.max_steps, a.every, a.overrides)
    load_after = os.getloadavg()
    exports = []
    for ckpt in sorted((run / "checkpoints").glob("step_*"), key=lambda c: int(c.name[5:])):
        out = run / "ttq" / ckpt.name
        if not (out / "export.json").exists():
            _run([sys.executable, "-m", "distill.export", "--run", str(run), "--checkpoint", ckpt.name, "--out",
                  str(out)])
        exports.append(out)
    qjson = Path(a.out).with_suffix(".quality.json")
    _run([sys.executable, "bench/quality.py", "--quick", "--runs", *map(str, exports), "--out", str(qjson),
          "--grid", str(qjson.with_suffix(".png"))])
    rows = json.loads(qjson.read_text())["rows"]
    minutes = minutes_at(run)
    for r in rows:  # which checkpoint a student row came from
        name = Path(str(r.get("model", ""))).name
        r["ckpt_step"] = int(name[5:]) if name.startswith("step_") else None
        r["minutes"] = minutes.get(r["ckpt_step"]) if r["ckpt_step"] else None
    wins = first_win(rows, a.steps)
    result = {"experiment": a.experiment, "overrides": a.overrides, "run": str(run),
              "first_win_step": wins, "first_win_minutes": {n: minutes.get(s) if s else None for n, s in wins.items()},
              "loadavg_before": load_before, "loadavg_after": load_after, "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(_table(result, a.steps))
    return result


def _table(result: dict, steps: list[int]) -> str:
    rows = result["rows"]
    teacher = _teacher(rows)
    lines = ["| checkpoint | minutes | " + " | ".join(f"FD / acc @{n}" for n in steps) + " |",
             "|---|---:|" + "---|" * len(steps),
             "| teacher DDIM | - | " + " | ".join(f"{teacher[n]['fd']:.2f} / {teacher[n]['attr_acc']:.3f}" for n in steps)
             + " |"]
    by = {}
    for r in rows:
        if r.get("ckpt_step"):
            by.setdefault(r["ckpt_step"], {})[r["steps"]] = r
    for s in sorted(by):
        m = by[s][steps[0]].get("minutes")
        cells = [f"{by[s][n]['fd']:.2f} / {by[s][n]['attr_acc']:.3f}" if n in by[s] else "-" for n in steps]
        lines.append(f"| step {s} | {m:.1f} | " + " | ".join(cells) + " |" if m is not None else
                     f"| step {s} | - | " + " | ".join(cells) + " |")
    lines.append("first win (step): " + ", ".join(f"{n} steps: {result['first_win_step'][n]}" for n in steps))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
