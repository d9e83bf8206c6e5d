"""The LoRA target pass fused (`method.lora.fuse_no_grad=true`, the default) against PEFT's own path, inside the
real LCD-LoRA training step, paired in one process.

    python bench/fused_target.py --out FILE.json [--model PATH] [--set data=wds_latents --shards ...] [--rounds 6]
                                 [--steps 10] [--batch 8] [--resolution 64]

bench/profile_step.py's Trainer (the real loader, `to_batch`, `train_step`; default bench/reference.py's tiny SDXL
pipeline and the tiny world's image shards), warmed up, then `--rounds` rounds of `--steps` real steps with the
fused target and `--steps` with PEFT's (the order flipped every round; the switch is the config key itself, read
by the method at every step). Per round: the median `train_step` and the mean of each span (teacher, target,
student, backward, optimizer) without the profiler (distill.profiling.SpanTimer); the table gives the medians over
rounds and the median of the paired ratios. Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=None, help="default: bench/reference.py's tiny SDXL pipeline (built if absent)")
    p.add_argument("--shards", default=str(BENCH.parent / "data" / "tiny_world" / "train" / "{00000..00003}.tar"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="a config override (repeatable)")
    a = p.parse_args(argv)
    import torch
    from omegaconf import open_dict

    if a.model is None:
        from reference import build_model

        a.model = str(build_model(Path("/tmp/distill-bench-reference/tiny-sdxl-2048")))
    ov = [f"model.pretrained={a.model}", f"data.resolution={a.resolution}", f"data.shards='{a.shards}'",
          f"method.lora.rank={a.rank}", *a.set]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = ps.build_trainer("lcd_lora", a.batch, ov, Path(tmp) / "run")
        try:
            it = iter(tr.loader)
            ps.time_real_steps(tr, it, a.warmup)
            for r in range(a.rounds):
                row = {}
                for fused in ((True, False) if r % 2 == 0 else (False, True)):
                    with open_dict(tr.cfg):
                        tr.cfg.method.lora.fuse_no_grad = fused
                    row["fused" if fused else "peft"] = ps.time_real_steps(tr, it, a.steps)
                rounds.append(row)
                print(f"round {r + 1}: train_step fused {row['fused']['train_step_ms']:.1f} ms "
                      f"(target {row['fused']['spans_ms'].get('target', 0):.1f}), PEFT {row['peft']['train_step_ms']:.1f} "
                      f"ms (target {row['peft']['spans_ms'].get('target', 0):.1f})", flush=True)
        finally:
            tr.close()
    med = lambda side, f: statistics.median(f(q[side]) for q in rounds)
    spans = sorted({k for q in rounds for s in q.values() for k in s["spans_ms"]})
    result = {"model": a.model, "overrides": ov, "batch": a.batch, "rounds": a.rounds, "steps": a.steps,
              "threads": torch.get_num_threads(), "per_round": rounds,
              "median_train_step_ms": {s: med(s, lambda x: x["train_step_ms"]) for s in ("fused", "peft")},
              "median_span_ms": {s: {k: med(s, lambda x, k=k: x["spans_ms"].get(k, 0.0)) for k in spans}
                                 for s in ("fused", "peft")},
              "median_ratio_train_step": statistics.median(q["fused"]["train_step_ms"] / q["peft"]["train_step_ms"]
                                                           for q in rounds),
              "median_ratio_target": statistics.median(q["fused"]["spans_ms"]["target"] / q["peft"]["spans_ms"]["target"]
                                                       for q in rounds)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    title = (f"# Fused LoRA target vs PEFT's path in the real LCD-LoRA step ({a.rounds} rounds x {a.steps} steps, "
             f"{result['threads']} threads)")
    lines = [title, "", "| span | fused ms | PEFT ms |", "|---|---:|---:|"]
    for k in [*spans, "train_step"]:
        f = result["median_train_step_ms"]["fused"] if k == "train_step" else result["median_span_ms"]["fused"][k]
        q = result["median_train_step_ms"]["peft"] if k == "train_step" else result["median_span_ms"]["peft"][k]
        lines.append(f"| {k} | {f:.1f} | {q:.1f} |")
    ratios = (f"median paired ratio fused / PEFT: train_step {result['median_ratio_train_step']:.3f}, "
              f"target {result['median_ratio_target']:.3f}")
    lines += ["", ratios]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
