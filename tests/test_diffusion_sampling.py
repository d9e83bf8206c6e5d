"""Whole sampling runs against diffusers' scheduler loops with a fixed fake model, and seeded noise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from distill.diffusion import (
    NoiseSchedule,
    UNetCond,
    make_generators,
    sample_lcm,
    sample_lightning,
    sample_teacher,
    seeded_noise,
)
from distill.diffusion.sampling import randn
from distill.diffusion.schedule import lcm_inference_timesteps

from conftest import SDXL_SCHEDULER_CONFIG as SDXL  # noqa: E402
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp2m": DPMSolverMultistepScheduler}



class FakeUNet:
    """A random linear map over channels whose mixing depends on t and whose bias depends on the prompt,
    pooled embedding and timestep_cond: not trivial, yet cheap and exactly reproducible. Counts its calls."""

    def __init__(self, seed: int = 0, channels: int = 4, dim: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(channels, channels, generator=g) / channels
        self.w2 = torch.randn(channels, channels, generator=g) / channels
        self.p = torch.randn(dim, channels, generator=g) * 0.3
        self.calls: list[int] = []

    def __call__(
        self, x, t, encoder_hidden_states, added_cond_kwargs=None, timestep_cond=None, return_dict=True
    ):
        self.calls.append(x.shape[0])
        tt = torch.as_tensor(t, device=x.device).to(x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1) / 1000
        w1, w2, p = self.w1.to(x), self.w2.to(x), self.p.to(x)
        bias = encoder_hidden_states.mean(1) @ p
        if added_cond_kwargs is not None:
            bias = bias + added_cond_kwargs["text_embeds"].mean(-1, keepdim=True) * 0.1
        if timestep_cond is not None:
            bias = bias + timestep_cond.mean(-1, keepdim=True)
        out = (
            torch.einsum("oc,bchw->bohw", w1, x) * torch.cos(3 * tt)
            + torch.einsum("oc,bchw->bohw", w2, x) * tt
            + 0.5 * x
            + bias[:, :, None, None]
        )
        return SimpleNamespace(sample=out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(dtype, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = UNetCond(
        torch.randn(B, 5, 8, generator=g).to(dtype),
        torch.randn(B, 6, generator=g).to(dtype),
        torch.tensor([[32.0, 32, 0, 0, 32, 32]] * B, dtype=dtype),
    )
    return torch.randn(B, 4, 6, 6, generator=g).to(dtype), cond


def _diffusers_teacher(sched, unet, noise, cond, uncond, n, scale):
    """diffusers' pipeline loop: init_noise_sigma, scale_model_input, separate cond/uncond
    forwards, CFG, step."""
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        e_u, e_c = unet(xin, t, **uncond.kwargs()).sample, unet(xin, t, **cond.kwargs()).sample
        x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_teacher_sampling_matches_diffusers_float32(solver, spacing, n):
    _check_teacher_float32(solver, spacing, n)


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp2m"])
def test_teacher_sampling_50_steps_matches_diffusers(solver):
    """The many-step teacher baseline, on SDXL's default (leading, steps_offset 1) grid."""
    _check_teacher_float32(solver, "leading", 50)


def _check_teacher_float32(solver: str, spacing: str, n: int) -> None:
    unet = FakeUNet()
    noise, cond = _inputs(torch.float32)
    uncond = cond.zeros_like()
    sched = SCHEDULERS[solver].from_config(dict(SDXL, timestep_spacing=spacing))
    ref = _diffusers_teacher(sched, unet, noise, cond, uncond, n, 5.0)
    unet.calls.clear()
    ours = sample_teacher(unet, noise, cond, uncond, NoiseSchedule.from_config(SDXL), n, solver, 5.0, spacing)
    assert unet.calls == [2 * noise.shape[0]] * n  # one 2B forward per step
    assert torch.isfinite(ref).all() and _rel(ours, ref) < 1e-5, _rel(ours, ref)


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp2m"])
def test_teacher_sampling_float64(solver):
    """diffusers' DDIM keeps float64 (with float32 abar values): ours is tighter there; Euler and DPM cast the
    sample to float32 inside step(), so float64 parity is bounded by float32 rounding."""
    unet = FakeUNet(1)
    noise, cond = _inputs(torch.float64)
    sched = SCHEDULERS[solver].from_config(dict(SDXL, timestep_spacing="trailing"))
    ref = _diffusers_teacher(sched, unet, noise, cond, cond.zeros_like(), 8, 7.5)
    ours = sample_teacher(
        unet, noise, cond, cond.zeros_like(), NoiseSchedule.from_config(SDXL), 8, solver, 7.5
    )
    assert ours.dtype == torch.float64
    assert _rel(ours, ref) < (1e-6 if solver == "ddim" else 1e-5), _rel(ours, ref)


def test_teacher_guidance_scale_one_runs_cond_only():
    unet = FakeUNet()
    noise, cond = _inputs(torch.float32)
    sample_teacher(unet, noise, cond, cond.zeros_like(), NoiseSchedule.from_config(SDXL), 4, "ddim", 1.0)
    assert unet.calls == [noise.shape[0]] * 4


def _diffusers_lcm(unet, noise, cond, n, generator, dtype, timesteps=None):
    sched = LCMScheduler.from_config(SDXL)
    if timesteps is None:
        sched.set_timesteps(n, original_inference_steps=50)
    else:
        sched.set_timesteps(timesteps=timesteps, original_inference_steps=50)
    x = noise
    for t in sched.timesteps:
        x, denoised = sched.step(
            unet(x, t, **cond.kwargs()).sample, t, x, generator=generator, return_dict=False
        )
    return denoised


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_sampling_matches_lcm_scheduler(dtype, tol, n):
    unet = FakeUNet(2)
    _, cond = _inputs(dtype)
    cond.timestep_cond = torch.randn(3, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    seeds = [11, 12, 13]
    shape = (3, 4, 6, 6)
    # diffusers pipeline with a generator list: latents drawn from the generators, then each step's noise
    gens = make_generators(seeds)
    latents = randn(shape, gens, "cpu", dtype)
    ref = _diffusers_lcm(unet, latents, cond, n, gens, dtype)
    noise = seeded_noise(seeds, shape, "cpu", dtype)
    assert torch.equal(noise, latents)
    ours = sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), n, seeds)
    assert _rel(ours, ref) < tol, _rel(ours, ref)
    # a single generator: diffusers' batch-level draws
    ref1 = _diffusers_lcm(unet, noise, cond, n, torch.Generator().manual_seed(0), dtype)
    ours1 = sample_lcm(
        unet, noise, cond, NoiseSchedule.from_config(SDXL), n, torch.Generator().manual_seed(0)
    )
    assert _rel(ours1, ref1) < tol


def test_lcm_sampling_explicit_timesteps_match_lcm_scheduler():
    """`timesteps=` is LCMScheduler.set_timesteps(timesteps=...): a custom descending list of skip-grid points."""
    unet = FakeUNet(2)
    _, cond = _inputs(torch.float32)
    seeds = [3, 4, 5]
    noise = seeded_noise(seeds, (3, 4, 6, 6))
    ts = [999, 679, 339, 19]
    ref = _diffusers_lcm(unet, noise, cond, None, torch.Generator().manual_seed(0), torch.float32, timesteps=ts)
    ours = sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), 4, torch.Generator().manual_seed(0),
                      timesteps=ts)
    assert _rel(ours, ref) < 1e-5, _rel(ours, ref)
    default = sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), 4, torch.Generator().manual_seed(0))
    assert _rel(ours, default) > 1e-3  # not the default 999, 759, 499, 259
    with pytest.raises(ValueError, match="descending"):
        sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), 2, seeds, timesteps=[19, 999])
    with pytest.raises(ValueError, match="num_steps=2"):
        sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), 2, seeds, timesteps=ts)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_sampling_with_gamma_matches_tcd_scheduler(gamma, n):
    """gamma= is TCDScheduler.step(eta=gamma) on the LCM timesteps; the pipeline decodes the last prev_sample."""
    unet = FakeUNet(2)
    _, cond = _inputs(torch.float32)
    seeds = [11, 12, 13]
    shape = (3, 4, 6, 6)
    gens = make_generators(seeds)
    latents = randn(shape, gens, "cpu", torch.float32)
    sched = TCDScheduler.from_config(dict(SDXL, original_inference_steps=50))
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == lcm_inference_timesteps(n, 50).tolist()
    x = latents
    for t in sched.timesteps:
        x = sched.step(unet(x, t, **cond.kwargs()).sample, t, x, eta=gamma, generator=gens).prev_sample
    ours = sample_lcm(unet, seeded_noise(seeds, shape), cond, NoiseSchedule.from_config(SDXL), n, seeds, gamma=gamma)
    assert _rel(ours, x) < 1e-5, _rel(ours, x)
    if n > 1:  # gamma changes the result (it is not LCM's sampler under another name)
        lcm = sample_lcm(unet, seeded_noise(seeds, shape), cond, NoiseSchedule.from_config(SDXL), n, seeds)
        assert _rel(ours, lcm) > (1e-3 if gamma < 1 else 0)
    with pytest.raises(ValueError, match="gamma"):
        sample_lcm(unet, latents, cond, NoiseSchedule.from_config(SDXL), n, seeds, gamma=1.5)


def test_lcm_sample_does_not_depend_on_batch():
    unet = FakeUNet(3)
    s = NoiseSchedule.from_config(SDXL)
    _, cond = _inputs(torch.float32, B=8)
    seeds = list(range(100, 108))
    batch = sample_lcm(unet, seeded_noise(seeds, (8, 4, 6, 6)), cond, s, 4, seeds)
    one = sample_lcm(unet, seeded_noise(seeds[5:6], (1, 4, 6, 6)), cond.index(5), s, 4, seeds[5:6])
    torch.testing.assert_close(one[0], batch[5], rtol=1e-6, atol=1e-6)
    # the per-step noise is fresh: a 4-step run differs from using the initial noise again
    assert not torch.allclose(batch, sample_lcm(unet, seeded_noise(seeds, (8, 4, 6, 6)), cond, s, 1, seeds))


@pytest.mark.parametrize(
    "kind,n", [("epsilon", 1), ("epsilon", 2), ("epsilon", 4), ("epsilon", 8), ("sample", 1)]
)
def test_lightning_matches_trailing_euler(kind, n):
    unet = FakeUNet(4)
    noise, cond = _inputs(torch.float32)
    sched = EulerDiscreteScheduler.from_config(dict(SDXL, timestep_spacing="trailing", prediction_type=kind))
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t, **cond.kwargs()).sample, t, x).prev_sample
    ours = sample_lightning(unet, noise, cond, NoiseSchedule.from_config(SDXL), n, prediction_type=kind)
    assert _rel(ours, x) < 1e-5, _rel(ours, x)


def test_seeded_noise_is_per_sample():
    seeds = [3, 1, 4, 1, 5, 9, 2, 6]
    batch = seeded_noise(seeds, (8, 4, 5, 5))
    for i, s in enumerate(seeds):
        assert torch.equal(seeded_noise([s], (1, 4, 5, 5))[0], batch[i])
    assert torch.equal(batch[1], batch[3]) and not torch.equal(batch[0], batch[1])  # same seed, same noise
    assert seeded_noise(seeds, (8, 4, 5, 5), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        seeded_noise(seeds, (4, 5, 5))
