"""Steps of the real-size SDXL experiments, shared by bench/sdxl_cpu.py (CPU, 256 px) and bench/gpu_check.py
(CUDA, 1024 px): build one experiment's stage on the real SDXL UNet (throughput.SDXL_UNET, random weights, built
in memory in the frozen dtype: no download, no 10 GB folder on disk), step it with the real `Trainer.train_step`
(throughput.BenchTrainer: the method's own `losses`, backward, clipping, optimizer, LR schedule), and account
for its memory: frozen weights, trained weights + gradients + optimizer state, the rest (activations, workspace,
interpreter) measured as peak minus those.

`tiny=True` runs the same functions on the tiny SDXL-architecture UNet (`distill:random-sdxl`) for smoke tests.
Imported as a sibling module (the bench scripts run as `python bench/NAME.py`).
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from pathlib import Path

import torch
from throughput import (
    BenchTrainer,
    count_flops,
    experiment_config,
    peak_memory,
    reset_peak_memory,
    sdxl_components,
    synthetic_batch,
)
from torch import nn

from distill.export_formats import lora_kohya_state_dict, lora_layers
from distill.methods.discriminator import latent_side
from distill.models import load_components
from distill.runner import make_accelerator
from distill.trainer import frozen_dtype

# name -> (experiment, stage index): the *_sdxl experiments' own settings (bf16 autocast, gradient checkpointing,
# LoRA rank / alpha / targets). Stage 1 of lightning_lora_sdxl is its first adversarial stage (s8_cond_lora).
EXPERIMENTS: dict[str, tuple[str, int]] = {
    "lcd_lora": ("lcm_lora_sdxl", 0),
    "lcd_full": ("lcm_sdxl", 0),
    "pad_adversarial_lora": ("lightning_lora_sdxl", 1),
    "dmd2_lora": ("dmd2_lora_sdxl", 0),
    "dmd2_full": ("dmd2_sdxl", 0),
}
TINY_MODEL = "distill:random-sdxl"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_config(name: str, batch: int | None, resolution: int | None, overrides: list[str] = (), tiny: bool = False):
    ov = ([f"model.pretrained={TINY_MODEL}"] if tiny else []) + (
        [f"data.resolution={resolution}"] if resolution else []) + list(overrides)
    experiment, stage = EXPERIMENTS[name]
    return experiment_config(experiment, stage, batch, ov)


# -- counting -------------------------------------------------------------------------------------------------
def peft_target_names(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Module names a PEFT LoraConfig(target_modules=[...]) adapts, by PEFT's rule for a list (peft.tuners.tuners_utils
    check_target_module_exists: the name equals a target or ends with "." + target), on the layer types LoRA
    supports here (Linear, Conv2d)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in target_modules)]


def empty_unet(config) -> nn.Module:
    """The UNet of `config` on the meta device (no memory), before any adapter is injected."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(dict(config))


def kohya_check(model: nn.Module) -> dict:
    """The kohya export's key set against the PEFT LoRA layers: one `lora_unet_<path with _>` per layer, each with
    lora_down / lora_up / alpha, no two layers on one key."""
    layers = lora_layers(model)
    kohya = lora_kohya_state_dict(model)
    keys = {k.split(".", 1)[0] for k in kohya}
    expected = {"lora_unet_" + n.replace(".", "_") for n in layers}
    per_key = {k: sorted(x.split(".", 1)[1] for x in kohya if x.split(".", 1)[0] == k) for k in list(keys)[:3]}
    return dict(kohya_tensors=len(kohya), kohya_modules=len(keys), lora_layers=len(layers),
                one_to_one=keys == expected and len(expected) == len(layers),
                missing=sorted(expected - keys)[:5], extra=sorted(keys - expected)[:5],
                suffixes=sorted({tuple(v) for v in per_key.values()}))


def _unique_params(mods: list[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def memory_accounting(tr) -> dict:
    """Bytes of what the step must hold, from the live objects: frozen weights (teacher, bases), trained weights,
    their gradients (arithmetic: one per trained element, in its dtype; set to None after each step), the optimizer
    state (Adam's two moments, measured from optimizer.state) and the EMA copy."""
    m = tr.method
    mods = [x for x in (getattr(m, "student_raw", None), m.student, getattr(m, "teacher", None),
                        getattr(m, "discriminator", None), *m.modules.values()) if isinstance(x, nn.Module)]
    trained = {id(p) for p in tr.trained_params()}
    params = _unique_params(mods)
    frozen = sum(p.numel() * p.element_size() for p in params if id(p) not in trained)
    trained_b = sum(p.numel() * p.element_size() for p in tr.trained_params())
    opt_state = sum(v.numel() * v.element_size() for o in tr.optimizers for s in o.state.values()
                    for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    ema = sum(p.numel() * p.element_size() for p in m.ema.model.parameters()) if getattr(m, "ema", None) else 0
    gib = 2**30
    return dict(frozen_params=sum(p.numel() for p in params if id(p) not in trained),
                trained_params=sum(p.numel() for p in tr.trained_params()),
                frozen_weights_gib=frozen / gib, trained_weights_gib=trained_b / gib, grads_gib=trained_b / gib,
                optimizer_state_gib=opt_state / gib, ema_gib=ema / gib,
                states_gib=(frozen + 2 * trained_b + opt_state + ema) / gib)


def _fingerprint(params: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    return {n: (float(p.detach().double().sum()), float(p.detach().double().abs().sum())) for n, p in params.items()}


# -- one experiment, stepped ------------------------------------------------------------------------------------
def build(cfg, tmp: str, tiny: bool = False):
    """(accelerator, BenchTrainer, batch) for the stage config `cfg`."""
    acc = make_accelerator(cfg)
    device, dtype = acc.device, frozen_dtype(cfg, acc.device)
    comps = (load_components(cfg.model.pretrained, parts=("unet",), dtype=dtype, device=device) if tiny
             else sdxl_components(device, dtype, tmp))
    tr = BenchTrainer(cfg, acc, Path(tmp) / "run", comps)
    lat = latent_side(comps, cfg.data.resolution)
    data = synthetic_batch(comps.unet.config, cfg.data.batch_size, lat, cfg.data.resolution, device)
    return acc, tr, data


def run_steps(name: str, cfg, steps: int, warmup: int = 0, flops: bool = True, peak_flops: float | None = None,
              tiny: bool = False, checks: bool = False) -> dict:
    """Build `name`'s stage, run one first step (it allocates the optimizer state, so the peak covers a whole
    step), `warmup` more, then `steps` timed ones; one row. `checks`: also the LoRA target count and the kohya key
    set on the trained model (after the peak is read: the export copies the LoRA). `trainable_tensors[_changed]`
    and `lora_b[_changed]` are the student's (PAD's discriminator is not fingerprinted)."""
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mem0 = reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as tmp:
        acc, tr, data = build(cfg, tmp, tiny)
        try:
            build_s = time.perf_counter() - t_start
            named = {n: p for n, p in tr.method.student.named_parameters() if p.requires_grad}
            before = _fingerprint(named)
            times, logs = [], {}
            for _ in range(1 + warmup + steps):
                sync(device)
                t0 = time.perf_counter()
                logs = tr.train_step([data])
                sync(device)
                times.append(time.perf_counter() - t0)
            peak, mem_kind = peak_memory(device)
            after = _fingerprint(named)
            changed = [n for n in named if before[n] != after[n]]
            timed = sorted(times[1 + warmup:]) or times[-1:]
            step = timed[len(timed) // 2]
            st = tr.cfg
            batch = st.data.batch_size
            row = dict(method=name, experiment=EXPERIMENTS[name][0], stage=getattr(tr.method, "stage", None) and
                       tr.method.stage.name, tiny=tiny, batch=batch, resolution=st.data.resolution,
                       latent=data.latents.shape[-1], frozen_dtype=str(next(
                           tr.method.teacher.parameters()).dtype).removeprefix("torch."),
                       mixed_precision=st.trainer.mixed_precision,
                       gradient_checkpointing=bool(st.trainer.gradient_checkpointing),
                       unet_params=sum(p.numel() for n, p in tr.method.teacher.named_parameters() if "lora_" not in n),
                       build_s=build_s, step_s_all=times, first_step_s=times[0], step_s=step,
                       samples_per_s=batch / step, peak_mem_gib=peak / 1024, mem_at_start_gib=mem0 / 1024,
                       mem_kind=mem_kind, logs=logs,
                       losses_finite=all(math.isfinite(v) for k, v in logs.items() if "loss" in k),
                       nonfinite_steps=tr.counters["nonfinite_steps"],
                       trainable_tensors=len(named), trainable_tensors_changed=len(changed),
                       lora_b_changed=sum("lora_B" in n for n in changed), lora_b=sum("lora_B" in n for n in named),
                       **memory_accounting(tr))
            row["other_gib"] = row["peak_mem_gib"] - row["mem_at_start_gib"] - row["states_gib"]
            if flops:
                n_flop = count_flops(lambda: tr.train_step([data]))
                row.update(gflop_per_step=n_flop / 1e9, achieved_tflops=n_flop / step / 1e12,
                           mfu=n_flop / step / peak_flops if peak_flops else None)
            unet = getattr(tr.method, "student_raw", tr.method.student)
            row["lora_layers"] = len(lora_layers(unet))
            if checks and row["lora_layers"]:
                row["lora_target_names"] = len(peft_target_names(empty_unet(unet.config),
                                                                 list(st.method.lora.target_modules)))
                row["kohya"] = kohya_check(unet)
        finally:
            tr.close()
            acc.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
