"""Time to quality: train an experiment as a user launches it, then score its checkpoints against the teacher.

    python bench/time_to_quality.py --experiment mlcm_tiny --every 100 --out bench/results/ttq_mlcm_tiny.json \
        [--steps 1 2 4] [-n 240] [--run RUN] [-- key=value ...]

1. Trains `accelerate launch train.py +experiment=NAME` (one process, the trainer's own thread default) with a
   checkpoint every `--every` steps, all kept; the wall clock of each checkpoint is its trainer_state.json's write time
   minus the launch time, so it holds everything a user waits for: start-up, data the run writes first (MLCM's
   trajectories), the steps and the checkpoint writes. `--run RUN` skips training and re-scores an earlier run (its
   launch time is read from the `ttq_launch.json` this script wrote there).
2. Exports every checkpoint (a stage chain's: every stage's, in order, on the one clock) and samples it at those of
   `--steps` its card samples, with its card's sampler (the quick bench: N=240 samples, the
   same prompts and per-sample seeds as `bench/quality.py --quick`), beside the teacher's DDIM (trailing, CFG 5) at the
   same step counts.
3. Reports, per step count, the first checkpoint that beats the teacher's DDIM at that step count on BOTH FD and
   attribute accuracy, and its wall minutes on this machine (`minutes_to_beat`; null when none did).

The scoring runs after training, never beside it, so the clock is the training run's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quality import Bench, beats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(experiment: str, run: Path, every: int, overrides: list[str]) -> float:
    """The user's launch command with all checkpoints kept; returns the launch time (epoch seconds)."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train.py"), f"+experiment={experiment}", f"output_dir={run}",
           f"trainer.checkpoint_every_steps={every}", "trainer.checkpoints_keep=0", *overrides]
    launched = time.time()
    (run / "ttq_launch.json").write_text(json.dumps({"launched": launched, "command": cmd}))
    env = {**os.environ, "ACCELERATE_USE_CPU": os.environ.get("ACCELERATE_USE_CPU", "1")}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return launched


def checkpoints(run: Path) -> list[tuple[str, int, Path, Path]]:
    """(stage, step, checkpoint, the folder it belongs to) in training order: a single run's checkpoints/, or every
    stage's stages/NN_name/checkpoints/ of a stage chain (PAD, TSCD, Hyper-SD), stage by stage."""
    folders = sorted((run / "stages").glob("*/")) if (run / "stages").is_dir() else [run]
    found = []
    for folder in folders:
        stage = folder.name if folder != run else ""
        ckpts = [(int(p.name.split("_")[1]), p) for p in (folder / "checkpoints").glob("step_*")
                 if (p / "trainer_state.json").exists()]
        found += [(stage, step, p, folder) for step, p in sorted(ckpts)]
    if not found:
        raise SystemExit(f"{run}: no complete checkpoint under checkpoints/ or stages/*/checkpoints/")
    return found


def first_wins(rows: list[dict], teacher: dict[int, dict]) -> dict[int, dict | None]:
    """Per step count: the earliest student row beating the teacher's DDIM row at that count on FD and accuracy."""
    out = {}
    for k, t in teacher.items():
        wins = [r for r in rows if r["steps"] == k and beats(r, t)]
        out[k] = min(wins, key=lambda r: (r.get("order", 0), r["train_step"])) if wins else None
    return out


def markdown(result: dict) -> str:
    lines = ["| checkpoint | wall min | " + " | ".join(f"{k}-step FD / attr" for k in result["steps"]) + " |",
             "|---|---:|" + "---|" * len(result["steps"])]
    t = {r["steps"]: r for r in result["teacher"]}
    lines.append("| teacher DDIM | - | " + " | ".join(f"{t[k]['fd']:.2f} / {t[k]['attr_acc']:.3f}"
                                                   for k in result["steps"]) + " |")
    by_ckpt: dict[int, dict[int, dict]] = {}
    for r in result["rows"]:
        by_ckpt.setdefault(r["order"], {})[r["steps"]] = r

    def cell(c: dict | None) -> str:
        return "-" if c is None else f"{c['fd']:.2f} / {c['attr_acc']:.3f}" + (" **wins**" if c["beats_teacher"] else "")

    for _, cells in sorted(by_ckpt.items()):
        first = next(iter(cells.values()))
        name = (f"{first['stage']} " if first["stage"] else "") + f"step {first['train_step']}"
        lines.append(f"| {name} | {first['minutes']:.1f} | " + " | ".join(cell(cells.get(k)) for k in result["steps"])
                     + " |")
    lines.append("")
    sampled = {r["steps"] for r in result["rows"]}
    for k, m in result["minutes_to_beat"].items():
        if m is not None:
            where = (f"{result['first_win_stage'][k]} " if result["first_win_stage"][k] else "") + "step "
            verdict = (f"beats the teacher's DDIM-{k} on FD and accuracy at {where}{result['first_win_step'][k]}, "
                       f"{m:.1f} wall minutes after launch")
        elif int(k) in sampled:
            verdict = f"never beats the teacher's DDIM-{k} on both"
        else:
            verdict = f"not sampled (no checkpoint's card samples at {k} steps)"
        lines.append(f"- {k} steps: {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True, help="JSON output; a markdown table is written beside it (.md)")
    p.add_argument("--every", type=int, default=100, help="checkpoint (and score) every this many steps")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="sampler step counts to compare at")
    p.add_argument("-n", type=int, default=240, help="samples per row (the quick bench's 240)")
    p.add_argument("--teacher", default="distill:tiny-world", help="the teacher the run distils (its DDIM rows)")
    p.add_argument("--run", default=None, help="score this earlier run instead of training (its ttq_launch.json)")
    p.add_argument("--run-dir", default=None, help="where to train (default runs/ttq_<experiment>)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for train.py (after --)")
    args = p.parse_args(argv)
    if args.run:
        run = Path(args.run)
        launched = json.loads((run / "ttq_launch.json").read_text())["launched"]
    else:
        run = Path(args.run_dir or ROOT / "runs" / f"ttq_{args.experiment}")
        launched = train(args.experiment, run, args.every, args.overrides)
    bench = Bench(args.teacher, n=args.n, n_ref=1000)
    teacher = {}
    for row, imgs in bench.teacher_rows(sorted(set(args.steps))):
        row.update(bench.metrics(imgs, None))
        teacher[row["steps"]] = row
        print(json.dumps(row), flush=True)
    from distill.export import export_run

    rows, order = [], 0
    for stage, step, ckpt, folder in checkpoints(run):
        order += 1  # a chain's steps restart per stage: rows are ordered by their checkpoint's place in training
        minutes = ((ckpt / "trainer_state.json").stat().st_mtime - launched) / 60
        export_dir = export_run(folder, checkpoint=str(ckpt), dtype="fp32",
                                out=run / "ttq_exports" / (f"{stage}_step_{step}" if stage else f"step_{step}"))
        for row, imgs in bench.student_rows(export_dir, only_steps=list(teacher)):  # the stage's own card steps
            row.update(bench.metrics(imgs, None), stage=stage, train_step=step, order=order,
                       minutes=round(minutes, 2))
            row["beats_teacher"] = beats(row, teacher[row["steps"]])
            rows.append(row)
            print(json.dumps(row), flush=True)
    missing = sorted(set(args.steps) - {r["steps"] for r in rows})
    if missing:
        print(f"no checkpoint's card samples at {missing} steps: those step counts have no rows")
    wins = first_wins(rows, teacher)
    result = {"experiment": args.experiment, "run": str(run), "n": args.n, "steps": sorted(set(args.steps)),
              "teacher": list(teacher.values()), "rows": rows,
              "minutes_to_beat": {k: (w["minutes"] if w else None) for k, w in wins.items()},
              "first_win_step": {k: (w["train_step"] if w else None) for k, w in wins.items()},
              "first_win_stage": {k: (w["stage"] if w else None) for k, w in wins.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
