"""On a tiny real SDXL-architecture UNet, distill's samplers equal diffusers' scheduler loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)

from distill.diffusion import (
    NoiseSchedule,
    UNetCond,
    guided_prediction,
    make_generators,
    sample_lcm,
    sample_lightning,
    sample_teacher,
    seeded_noise,
)

from conftest import SDXL_SCHEDULER_CONFIG as SDXL  # noqa: E402
B, POOLED, TIME_EMB, W_DIM = 2, 32, 8, 16



@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMB,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMB,
        time_cond_proj_dim=W_DIM,
    )
    return model.eval().requires_grad_(False)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    cond = UNetCond(
        torch.randn(B, 7, 32, generator=g),
        torch.randn(B, POOLED, generator=g),
        torch.tensor([[64.0, 48, 0, 0, 64, 64]] * B),
        torch.randn(B, W_DIM, generator=g),
    )
    return seeded_noise([7, 8], (B, 4, 8, 8)), cond


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_guided_prediction_is_one_forward_on_a_real_unet(unet, inputs):
    noise, cond = inputs
    uncond = cond.zeros_like()
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        t = torch.tensor([999, 400])
        with torch.no_grad():
            out = guided_prediction(unet, noise, t, cond, uncond, torch.tensor([2.0, 9.0]), "lcm")
            assert calls == [2 * B]
            e_c, e_u = unet(noise, t, **cond.kwargs()).sample, unet(noise, t, **uncond.kwargs()).sample
    finally:
        handle.remove()
    w = torch.tensor([2.0, 9.0]).view(-1, 1, 1, 1)
    assert _rel(out, e_c + w * (e_c - e_u)) < 1e-4  # batch 2B vs B: float32 rounding, times (w + 1)
    assert (e_c - e_u).abs().max() > 1e-3  # the zeroed prompt really changes the prediction


@pytest.mark.parametrize(
    "solver,cls",
    [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler), ("dpmpp2m", DPMSolverMultistepScheduler)],
)
def test_teacher_sampler_matches_diffusers_loop(unet, inputs, solver, cls):
    noise, cond = inputs
    cond.timestep_cond = None  # a plain teacher
    uncond, scale, n = cond.zeros_like(), 5.0, 4
    sched = cls.from_config(SDXL)  # SDXL's default: leading spacing, steps_offset 1
    sched.set_timesteps(n)
    both = uncond.cat(cond)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():  # the pipeline's loop
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(torch.cat([x, x]), t), t, **both.kwargs()).sample
            e_u, e_c = out.chunk(2)
            x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    ours = sample_teacher(
        unet, noise, cond, uncond, NoiseSchedule.from_config(SDXL), n, solver, scale, "leading"
    )
    assert _rel(ours, x) < 1e-4, _rel(ours, x)


def test_lcm_sampler_matches_lcm_scheduler_loop(unet, inputs):
    noise, cond = inputs
    seeds, n = [7, 8], 4
    gens = make_generators(seeds)
    for g in gens:  # the pipeline drew the initial latents from these generators first
        torch.randn((1, 4, 8, 8), generator=g)
    sched = LCMScheduler.from_config(SDXL)
    sched.set_timesteps(n, original_inference_steps=50)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            x, denoised = sched.step(
                unet(x, t, **cond.kwargs()).sample, t, x, generator=gens, return_dict=False
            )
    w_emb = cond.timestep_cond
    cond.timestep_cond = None  # passed through the sampler's own argument instead
    ours = sample_lcm(unet, noise, cond, NoiseSchedule.from_config(SDXL), n, seeds, timestep_cond=w_emb)
    assert _rel(ours, denoised) < 1e-4, _rel(ours, denoised)


def test_lightning_sampler_matches_trailing_euler_loop(unet, inputs):
    noise, cond = inputs
    cond.timestep_cond = None
    sched = EulerDiscreteScheduler.from_config(SDXL, timestep_spacing="trailing")
    sched.set_timesteps(2)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t, **cond.kwargs()).sample, t, x).prev_sample
    ours = sample_lightning(unet, noise, cond, NoiseSchedule.from_config(SDXL), 2)
    assert _rel(ours, x) < 1e-4, _rel(ours, x)
