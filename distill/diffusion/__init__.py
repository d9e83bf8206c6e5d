"""The shared teacher-ODE module: noise schedule, timestep grids, prediction conversions, forward noising,
DDIM / Euler / DPM-Solver++ steps, classifier-free guidance in one batched forward, consistency scalings and
samplers. Small pure torch functions; parity tests against diffusers' schedulers are their contract."""

from distill.diffusion.denoiser import Denoiser
from distill.diffusion.guidance import (Fp32Io, UNetCond, call_unet, guided_ddim_step, guided_prediction, unet_output,
                                       weight_dtype)
from distill.diffusion.sampling import (
    make_generators,
    randn,
    sample_lcm,
    tcd_step,
    sample_lightning,
    sample_teacher,
    seeded_noise,
)
from distill.diffusion.schedule import (
    NoiseSchedule,
    inference_timesteps,
    lcd_timestep_pair,
    lcm_inference_timesteps,
    lcm_skip_grid,
)
from distill.diffusion.solvers import (
    DPMSolverPP2M,
    add_noise,
    consistency_scalings,
    ddim_step,
    euler_sigmas,
    euler_step,
    move,
    renoise,
    to_x0_eps,
)

__all__ = [
    "Denoiser",
    "DPMSolverPP2M",
    "Fp32Io",
    "NoiseSchedule",
    "UNetCond",
    "add_noise",
    "call_unet",
    "consistency_scalings",
    "ddim_step",
    "euler_sigmas",
    "euler_step",
    "guided_ddim_step",
    "guided_prediction",
    "inference_timesteps",
    "lcd_timestep_pair",
    "lcm_inference_timesteps",
    "lcm_skip_grid",
    "make_generators",
    "move",
    "randn",
    "renoise",
    "weight_dtype",
    "sample_lcm",
    "tcd_step",
    "sample_lightning",
    "sample_teacher",
    "seeded_noise",
    "to_x0_eps",
    "unet_output", "call_unet", "weight_dtype", "Fp32Io",
]
