"""The README's launch command against the best thread setting, paired: does `accelerate launch train.py` use the cores?

    python bench/launch_threads.py --out bench/results/launch_threads.json [--rounds 3] [--steps 60]
                                   [--experiment lcm_lora_tiny]

Each round runs, in alternating order, the same short training run launched two ways:
  readme    `accelerate launch train.py +experiment=NAME ...` (what the README and `make demo` type)
  explicit  `accelerate launch --num_cpu_threads_per_process P train.py ...` (P = the trainer's default: physical cores / local processes)
and reads its speed from metrics.jsonl (`time` at each step; logging every step): samples/s over the steps after the
first 10. Medians over the rounds; the table goes to OUT.json and OUT.md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def run_once(variant: str, experiment: str, steps: int, workdir: Path, threads: int) -> dict:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    run = workdir / f"{variant}_{time.time_ns()}"
    launch = [accelerate, "launch"] + (["--num_cpu_threads_per_process", str(threads)] if variant == "explicit" else [])
    cmd = launch + [str(ROOT / "train.py"), f"+experiment={experiment}", f"output_dir={run}",
                    f"trainer.max_steps={steps}", "trainer.log_every_steps=1", f"trainer.checkpoint_every_steps={steps}",
                    "trainer.validation_prompts=[]", "trainer.export_at_end=false", "trainer.progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a fresh shell has it
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["time"] for r in rows if "time" in r}
    batch = OmegaConf.load(run / "config.yaml").data.batch_size
    first = 10
    secs = (t[steps] - t[first]) / (steps - first)
    said = next((line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                 if "torch threads per process" in line), "")
    shutil.rmtree(run, ignore_errors=True)
    return {"variant": variant, "step_ms": round(1000 * secs, 1), "samples_per_s": round(batch / secs, 3),
            "printed": said.strip(), "load_avg": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", default="lcm_lora_tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    from distill.threads import auto_threads

    threads = auto_threads()  # the figure the trainer's default picks: what the explicit launch should match
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for variant in (("readme", "explicit") if i % 2 == 0 else ("explicit", "readme")):
                r = run_once(variant, args.experiment, args.steps, Path(tmp), threads)
                r["round"] = i + 1
                runs.append(r)
                print(json.dumps(r), flush=True)
    med = {v: statistics.median(r["samples_per_s"] for r in runs if r["variant"] == v) for v in ("readme", "explicit")}
    result = {"experiment": args.experiment, "steps": args.steps, "threads": threads, "runs": runs,
              "median_samples_per_s": med, "readme_vs_explicit": round(med["readme"] / med["explicit"], 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    lines = ["| launch | samples/s per round | median | printed |", "|---|---|---:|---|"]
    for v, label in (("readme", "`accelerate launch train.py ...`"),
                     ("explicit", f"`accelerate launch --num_cpu_threads_per_process {threads} train.py ...`")):
        mine = [r for r in runs if r["variant"] == v]
        lines.append(f"| {label} | {' / '.join(str(r['samples_per_s']) for r in mine)} | {med[v]:.3f} | "
                     f"{mine[0]['printed']} |")
    lines.append(f"\nREADME launch / explicit threads: x{result['readme_vs_explicit']:.3f}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
