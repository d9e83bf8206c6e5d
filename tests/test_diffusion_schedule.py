"""NoiseSchedule and timestep grids against diffusers' schedulers (SDXL config)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from distill.diffusion import (
    NoiseSchedule,
    inference_timesteps,
    lcd_timestep_pair,
    lcm_inference_timesteps,
    lcm_skip_grid,
)

from conftest import SDXL_SCHEDULER_CONFIG as SDXL  # noqa: E402
STEPS = [1, 2, 3, 4, 8, 50]
SPACINGS = ["leading", "trailing", "linspace"]



@pytest.mark.parametrize(
    "cfg",
    [
        SDXL,
        dict(SDXL, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(SDXL, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(SDXL, beta_schedule="squaredcos_cap_v2"),
    ],
)
def test_alphas_cumprod_equal_diffusers_bit_for_bit(cfg):
    ref = DDPMScheduler.from_config(cfg).alphas_cumprod
    s = NoiseSchedule.from_config(cfg)
    assert s.alphas_cumprod.dtype == torch.float64 and s.alphas_cumprod.device.type == "cpu"
    assert torch.equal(s.alphas_cumprod, ref.double())
    assert s.num_train_timesteps == 1000 and s.prediction_type == cfg["prediction_type"]


def test_alpha_sigma_gather_broadcast_and_clean_convention():
    s = NoiseSchedule.from_config(SDXL)
    x = torch.zeros(3, 4, 5, 5, dtype=torch.float16)
    t = torch.tensor([0, 500, -1])
    a, sg = s.alpha(t, x), s.sigma(t, x)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float16
    abar = s.alphas_cumprod
    np.testing.assert_allclose(s.alpha(t, x.double()).flatten(), [abar[0].sqrt(), abar[500].sqrt(), 1.0])
    np.testing.assert_allclose(
        s.sigma(t, x.double()).flatten(), [(1 - abar[0]).sqrt(), (1 - abar[500]).sqrt(), 0.0]
    )
    assert (a.float() ** 2 + sg.float() ** 2 - 1).abs().max() < 2e-3  # fp16 rounding
    assert s.alpha(7, x.double()).shape == ()


def test_from_pretrained_folder_file_and_object(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(SDXL, _class_name="X")))
    ref = NoiseSchedule.from_config(SDXL).alphas_cumprod
    for src in (
        tmp_path,
        tmp_path / "scheduler",
        str(tmp_path / "scheduler" / "scheduler_config.json"),
        EulerDiscreteScheduler.from_config(SDXL),
    ):
        s = NoiseSchedule.from_pretrained(src)
        assert torch.equal(s.alphas_cumprod, ref)
        assert (s.steps_offset, s.set_alpha_to_one, s.timestep_spacing) == (1, False, "leading")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_and_euler_timesteps_match(spacing, offset):
    cfg = dict(SDXL, timestep_spacing=spacing, steps_offset=offset)
    ddim, euler = DDIMScheduler.from_config(cfg), EulerDiscreteScheduler.from_config(cfg)
    for n in STEPS:
        ddim.set_timesteps(n)
        euler.set_timesteps(n)
        ours = inference_timesteps(n, spacing, 1000, offset, solver="ddim")
        assert ours.dtype == torch.long and torch.equal(ours, ddim.timesteps), (spacing, n)
        ours_e = inference_timesteps(n, spacing, 1000, offset, solver="euler")
        assert torch.equal(ours_e.float(), euler.timesteps), (spacing, n)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_timesteps_match(spacing):
    sched = DPMSolverMultistepScheduler.from_config(dict(SDXL, timestep_spacing=spacing))
    for n in STEPS:
        sched.set_timesteps(n)
        assert torch.equal(inference_timesteps(n, spacing, 1000, 1, solver="dpmpp2m"), sched.timesteps), (
            spacing,
            n,
        )


def test_known_grids():
    assert inference_timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert inference_timesteps(4, "leading", steps_offset=1).tolist() == [751, 501, 251, 1]
    with pytest.raises(ValueError):
        inference_timesteps(4, "karras")


def test_lcm_timesteps_and_skip_grid():
    sched = LCMScheduler.from_config(SDXL)
    for n in STEPS:
        sched.set_timesteps(n, original_inference_steps=50)
        assert torch.equal(lcm_inference_timesteps(n, 50), sched.timesteps), n
    assert lcm_inference_timesteps(4).tolist() == [999, 759, 499, 259]
    grid = lcm_skip_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    sched.set_timesteps(50, original_inference_steps=50)
    assert torch.equal(grid.flip(0), sched.timesteps)


def test_lcd_timestep_pair_clamps_at_zero():
    t, s = lcd_timestep_pair(torch.tensor([0, 1, 49]))
    assert t.tolist() == [19, 39, 999] and s.tolist() == [0, 19, 979]
