"""LCD-LoRA on the real SDXL UNet (2.6B parameters, random weights) on CPU: a few real training steps, their time,
the peak resident memory beside the arithmetic of what the step holds, and the LoRA's module counts.

    python bench/sdxl_cpu.py --out FILE.json [--steps 2] [--resolution 256] [--batch 1] [--flops] [--tiny]

`lcm_lora_sdxl`'s own settings (rank 64 on the LCM-LoRA target list, bf16 autocast, gradient checkpointing) with
the frozen weights in bf16 (`model.frozen_dtype=bf16`; on CPU `auto` would mean fp32), at 256 px (32x32 latents)
from precomputed-style embeddings (random prompt embeds (B, 77, 2048), pooled (B, 1280), time ids), stepped by the
real Trainer.train_step (bench/realsize.py). The first step allocates the optimizer state; `--steps` counts it.
Peak memory: the process's VmHWM from just before the UNet is built (mem_at_start: interpreter and libraries) and
its lifetime ru_maxrss. Checks on the trained model: LoRA layers = modules PEFT's name rule matches on the real UNet,
and the kohya export's keys map one-to-one onto them. Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from realsize import run_steps, stage_config
from throughput import load_avg, machine, matmul_peak_flops

GIB = 2**30


def arithmetic(r: dict) -> dict:
    """The step's memory from the parameter counts alone (bytes per element: bf16 2, fp32 4; Adam: 2 moments)."""
    frozen = 2 * r["unet_params"]
    lora = 4 * r["trained_params"]
    return dict(unet_bf16_gib=frozen / GIB, lora_fp32_gib=lora / GIB, lora_grads_gib=lora / GIB,
                adam_moments_gib=2 * lora / GIB, total_gib=(frozen + 4 * lora) / GIB)


def markdown(result: dict) -> str:
    r, a, m = result["row"], result["arithmetic"], result["machine"]
    k = r.get("kohya", {})
    steps = ", ".join(f"{t:.1f}" for t in r["step_s_all"])
    lines = [(f"{m['device']}, {m['cpu_count']} CPU(s), torch {m['torch']}, {m['torch_threads']} thread(s), load "
             f"average {m['load_avg_1m']} -> {result['load_avg_1m_end']}."), "",
             "| quantity | value |", "|---|---:|",
             f"| UNet parameters (frozen, {r['frozen_dtype']}) | {r['unet_params']:,} |",
             f"| LoRA parameters (fp32, trained) | {r['trained_params']:,} |",
             f"| LoRA layers / PEFT name matches on the real UNet | {r['lora_layers']} / {r.get('lora_target_names')} |",
             (f"| kohya: modules / tensors / one-to-one | {k.get('kohya_modules')} / {k.get('kohya_tensors')} / "
              f"{k.get('one_to_one')} |"),
             f"| batch, resolution, latents | {r['batch']}, {r['resolution']} px, {r['latent']}x{r['latent']} |",
             f"| build (UNet + LoRA + optimizer) s | {r['build_s']:.1f} |",
             f"| step times s (first allocates Adam state) | {steps} |",
             f"| losses finite / LoRA_B tensors changed | {r['losses_finite']} / {r['lora_b_changed']} of {r['lora_b']} |",
             f"| peak RSS GiB (VmHWM; lifetime ru_maxrss) | {r['peak_mem_gib']:.2f}; {result['ru_maxrss_gib']:.2f} |",
             f"| RSS at start (interpreter, libraries) GiB | {r['mem_at_start_gib']:.2f} |",
             f"| arithmetic: UNet bf16 (2 B x params) GiB | {a['unet_bf16_gib']:.2f} |",
             (f"| arithmetic: LoRA fp32 + grads + 2 Adam moments (16 B x params) GiB | "
              f"{a['lora_fp32_gib']:.2f} + {a['lora_grads_gib']:.2f} + {a['adam_moments_gib']:.2f} |"),
             f"| measured states (weights, grads, optimizer.state) GiB | {r['states_gib']:.2f} |",
             f"| peak - start - states (activations, workspace, allocator) GiB | {r['other_gib']:.2f} |"]
    if r.get("gflop_per_step"):
        lines.append(f"| GFLOP/step, TFLOP/s, MFU vs bf16 matmul ({result['peak_tflops']:.2f} TFLOP/s) | "
                     f"{r['gflop_per_step']:.0f}, {r['achieved_tflops']:.3f}, {100 * r['mfu']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="FILE.json (FILE.md is written beside it)")
    ap.add_argument("--steps", type=int, default=2, help="training steps, the first included")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--flops", action="store_true", help="count FLOPs in one more step (MFU)")
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL-architecture UNet (a smoke test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    peak = matmul_peak_flops(device, torch.bfloat16) if args.flops else None
    cfg = stage_config("lcd_lora", args.batch, args.resolution, ["model.frozen_dtype=bf16", *args.overrides],
                       tiny=args.tiny)
    result = dict(machine=machine(device), peak_tflops=peak and peak / 1e12)
    row = run_steps("lcd_lora", cfg, max(args.steps - 1, 0), 0, flops=args.flops, peak_flops=peak, tiny=args.tiny,
                    checks=True)
    result.update(row=row, arithmetic=arithmetic(row), load_avg_1m_end=load_avg(),
                  ru_maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    out, md = Path(args.out), markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
