"""Per-sample seeded noise and the samplers (teacher DDIM / Euler / DPM-Solver++(2M), LCM, SDXL-Lightning).

Each sampler reproduces the corresponding diffusers scheduler loop (same timesteps, same update, same noise
use) and returns the final clean latents (B, C, H, W). `noise` is unit-variance N(0, I) noise; samplers that
work in x/alpha coordinates scale it by the scheduler's init_noise_sigma themselves. The UNet receives
timesteps as a (B,) tensor; `unet` is any callable with the UNet2DConditionModel signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from distill.diffusion.guidance import UNetCond, guided_prediction, unet_output
from distill.diffusion.schedule import NoiseSchedule, inference_timesteps, lcm_inference_timesteps
from distill.diffusion.solvers import (
    DPMSolverPP2M,
    add_noise,
    consistency_scalings,
    euler_sigmas,
    euler_step,
    move,
    to_x0_eps,
)

Generators = torch.Generator | list[torch.Generator] | None


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU torch.Generator per sample, seeded with that sample's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """N(0, I) of `shape` (batch first) drawn like diffusers' `randn_tensor`.

    With a list of generators, sample i comes from generator i alone (drawn on the generator's device, then
    moved); with one generator (or None), one draw for the whole batch.
    """
    shape = tuple(shape)
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def seeded_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise (len(seeds), *shape[1:]) where sample i depends only on seeds[i] (EDM's
    StackedRandomGenerator): grids and metrics do not change with batch size or process count.

    `shape` is the full batch shape (B, C, H, W) with B == len(seeds). Identical to diffusers'
    `randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in seeds], dtype=dtype)`, i.e. to
    what a diffusers pipeline draws when given that generator list.
    """
    if len(shape) < 1 or shape[0] != len(seeds):
        raise ValueError(f"seeded_noise: shape[0] ({tuple(shape)}) must equal len(seeds) ({len(seeds)})")
    return randn(shape, make_generators(seeds), device, dtype)


def _batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(t, device=x.device).reshape(()).expand(x.shape[0])


@torch.no_grad()
def sample_teacher(
    unet: Callable[..., Any],
    noise: Tensor,
    cond: UNetCond,
    uncond: UNetCond | None,
    schedule: NoiseSchedule,
    num_steps: int,
    solver: str = "ddim",
    guidance_scale: float = 5.0,
    spacing: str = "trailing",
    states: list[Tensor] | None = None,
) -> Tensor:
    """Sample a many-step teacher with classifier-free guidance (standard form, one 2B forward per step).

    solver: "ddim" (DDIMScheduler, eta 0), "euler" (EulerDiscreteScheduler) or "dpmpp2m"
    (DPMSolverMultistepScheduler defaults). As in diffusers' pipelines, guidance_scale <= 1 or uncond None
    runs the cond branch alone. DDIM steps from t to t - T // num_steps exactly as DDIMScheduler does; the
    step past 0 lands on abar = 1 when the schedule's set_alpha_to_one is true (DDIM's default) and on abar_0
    otherwise (SDXL's and SD 1.5's configs say false). `states` (DDIM only): a list that receives x at every
    timestep the solve visits, before its step there (the first is the input noise).
    """
    if states is not None and solver != "ddim":
        raise ValueError(f"states are recorded on the DDIM path only, not solver={solver!r}")
    uncond = uncond if guidance_scale > 1 else None
    T = schedule.num_train_timesteps

    def predict(x: Tensor, t: Tensor | float) -> Tensor:
        return guided_prediction(unet, x, _batch_t(t, x), cond, uncond, guidance_scale, "standard")

    if solver == "ddim":
        stride = T // num_steps
        x = noise
        for t in inference_timesteps(num_steps, spacing, T, schedule.steps_offset, "ddim").tolist():
            prev = t - stride
            prev = prev if prev >= 0 else (-1 if schedule.set_alpha_to_one else 0)
            if states is not None:
                states.append(x)
            x = move(x, predict(x, t), _batch_t(t, x), _batch_t(prev, x), schedule)
        return x
    if solver == "euler":
        timesteps = inference_timesteps(num_steps, spacing, T, schedule.steps_offset, "euler")
        return _euler_loop(predict, noise, schedule, timesteps, schedule.prediction_type, spacing)
    if solver == "dpmpp2m":
        dpm = DPMSolverPP2M(
            schedule, inference_timesteps(num_steps, spacing, T, schedule.steps_offset, "dpmpp2m")
        )
        x = noise
        for t in dpm.timesteps.tolist():
            x = dpm.step(predict(x, t), x)
        return x
    raise ValueError(f"solver={solver!r} (ddim, euler, dpmpp2m)")


def _euler_loop(
    predict: Callable[[Tensor, Tensor | float], Tensor],
    noise: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    prediction_type: str,
    spacing: str,
) -> Tensor:
    """EulerDiscreteScheduler's loop: x lives in x/alpha coordinates, starts at noise * init_noise_sigma,
    the model sees x / sqrt(sigma^2 + 1) (= the VP x_t), and the last step lands on sigma = 0 (clean)."""
    sig = euler_sigmas(schedule, timesteps).tolist()
    top = max(sig)
    x = noise * (top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)
    for i, t in enumerate(timesteps.tolist()):
        out = predict(x / (sig[i] ** 2 + 1) ** 0.5, t)
        x = euler_step(x, out, sig[i], sig[i + 1], prediction_type)
    return x


class _StepNoise:
    """The fresh noise LCMScheduler.step draws between steps, made per-sample deterministic.

    seeds (list[int]): generators seeded per sample and first advanced past one draw of the initial-noise
        shape, so the run equals diffusers' LCM pipeline called with
        `generator=[torch.Generator().manual_seed(s) for s in seeds]` and no `latents` (the pipeline draws its
        initial latents, = seeded_noise(seeds, ...), from those generators, then each step's noise).
    list[torch.Generator]: used as given, as the pipeline uses them after drawing its latents.
    torch.Generator: one draw per step for the whole batch (diffusers' single-generator behaviour;
        sample i then depends on the batch size).
    """

    def __init__(self, source: Sequence[int] | Generators, noise: Tensor):
        if isinstance(source, (list, tuple)) and source and not isinstance(source[0], torch.Generator):
            gens = make_generators(source)
            for g in gens:  # skip the stream positions the initial noise used
                torch.randn((1,) + tuple(noise.shape[1:]), generator=g, device=g.device, dtype=noise.dtype)
            source = gens
        self.generator = list(source) if isinstance(source, (list, tuple)) else source

    def __call__(self, like: Tensor) -> Tensor:
        return randn(like.shape, self.generator, like.device, like.dtype)


def tcd_step(x0: Tensor, eps: Tensor, t_next: int, gamma: float, schedule: NoiseSchedule,
             fresh: Callable[[], Tensor]) -> Tensor:
    """TCDScheduler.step(eta=gamma) from a model's raw x0 and eps towards `t_next` (0 after the last step): DDIM to
    s = floor((1 - gamma) t_next), then, for gamma > 0 and t_next > 0, forward noise `fresh()` from s up to t_next."""
    s = int(torch.floor((1 - gamma) * torch.tensor(t_next)))  # float32, as TCDScheduler computes it
    x = add_noise(x0, eps, _batch_t(s, x0), schedule)
    if gamma > 0 and t_next > 0:
        keep = schedule.abar(t_next) / schedule.abar(s)
        x = keep.sqrt().to(x) * x + (1 - keep).sqrt().to(x) * fresh()
    return x


@torch.no_grad()
def sample_lcm(
    unet: Callable[..., Any],
    noise: Tensor,
    cond: UNetCond,
    schedule: NoiseSchedule,
    num_steps: int,
    seeds_or_generator: Sequence[int] | Generators,
    original_inference_steps: int = 50,
    timestep_cond: Tensor | None = None,
    timesteps: Sequence[int] | None = None,
    gamma: float | None = None,
) -> Tensor:
    """Multistep consistency sampling (LCM paper, Algorithm 3) with LCMScheduler semantics: at each t,
    denoised = c_skip(t) x_t + c_out(t) x0_hat; unless last, x_{t'} = add_noise(denoised, fresh noise, t'),
    t' the next LCM timestep. No CFG: guidance reaches an LCM through `timestep_cond` (the w-embedding,
    overriding cond.timestep_cond when given) or is baked in (LCM-LoRA). See `_StepNoise` for the
    noise source.

    timesteps: explicit descending timesteps (num_steps must equal their count), as
    `LCMScheduler.set_timesteps(timesteps=...)` / the pipeline's `timesteps=` argument (points of the skip grid).

    gamma: None samples as LCMScheduler. A value in [0, 1] samples as TCDScheduler.step(eta=gamma) (TCD, arXiv
    2402.19159, "strategic stochastic sampling"), on the same timesteps: each step moves deterministically (DDIM
    with the model's x0 and eps) to s = floor((1 - gamma) t'), then adds fresh noise from s to t'. gamma = 1 is
    LCM's full re-noising (up to abar_0 != 1), gamma = 0 is deterministic; the output is the DDIM point at t = 0
    that TCDScheduler returns as the last prev_sample.
    """
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (TCDScheduler's eta), got {gamma}")
    if timestep_cond is not None:
        cond = replace(cond, timestep_cond=timestep_cond)
    step_noise = _StepNoise(seeds_or_generator, noise)
    if timesteps is None:
        timesteps = lcm_inference_timesteps(num_steps, original_inference_steps, schedule.num_train_timesteps).tolist()
    else:
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps must be a non-empty strictly descending list, got {timesteps}")
        if len(timesteps) != num_steps:
            raise ValueError(f"num_steps={num_steps} but {len(timesteps)} timesteps given: {timesteps}")
    x = noise
    for i, t in enumerate(timesteps):
        tb = _batch_t(t, x)
        x0, eps = to_x0_eps(unet_output(unet(x, tb, **cond.kwargs())), x, tb, schedule)
        if gamma is not None:  # TCDScheduler.step: the raw x0 (no c_skip / c_out) and eps
            last = i == len(timesteps) - 1
            x = tcd_step(x0, eps, 0 if last else int(timesteps[i + 1]), gamma, schedule, lambda: step_noise(x))
            if last:
                return x
            continue
        c_skip, c_out = consistency_scalings(tb, like=x)
        denoised = c_out * x0 + c_skip * x
        if i == len(timesteps) - 1:
            return denoised
        x = add_noise(denoised, step_noise(denoised), _batch_t(timesteps[i + 1], x), schedule)
    raise AssertionError("unreachable")


@torch.no_grad()
def sample_lightning(
    unet: Callable[..., Any],
    noise: Tensor,
    cond: UNetCond,
    schedule: NoiseSchedule,
    num_steps: int,
    prediction_type: str = "epsilon",
) -> Tensor:
    """SDXL-Lightning inference: Euler on trailing timesteps (999, 749, 499, 249 for 4), no CFG, as
    EulerDiscreteScheduler(timestep_spacing="trailing", prediction_type=...) samples. The 1-step model uses
    prediction_type="sample" (arXiv 2402.13929, Sec. 3.7)."""
    timesteps = inference_timesteps(num_steps, "trailing", schedule.num_train_timesteps, 0, "euler")

    def predict(x: Tensor, t: Tensor | float) -> Tensor:
        return unet_output(unet(x, _batch_t(t, x), **cond.kwargs()))

    return _euler_loop(predict, noise, schedule, timesteps, prediction_type, "trailing")
