"""Training throughput per method: samples/s of the trainer's full step, peak memory, each pass timed alone.

    python bench/throughput.py --out FILE.json [--size tiny|sdxl] [--steps N] [--warmup N] [--batch B]

Each method (LCD full, LCD-LoRA, one PAD adversarial stage, DMD2, SIM) is built by the real `Trainer.build` (only its
components and loader hooks swapped for in-memory ones) and stepped by the real `Trainer.train_step` (losses,
backward, clipping, optimizer + LR steps, EMA) on one fixed synthetic batch (no data loading). `--size tiny`: the tiny world's SDXL-architecture UNet (`distill:random-world`), 8x8
latents, batch 32, fp32. `--size sdxl` (CUDA only): the real SDXL UNet (SDXL_UNET, random weights), 128x128
latents, the *_sdxl experiments' settings (bf16 autocast, gradient checkpointing). The passes of the same real
step are timed by the distill.profiling spans inside the methods and the loop (teacher, target, student, d
forwards; backward, clip, optimizer, callbacks): `overhead_pct = step / sum(parts) - 1` is what the step costs
beyond its passes (seeded per-sample draws, loss arithmetic, wrappers, Python). Medians of --steps rounds after
--warmup; each round times one bare step and one under the span timer.
Peak memory: CUDA max_memory_allocated; CPU the process's VmHWM, reset per method through
/proc/self/clear_refs (it includes interpreter and libraries: see mem_at_start_mib). FLOPs per step:
torch.utils.flop_counter (with gradient checkpointing the recomputed forward counts too); MFU: achieved FLOP/s
over the measured FLOP/s of a large matmul in the compute dtype (bf16 for sdxl, else fp32). Writes FILE.json
and FILE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from hydra import compose, initialize_config_dir

from distill.config import register_configs, validate
from distill.diffusion import UNetCond
from distill.methods import METHOD_CLASSES
from distill.methods.base import Batch
from distill.models import Components, load_components
from distill.models.tiny import SDXL_SCHEDULER
from distill.profiling import SpanTimer
from distill.runner import make_accelerator
from distill.stages import stage_config  # noqa: E402
from distill.trainer import Trainer, frozen_dtype

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
Fn = Callable[[], object]

# name -> (experiment at --size tiny, at --size sdxl, stage index). Stage 1 of both PAD stage lists is the
# first adversarial stage (8 steps, conditional D, LoRA, n = 4 teacher moves per student move).
METHODS: dict[str, tuple[str, str, int]] = {
    "lcd_full": ("lcm_tiny", "lcm_sdxl", 0),
    "lcd_lora": ("lcm_lora_tiny", "lcm_lora_sdxl", 0),
    "pad_adversarial": ("lightning_tiny", "lightning_sdxl", 1),
    "dmd2": ("dmd2_tiny", "dmd2_sdxl", 0),  # a step of both phases when the generator is due (see --set)
    "sim": ("sim_tiny", "sim_sdxl", 0),  # generator and fake score, 1:1: every step has both phases
    "d2gan": ("d2gan_tiny", "d2gan_sdxl", 0),  # generator and discriminator every step
}
# what a bench row must not do at build time: write teacher ODE pairs; read a net trained elsewhere (the tiny world's
# latent perceptual net has SDXL's 4 latent channels: the same cost at SDXL size, not a trained SDXL metric)
BUILD: dict[str, list[str]] = {"d2gan": ["method.pairs.prompts=null", "method.perceptual=distill:tiny-latent-lpips"]}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)


# -- measuring ---------------------------------------------------------------------------------------------
def median_times(fns: dict[str, Fn], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median wall seconds of each fn over `steps` rounds, after `warmup` uncounted rounds. The functions take
    turns within a round, so a change in machine load (a shared machine) shifts them all alike and the ratio
    of the step to the sum of its parts stays meaningful."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_kib(field: str) -> int | None:
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return None


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory in use now (MiB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets the high-water mark VmHWM to the RSS
        Path("/proc/self/clear_refs").write_text("5")
    return (_rss_kib("VmRSS") or 0) / 1024


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    if (hwm := _rss_kib("VmHWM")) is not None:
        return hwm / 1024, "cpu VmHWM (process)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu ru_maxrss (process lifetime)"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a large square matmul: the peak that MFU is relative to."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_times({"mm": lambda: a @ b}, device, 5, 2)["mm"]


def _register_cpu_attention_flops() -> None:
    """torch's flop counter knows the CUDA attention kernels, not the CPU flash kernel SDPA runs on CPU."""
    from torch.utils import flop_counter as fc

    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or fwd in fc.flop_registry:
        return
    fc.register_flop_formula(fwd)(lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    fc.register_flop_formula(bwd)(
        lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))


def count_flops(fn: Fn) -> int:
    """FLOPs that fn() runs (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- building ----------------------------------------------------------------------------------------------
def method_config(name: str, size: str, batch: int, overrides: list[str]):
    """The method's experiment config as the runner resolves it for one stage (the stage's start and teacher
    paths cleared: every model is the base model here)."""
    tiny = ["model.pretrained=distill:random-world", "data.resolution=32"] if size == "tiny" else []
    return experiment_config(METHODS[name][0 if size == "tiny" else 1], METHODS[name][2], batch,
                             tiny + BUILD.get(name, []) + list(overrides))


def experiment_config(experiment: str, stage: int, batch: int | None, overrides: list[str]):
    """Stage `stage` of `+experiment=NAME` as the runner resolves it, for a bench: no logger, no validation, no
    accumulation, every model the base model. `batch` None keeps the experiment's own data.batch_size."""
    register_configs()
    ov = [f"+experiment={experiment}", "logger=none", "trainer.validation_prompts=[]",
          "trainer.max_nonfinite_steps=1000000", "trainer.progress_bar=false",
          "trainer.gradient_accumulation_steps=1"]
    ov += [f"data.batch_size={batch}"] if batch is not None else []
    ov += overrides  # last: the caller's overrides win
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=ov))
    plan = METHOD_CLASSES[cfg.method.name].plan(cfg, Path(tempfile.gettempdir()) / "throughput")
    cfg = stage_config(cfg, plan[stage], staged=False, last=True)
    if cfg.method.name == "pad":  # the chosen stage alone: built without a Stage, it starts from the base model
        cfg.method.stages = [cfg.method.stages[stage]]
    return cfg


def sdxl_components(device: torch.device, dtype: torch.dtype, path: str) -> Components:
    """The real SDXL UNet with random weights, built directly on the device. `path` has no vae/config.json,
    so methods assume SDXL's 4-level VAE (1024 px -> 128x128 latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: no transient fp32 copy (10 GB at this size)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET)
    finally:
        torch.set_default_dtype(previous)
    unet.to(dtype=dtype).requires_grad_(False).eval()
    return Components(path=path, arch="sdxl", scheduler_config=dict(SDXL_SCHEDULER), unet=unet,
                      extra={"vae_scaling_factor": 0.13025})


class BenchTrainer(Trainer):
    """The real Trainer, built by its own `build` (method, optimizer specs, checks, Accelerate prepare), on in-memory
    components and without a data loader: the two hooks `build` takes them from are the only overrides."""

    def __init__(self, cfg, accelerator, run_dir: Path, comps: Components):
        self._bench_comps = comps
        super().__init__(cfg, accelerator, run_dir)

    def components(self, parts):
        return self._bench_comps

    def make_loader(self):
        return None


def synthetic_batch(unet_config, batch: int, latent: int, resolution: int, device: torch.device) -> Batch:
    """Random latents and SDXL conditioning of the right shapes (77 tokens, pooled text, time ids)."""
    g, c, r = torch.Generator().manual_seed(0), unet_config, resolution
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = UNetCond(torch.randn(batch, 77, c.cross_attention_dim, generator=g),
                    torch.randn(batch, pooled, generator=g),
                    torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=torch.float32)).to(device)
    latents = torch.randn(batch, c.in_channels, latent, latent, generator=g).to(device)
    noise = torch.randn(batch, c.in_channels, latent, latent, generator=g).to(device)  # a pair's (data.kind=pairs)
    return Batch(latents=latents, cond=cond, captions=["x"] * batch, seeds=list(range(batch)), noise=noise)


# -- the passes of the real step ----------------------------------------------------------------------------
def step_and_parts(tr: Trainer, data: Batch, device: torch.device, steps: int, warmup: int) -> tuple[float, dict]:
    """Median seconds of the real `Trainer.train_step`, and of each of its passes (the distill.profiling spans
    inside the methods and the loop: teacher, target, student, d, backward, clip, optimizer, callbacks), each
    summed over the step. A round times one step bare, then one under the span timer (which syncs the device at
    each span's ends): the overhead `step / sum(parts) - 1` compares the two, both of the real step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bare, parts = [], {}
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        tr.train_step([data])
        sync()
        elapsed = time.perf_counter() - t0  # the bare step alone (not the timed one below)
        timer = SpanTimer(device)
        with timer.installed():
            tr.train_step([data])
        if i >= warmup:
            bare.append(elapsed)
            for k, v in timer.seconds.items():
                parts.setdefault(k, []).append(v)
    return statistics.median(bare), {k: statistics.median(v) for k, v in parts.items()}


# -- one method --------------------------------------------------------------------------------------------
def bench_method(name: str, size: str, batch: int, steps: int, warmup: int, overrides: list[str] = (),
                 peak_flops: float | None = None, latent: int | None = None) -> dict:
    """Build `name` at `size`, time the trainer's full step and each of its passes; one result row."""
    cfg = method_config(name, size, batch, list(overrides))
    acc = make_accelerator(cfg)
    device, dtype = acc.device, frozen_dtype(cfg, acc.device)
    mem0 = reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as tmp:
        comps = (load_components(cfg.model.pretrained, parts=("unet",), dtype=dtype, device=device)
                 if size == "tiny" else sdxl_components(device, dtype, tmp))
        tr = BenchTrainer(cfg, acc, Path(tmp) / "run", comps)
        try:
            # latent side: the caller's (the real batch's, bench/profile_step.py) or the UNet's trained one (8 tiny, 128 SDXL)
            lat = latent or comps.unet.config.sample_size
            data = synthetic_batch(comps.unet.config, batch, lat, cfg.data.resolution, device)
            tr.train_step([data])  # the first step allocates optimizer state: the peak is a whole step's
            peak, mem_kind = peak_memory(device)
            step, parts = step_and_parts(tr, data, device, steps, warmup)
            total = sum(parts.values())
            flops = count_flops(lambda: tr.train_step([data]))
            row = dict(method=name, experiment=METHODS[name][0 if size == "tiny" else 1], batch=batch,
                       latent=lat, dtype=str(dtype).removeprefix("torch."),
                       mixed_precision=cfg.trainer.mixed_precision,
                       gradient_checkpointing=bool(cfg.trainer.gradient_checkpointing),
                       trainable_params=sum(p.numel() for o in tr.optimizers for g in o.param_groups
                                            for p in g["params"]),
                       samples_per_s=batch / step, step_ms=1e3 * step,
                       parts_ms={k: 1e3 * v for k, v in parts.items()}, sum_parts_ms=1e3 * total,
                       overhead_pct=100.0 * (step / total - 1.0), peak_mem_mib=peak, mem_at_start_mib=mem0,
                       mem_kind=mem_kind, gflop_per_step=flops / 1e9, achieved_tflops=flops / step / 1e12,
                       mfu=flops / step / peak_flops if peak_flops else None,
                       nonfinite_steps=tr.counters["nonfinite_steps"])
            if cfg.method.name == "pad":
                row["stage"] = tr.method.stage.name
        finally:
            tr.close()
            acc.free_memory()
    return row


# -- the command -------------------------------------------------------------------------------------------
def load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                device=name, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), load_avg_1m=load_avg())


def markdown(result: dict) -> str:
    """Two tables: one row per method, then each method's passes with their share of the step."""
    m = result["machine"]
    head = (f"Training throughput, `--size {result['size']}`: {m['device']}, torch {m['torch']}, "
            f"{m['torch_threads']} torch thread(s), load average {m['load_avg_1m']} at start -> "
            f"{result.get('load_avg_1m_end')} at end. Median of {result['steps']} after {result['warmup']} "
            "warm-up; one fixed synthetic batch (data loading not measured).\n")
    if "skipped" in result:
        return head + f"\nSkipped: {result['skipped']}\n"
    lines = [head, ("| method | batch | latents | trainable params | samples/s | step ms | sum of parts ms "
                    "| overhead | peak MiB | GFLOP/step | TFLOP/s | MFU |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['latent']}x{r['latent']} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['sum_parts_ms']:.1f} | {r['overhead_pct']:+.1f}% | {r['peak_mem_mib']:.0f} | "
                     f"{r['gflop_per_step']:.2f} | {r['achieved_tflops']:.3f} | {mfu} |")
    kind = result["rows"][0]["mem_kind"] if result["rows"] else "-"
    lines += [(f"\nPeak memory: {kind}. MFU against a measured {result['peak_dtype']} matmul peak of "
               f"{result['peak_tflops']:.2f} TFLOP/s.\n"), "| method | pass | ms | share of step |",
              "|---|---|---:|---:|"]
    for r in result["rows"]:
        for k, v in r["parts_ms"].items():
            lines.append(f"| {r['method']} | {k} | {v:.2f} | {100 * v / r['step_ms']:.1f}% |")
    return "\n".join(lines) + "\n"


def run(size: str = "tiny", methods: list[str] | None = None, batch: int | None = None, steps: int = 10,
        warmup: int = 2, overrides: list[str] = ()) -> dict:
    """Benchmark `methods` (default: all of METHODS) and return the result (JSON-able)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    result = dict(size=size, steps=steps, warmup=warmup, machine=machine(device), rows=[])
    if size == "sdxl" and not cuda:
        result["skipped"] = "--size sdxl needs a CUDA device (the real SDXL UNet); none is present"
        return result
    batch = batch or (32 if size == "tiny" else 4)
    peak_dtype = torch.bfloat16 if size == "sdxl" else torch.float32
    if cuda:  # as the runner does (trainer.allow_tf32): fp32 matmuls run on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak_flops(device, peak_dtype)
    result.update(batch=batch, peak_tflops=peak / 1e12, peak_dtype=str(peak_dtype).removeprefix("torch."))
    for name in methods or list(METHODS):
        print(f"[throughput] {name} ({size}, batch {batch})", flush=True)
        result["rows"].append(bench_method(name, size, batch, steps, warmup, overrides, peak))
    result["load_avg_1m_end"] = load_avg()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="FILE.json (FILE.md is written beside it)")
    ap.add_argument("--size", choices=["tiny", "sdxl"], default="tiny")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 32 tiny, 4 sdxl)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every method, e.g. --set trainer.gradient_checkpointing=false")
    args = ap.parse_args(argv)
    result = run(args.size, args.methods, args.batch, args.steps, args.warmup, args.overrides)
    out, md = Path(args.out), markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
