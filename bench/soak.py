"""Soak: a long tiny LCD-LoRA run killed (SIGKILL) at random points and resumed each time, beside an uninterrupted
run of the same config. Checks after every kill that each complete checkpoint is valid, at the end that the final
weights equal the uninterrupted run's bit for bit, and records the uninterrupted run's resident memory over time.

    python bench/soak.py --steps 2000 --every 100 --kills 12 --out runs/soak      # ~15 min on 2 CPU cores

Every third kill lands while a checkpoint is being written (that run starts through tests/fault_train.py, whose
test double holds each checkpoint half-written for 3 s); the others at a random moment. Writes <out>/soak.json and prints a
markdown summary for bench/RESULTS.md. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _cmd(args, out: Path, resume: bool, slow_checkpoint: float = 0) -> list[str]:
    """train.py, or (slow_checkpoint) tests/fault_train.py with checkpoints held half-written that long."""
    entry = ([str(ROOT / "tests" / "fault_train.py"), "--slow-checkpoint", str(slow_checkpoint), "--"]
             if slow_checkpoint else [str(ROOT / "train.py")])
    cmd = [sys.executable, *entry, f"+experiment={args.experiment}", f"output_dir={out}",
           f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every_steps={args.every}",
           f"trainer.checkpoints_keep={args.keep}", "trainer.export_at_end=false", "trainer.validation_prompts=[]",
           "trainer.progress_bar=false", f"trainer.log_every_steps={max(1, args.every // 10)}",
           f"data.batch_size={args.batch_size}", *args.override]
    if args.shards:
        cmd.append(f"data.shards='{args.shards}'")
    if resume:
        cmd.append("resume=latest")
    return cmd


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f)


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **(extra or {})}


def _tree_rss(proc: psutil.Process) -> int:
    """Proportional resident bytes (PSS: shared pages split between sharers, so forked data-loader workers are not
    counted twice) of a process and its children."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def _last_step(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except ValueError:
            pass  # a line cut by the kill
    return step


def validate_checkpoints(out: Path) -> tuple[int, list[str]]:
    """Every complete checkpoint (step_N, not .tmp-*) must hold its state for step N and finite weights."""
    problems, n = [], 0
    for folder in sorted((out / "checkpoints").glob("step_*")):
        n += 1
        step = int(folder.name.split("_")[1])
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            if state["step"] != step:
                problems.append(f"{folder.name}: trainer_state says step {state['step']}")
            for f in folder.glob("*.safetensors"):
                for k, t in load_file(str(f)).items():
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        problems.append(f"{folder.name}/{f.name}: {k} not finite")
            if not (folder / "optimizer.bin").exists():
                problems.append(f"{folder.name}: no optimizer state")
        except Exception as e:  # noqa: BLE001 - any failure to read is a broken checkpoint
            problems.append(f"{folder.name}: {type(e).__name__}: {e}")
    return n, problems


def uninterrupted(args, out: Path, record: dict) -> None:
    proc = _start(_cmd(args, out, False), _env(), out.parent / "uninterrupted.log")
    ps, t0, rss = psutil.Process(proc.pid), time.time(), []
    while proc.poll() is None:
        try:
            rss.append({"t": round(time.time() - t0, 1), "step": _last_step(out), "rss_mb": _tree_rss(ps) / 2**20})
        except psutil.Error:
            pass
        time.sleep(args.rss_every)
    record["uninterrupted"] = {"returncode": proc.returncode, "wall_s": round(time.time() - t0, 1), "rss": rss}


def killed(args, out: Path, record: dict) -> None:
    rng = random.Random(args.seed)
    kills, starts, problems, t0 = [], 0, [], time.time()
    while True:
        mid_checkpoint = len(kills) < args.kills and len(kills) % 3 == 2
        resume = (out / "checkpoints").exists()
        proc = _start(_cmd(args, out, resume, 3 if mid_checkpoint else 0), _env(), out.parent / f"killed_{starts}.log")
        starts += 1
        if len(kills) >= args.kills:
            proc.wait()
            break
        if mid_checkpoint:
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                if list((out / "checkpoints").glob(".tmp-step_*/model.safetensors")):
                    break
                time.sleep(0.05)
        else:
            deadline = time.time() + rng.uniform(args.min_alive, args.max_alive)
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
        if proc.poll() is not None:  # finished before the kill: nothing more to do
            break
        step = _last_step(out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n, bad = validate_checkpoints(out)
        latest = max((int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")), default=0)
        kills.append({"t": round(time.time() - t0, 1), "about_step": step, "mid_checkpoint": mid_checkpoint,
                      "complete_checkpoints": n, "latest": latest, "problems": bad})
        problems += bad
        print(f"kill {len(kills)}: near step {step}{' (mid-checkpoint)' if mid_checkpoint else ''}, "
              f"{n} complete checkpoints, latest step_{latest}, {len(bad)} problems", flush=True)
    record["killed"] = {"returncode": proc.returncode, "wall_s": round(time.time() - t0, 1), "starts": starts,
                        "kills": kills, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="lcm_lora_tiny")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shards", default=f"{os.environ.get('DISTILL_DATA', ROOT / 'data')}/tiny_world/train/{{00000..00003}}.tar",
                    help="4,000 samples by default, so the run crosses epochs (and resumes across them)")
    ap.add_argument("--min-alive", type=float, default=10.0, help="seconds a run lives at least before a kill")
    ap.add_argument("--max-alive", type=float, default=90.0)
    ap.add_argument("--rss-every", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/soak")
    ap.add_argument("override", nargs="*", help="more Hydra overrides for both runs")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    a, b = args.out / "uninterrupted", args.out / "killed"
    for d in (a, b):
        if d.exists():
            raise SystemExit(f"{d} exists: pick a fresh --out")
    record: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    threads = [threading.Thread(target=uninterrupted, args=(args, a, record)),
               threading.Thread(target=killed, args=(args, b, record))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    failures = []
    for name in ("uninterrupted", "killed"):
        if record[name]["returncode"] != 0:
            failures.append(f"the {name} run exited {record[name]['returncode']} (see {args.out}/{name}*.log)")
    failures += record["killed"]["problems"]
    final = f"checkpoints/step_{args.steps}/model.safetensors"
    if not failures:
        wa, wb = load_file(str(a / final)), load_file(str(b / final))
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        record["final_equal"] = not diff and wa.keys() == wb.keys()
        if not record["final_equal"]:
            failures.append(f"final weights differ in {len(diff)} tensors, e.g. {diff[:3]}")
    _, bad = validate_checkpoints(b)
    failures += bad
    rss = [r["rss_mb"] for r in record["uninterrupted"]["rss"] if r["step"] > 0]
    if rss:
        q = max(1, len(rss) // 10)
        # the second tenth, not the first: allocators and caches settle during the first steps
        record["rss_mb"] = {"second_tenth_mean": sum(rss[q:2 * q]) / q, "last_tenth_mean": sum(rss[-q:]) / q,
                            "max": max(rss), "min": min(rss), "samples": len(rss)}
    record["failures"] = failures
    (args.out / "soak.json").write_text(json.dumps(record, indent=1))

    k = record["killed"]
    print("\n| steps | checkpoint every | kills survived (mid-checkpoint) | starts | final weights equal | "
          "PSS 2nd 10% / last 10% / max (MB) | wall uninterrupted / killed |")
    print("|---|---|---|---|---|---|---|")
    r = record.get("rss_mb", {})
    print(f"| {args.steps} | {args.every} | {len(k['kills'])} ({sum(x['mid_checkpoint'] for x in k['kills'])}) | "
          f"{k['starts']} | {record.get('final_equal')} | {r.get('second_tenth_mean', 0):.0f} / "
          f"{r.get('last_tenth_mean', 0):.0f} / {r.get('max', 0):.0f} | {record['uninterrupted']['wall_s']:.0f} s / "
          f"{k['wall_s']:.0f} s |")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
