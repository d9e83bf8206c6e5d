"""One prepared GPU check at the real SDXL size (run by bench/gpu.sh, under 8 minutes on an H200-class device).

    python bench/gpu_check.py --out FILE.json [--results bench/RESULTS.md] [--steps 3] [--warmup 1] [--batch B]
    python bench/gpu_check.py --tiny --out FILE.json      # the same code on a tiny model on CPU (a smoke test)

1. The measured bf16 matmul peak (8192^3), what MFU is relative to.
2. LCD's teacher DDIM step (`guided_ddim_step`) on the real UNet in bf16 with fp32 solver arithmetic (UNet inputs
   cast to bf16, its output back to fp32) and all in bf16 (today's full-LCD path, correctness audit defect 3),
   each against the same step all in fp32: max / mean |x_s - x_s(fp32)| at t = 999, 499, 19.
3. A few timed steps, after warm-up, of LCD-LoRA (`lcm_lora_sdxl`), PAD's first adversarial LoRA stage
   (`lightning_lora_sdxl` s8_cond_lora: a D phase and a G phase per step) and full LCD (`lcm_sdxl`), each with its
   experiment's settings (1024 px = 128x128 latents, bf16, gradient checkpointing, batch size), stepped by the
   real Trainer.train_step (bench/realsize.py): samples/s, peak torch.cuda.max_memory_allocated, MFU.
   A method that fails (out of memory, PAD's checkpointing crash until it is fixed) becomes a row with its error.

Writes FILE.json and FILE.md after each part (a timeout keeps what was measured) and, with --results, appends
the markdown, naming the device, to that file. Without CUDA (and without --tiny) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from realsize import EXPERIMENTS, TINY_MODEL, latent_side, run_steps, stage_config
from throughput import machine, matmul_peak_flops, sdxl_components, synthetic_batch

from distill.diffusion import NoiseSchedule, add_noise, guided_ddim_step, lcm_skip_grid
from distill.models import load_components

ORDER = ["lcd_lora", "pad_adversarial_lora", "lcd_full", "dmd2_lora", "dmd2_full"]  # the heaviest last: a timeout costs the least


class Interrupted(BaseException):
    """SIGTERM (from `timeout`): not an Exception, so no per-part `except Exception` swallows it."""


def _on_term(signum, frame):  # `timeout` sends SIGTERM first: keep what was measured
    raise Interrupted(f"signal {signum}")


# -- bf16 vs fp32 teacher step ------------------------------------------------------------------------------
@torch.no_grad()
def teacher_step_precision(device: torch.device, tiny: bool, batch: int = 2, w: float = 7.5,
                           timesteps: tuple[int, ...] = (999, 499, 19)) -> list[dict]:
    """LCD's teacher step (LCM-form CFG, cond + uncond in one 2B forward, DDIM t -> t - 20) three ways on the same
    inputs: all fp32 (the reference), a bf16 UNet with fp32 solver arithmetic, all bf16."""
    bf16 = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        comps = (load_components(TINY_MODEL, parts=("unet",), dtype=bf16, device=device) if tiny
                 else sdxl_components(device, bf16, tmp))
        unet16 = comps.unet
        unet32 = copy.deepcopy(unet16).float()
        schedule = NoiseSchedule.from_config(comps.scheduler_config)
        res = 64 if tiny else 1024
        data = synthetic_batch(unet16.config, batch, latent_side(comps, res), res, device)
    k = schedule.num_train_timesteps // 50
    assert int(lcm_skip_grid(schedule.num_train_timesteps, 50)[-1]) == 999
    cond, uncond = data.cond, data.cond.zeros_like()
    cond16, uncond16 = cond.to(dtype=bf16), uncond.to(dtype=bf16)
    g = torch.Generator(device="cpu").manual_seed(1)
    eps = torch.randn(data.latents.shape, generator=g).to(device)
    wt = torch.full((batch,), w, device=device)

    def unet_mixed(x, t, **kw):  # bf16 weights and inputs, fp32 out: the solver runs in fp32
        return unet16(x.to(bf16), t, **kw).sample.float()

    rows = []
    for tv in timesteps:
        t = torch.full((batch,), tv, device=device, dtype=torch.long)
        s = (t - k).clamp(min=0)
        x_t = add_noise(data.latents, eps, t, schedule)
        ref = guided_ddim_step(unet32, x_t, t, s, cond, uncond, wt, schedule)[0].float()
        mixed = guided_ddim_step(unet_mixed, x_t, t, s, cond16, uncond16, wt, schedule)[0].float()
        all16 = guided_ddim_step(unet16, x_t.to(bf16), t, s, cond16, uncond16, wt.to(bf16), schedule)[0].float()
        d_mixed, d_all = (mixed - ref).abs(), (all16 - ref).abs()
        rows.append(dict(t=tv, s=int(s[0]), w=w, batch=batch, latent=x_t.shape[-1],
                         step_mean_abs=float((ref - x_t).abs().mean()),
                         mixed_max=float(d_mixed.max()), mixed_mean=float(d_mixed.mean()),
                         all_bf16_max=float(d_all.max()), all_bf16_mean=float(d_all.mean())))
    return rows


# -- report -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"## GPU check (`bench/gpu.sh`, {result['date']}): {m['device']}" + (" [--tiny smoke]" if result["tiny"]
                                                                                  else ""),
             "",
             f"torch {m['torch']}, CUDA {result.get('cuda')}; {result['steps']} timed steps after {result['warmup']} "
             f"warm-up (plus one first step); measured bf16 matmul peak {result.get('peak_tflops', float('nan')):.1f} "
             f"TFLOP/s (MFU is against it); peak memory = torch.cuda.max_memory_allocated per method"
             + (" (CPU: process VmHWM)" if result["tiny"] else "") + f". Wall time {result.get('wall_s', 0):.0f} s"
             + (f"; INTERRUPTED: {result['interrupted']}" if result.get("interrupted") else "") + ".", ""]
    if result.get("precision"):
        lines += ["LCD teacher DDIM step t -> t-20 (LCM-form CFG w = 7.5), |x_s - x_s(all fp32)|:", "",
                  "| t | mean \\|x_s - x_t\\| (the step) | bf16 UNet, fp32 solver: max / mean | all bf16: max / mean |",
                  "|---:|---:|---:|---:|"]
        for r in result["precision"]:
            lines.append(f"| {r['t']} | {r['step_mean_abs']:.2e} | {r['mixed_max']:.2e} / {r['mixed_mean']:.2e} | "
                         f"{r['all_bf16_max']:.2e} / {r['all_bf16_mean']:.2e} |")
        lines.append("")
    elif result.get("precision_error"):
        lines += [f"Teacher-step precision: failed: `{result['precision_error']}`", ""]
    lines += [("| method | experiment (stage) | batch | latents | ckpt | samples/s | step s | peak GiB | states GiB "
               "| GFLOP/step | TFLOP/s | MFU | loss |"), "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {EXPERIMENTS[r['method']][0]} | - | - | - | - | - | - | - | - | - | - | "
                         f"FAILED: `{r['error'][:160]}` |")
            continue
        loss = ", ".join(f"{k.removeprefix('train/')} {v:.3g}" for k, v in r["logs"].items() if "loss" in k)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        exp = r["experiment"] + (f" ({r['stage']})" if r["stage"] else "")
        lines.append(f"| {r['method']} | {exp} | "
                     f"{r['batch']} | {r['latent']}x{r['latent']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['samples_per_s']:.2f} | {r['step_s']:.3f} | {r['peak_mem_gib']:.1f} | {r['states_gib']:.1f} | "
                     f"{r.get('gflop_per_step', 0):.0f} | {r.get('achieved_tflops', 0):.1f} | {mfu} | {loss} |")
    lines.append("\nstates = frozen weights + trained weights + their gradients + optimizer state + EMA (bench/realsize.py"
                 " memory_accounting); peak - states = activations and workspace.\n")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> str:
    md = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(md)
    return md


def run(args) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    result = dict(date=datetime.date.today().isoformat(), tiny=args.tiny, steps=args.steps, warmup=args.warmup,
                  machine=machine(device), cuda=torch.version.cuda, rows=[])
    out = Path(args.out)
    try:
        if cuda:  # as the runner does (trainer.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        peak = matmul_peak_flops(device, torch.bfloat16)
        result["peak_tflops"] = peak / 1e12
        print(f"[gpu_check] bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
        try:
            result["precision"] = teacher_step_precision(device, args.tiny)
            if cuda:
                torch.cuda.empty_cache()  # the fp32 copy (10 GB) is gone with the function's locals
        except Exception as e:  # noqa: BLE001 - a failed part is a result, the other parts still run
            traceback.print_exc()
            result["precision_error"] = f"{type(e).__name__}: {e}"[:400]
        write(result, out)
        for name in args.methods:
            if time.perf_counter() - t0 > args.budget_s:
                result["rows"].append(dict(method=name, error=f"skipped: the {args.budget_s:.0f} s budget was spent"))
                continue
            print(f"[gpu_check] {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            ov = list(args.overrides)
            if args.tiny:  # the same code on a tiny model: bf16 frozen nets as on CUDA; PAD without checkpointing
                ov += ["model.frozen_dtype=bf16"] + (["trainer.gradient_checkpointing=false"] if name.startswith("pad")
                                                     else [])
            try:
                cfg = stage_config(name, args.batch, 64 if args.tiny else None, ov, tiny=args.tiny)
                result["rows"].append(run_steps(name, cfg, args.steps, args.warmup, flops=True, peak_flops=peak,
                                                tiny=args.tiny))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                result["rows"].append(dict(method=name, error=f"{type(e).__name__}: {e}"[:400]))
                if cuda:
                    torch.cuda.empty_cache()
            write(result, out)
    except Interrupted as e:
        result["interrupted"] = str(e)
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="FILE.json (FILE.md is written beside it)")
    ap.add_argument("--results", default=None, help="append the markdown to this file (bench/RESULTS.md)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 64 px, on whatever device is there")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="default: each experiment's data.batch_size")
    ap.add_argument("--methods", nargs="+", choices=list(EXPERIMENTS), default=ORDER)
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no method after this many seconds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print(f"bench/gpu_check.py: no CUDA device (torch {torch.__version__}, torch.version.cuda="
              f"{torch.version.cuda}): nothing measured, exiting 0.")
        return 0
    if args.tiny and args.batch is None:
        args.batch = 2
    signal.signal(signal.SIGTERM, _on_term)
    result = run(args)
    md = write(result, Path(args.out))
    print(md, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
