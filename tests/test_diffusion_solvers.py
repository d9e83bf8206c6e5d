"""Solver steps: conversions, forward noising, DDIM/move, the LCD teacher solve and consistency scalings."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from distill.diffusion import (
    NoiseSchedule,
    UNetCond,
    add_noise,
    consistency_scalings,
    ddim_step,
    guided_ddim_step,
    lcd_timestep_pair,
    move,
    to_x0_eps,
)

from conftest import SDXL_SCHEDULER_CONFIG as SDXL  # noqa: E402



@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64),
    )
    return x0, eps, torch.tensor([0, 1, 250, 500, 998, 999])


def test_add_noise_matches_diffusers(data):
    x0, eps, t = data
    s = NoiseSchedule.from_config(SDXL)
    ref = DDPMScheduler.from_config(SDXL).add_noise(x0, eps, t)
    torch.testing.assert_close(add_noise(x0, eps, t, s), ref, rtol=1e-7, atol=1e-7)


def test_pure_noise_at_T_only_touches_last_timestep(data):
    x0, eps, t = data
    s = NoiseSchedule.from_config(SDXL)
    out, plain = add_noise(x0, eps, t, s, pure_noise_at_T=True), add_noise(x0, eps, t, s)
    assert torch.equal(out[-1], eps[-1])
    assert torch.equal(out[:-1], plain[:-1]) and not torch.equal(plain[-1], eps[-1])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_recovers_the_truth(data, kind):
    """Build the exact model output of each parameterization from known (x0, eps); the conversion
    must invert it."""
    x0, eps, t = data
    s = NoiseSchedule.from_config(dict(SDXL, prediction_type=kind))
    x_t = add_noise(x0, eps, t, s)
    if kind == "epsilon":
        out = eps
    elif kind == "sample":
        out = x0
    else:  # diffusers' own velocity definition, independent of ours
        out = DDPMScheduler.from_config(SDXL).get_velocity(x0, eps, t)
    x0_hat, eps_hat = to_x0_eps(out, x_t, t, s)  # prediction_type taken from the schedule
    keep = t > 0 if kind == "sample" else slice(None)  # eps from x0 is ill-conditioned at sigma ~ 0.03
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat[keep], eps[keep], rtol=1e-8, atol=1e-8)


def test_ddim_step_and_move(data):
    x0, eps, t = data
    s = NoiseSchedule.from_config(SDXL)
    # to the clean end: exactly x0
    assert torch.equal(ddim_step(x0, eps, torch.full_like(t, -1), s), x0)
    # move with the true eps from t to t' lands on the forward-noised point at t'
    x_t, t_next = add_noise(x0, eps, t, s), (t - 100).clamp_min(0)
    torch.testing.assert_close(move(x_t, eps, t, t_next, s), add_noise(x0, eps, t_next, s))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_move_matches_one_ddim_scheduler_step(kind):
    cfg = dict(SDXL, prediction_type=kind)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(10)  # DDIM steps from t to t - 100
    s = NoiseSchedule.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for t in (901, 501, 1):
        ref = sched.step(out, t, x).prev_sample
        ours = move(x, out, torch.tensor([t, t]), torch.tensor([t - 100] * 2).clamp_min(0), s)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _unet(seed: int):
    """A callable with the UNet signature whose output depends on x, t and the prompt embedding."""
    g = torch.Generator().manual_seed(seed)
    w, p = (
        torch.randn(4, 4, generator=g, dtype=torch.float64) / 2,
        torch.randn(8, 4, generator=g, dtype=torch.float64),
    )

    def unet(x, t, encoder_hidden_states, **_):
        tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1) / 1000
        return (
            torch.einsum("oc,bchw->bohw", w, x) * (1 + tt)
            + (encoder_hidden_states.mean(1) @ p)[:, :, None, None],
        )

    return unet


def test_lcd_teacher_solve_matches_lcm_paper_equations():
    """LCM paper (arXiv 2310.04378) Algorithm 1 / eq. 9 with a DDIM solver, written out by hand: z_n = z_{n+k}
    + (1+w) Psi(z, t_{n+k}, t_n, c) - w Psi(z, t_{n+k}, t_n, 0), Psi(z, t, s, c) = DDIM(z, t, s, c) - z,
    DDIM(z, t, s, c) = a_s (z - s_t e)/a_t + s_s e, e = eps(z, t, c)."""
    s = NoiseSchedule.from_config(SDXL)
    abar = s.alphas_cumprod
    unet = _unet(2)
    g = torch.Generator().manual_seed(3)
    B = 5
    z = torch.randn(B, 4, 3, 3, generator=g, dtype=torch.float64)
    cond = UNetCond(torch.randn(B, 7, 8, generator=g, dtype=torch.float64))
    uncond = cond.zeros_like()
    t, t_prev = lcd_timestep_pair(torch.tensor([0, 3, 17, 30, 49]))
    w = torch.empty(B, dtype=torch.float64).uniform_(3, 15, generator=g)

    def ddim_ref(e):
        at, st = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        a_s, s_s = abar[t_prev].sqrt().view(-1, 1, 1, 1), (1 - abar[t_prev]).sqrt().view(-1, 1, 1, 1)
        return a_s * (z - st * e) / at + s_s * e

    e_c, e_u = unet(z, t, cond.encoder_hidden_states)[0], unet(z, t, uncond.encoder_hidden_states)[0]
    wv = w.view(-1, 1, 1, 1)
    ref = z + (1 + wv) * (ddim_ref(e_c) - z) - wv * (ddim_ref(e_u) - z)
    ours, x0, eps = guided_ddim_step(unet, z, t, t_prev, cond, uncond, w, s, form="lcm")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps, e_c + wv * (e_c - e_u))
    # at i = 0 the target is t = 0 with abar_0 (not the clean end)
    assert t_prev[0] == 0 and not torch.allclose(ours[0], x0[0])


def test_consistency_scalings_match_lcm_scheduler():
    sched = LCMScheduler.from_config(SDXL)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = consistency_scalings(t)
    for i, ti in enumerate(t):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        torch.testing.assert_close(c_skip[i].float(), ref_skip, rtol=1e-6, atol=0)
        torch.testing.assert_close(c_out[i].float(), ref_out, rtol=1e-6, atol=0)
    assert c_skip[0] == 1 and c_out[0] == 0  # boundary condition f(x, 0) = x
    cs, co = consistency_scalings(t, like=torch.zeros(5, 4, 2, 2))
    assert cs.shape == (5, 1, 1, 1) and co.dtype == torch.float32
