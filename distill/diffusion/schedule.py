"""The discrete noise schedule of a latent diffusion model and its timestep grids.

Notation (DDPM, arXiv 2006.11239, eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0, ..., T-1}.
`alpha(t)` = sqrt(abar_t) and `sigma(t)` = sqrt(1 - abar_t) (the VP pair); `ve_sigma(t)` = sigma/alpha is the
noise level of the same point in variance-exploding coordinates x / alpha (EDM, arXiv 2206.00364), which is
what diffusers' Euler and DPM-Solver schedulers step in.

Convention: any t < 0 (samplers use -1) means the clean end of the trajectory, abar = 1, so alpha = 1,
sigma = 0 and a DDIM step to t = -1 returns x0 exactly (DDIMScheduler with `set_alpha_to_one=True`).

The timestep grids reproduce diffusers' `set_timesteps` exactly (including its rounding), so a model trained
here samples with the stock schedulers unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Keys a diffusers scheduler config may carry that change the schedule; anything else is ignored.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
}


def _betas(cfg: dict[str, Any]) -> Tensor:
    """betas exactly as diffusers builds them: float32 arithmetic, so alphas_cumprod matches bit for bit."""
    n, b0, b1, kind = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float32)
    if kind == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":  # improved DDPM (arXiv 2102.09672) eq. 17, betas capped at 0.999

        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    raise ValueError(f"beta_schedule={kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0
    while abar_0 is kept."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete VP noise schedule: abar_t for t = 0..T-1 and the model's prediction type.

    Attributes:
        alphas_cumprod: float64 CPU tensor (T,), the values of diffusers' float32 cumprod widened to float64,
            so float64 math downstream starts from the very numbers the teacher was trained with.
        num_train_timesteps: T.
        prediction_type: "epsilon", "v_prediction" or "sample".
        timestep_spacing, steps_offset, set_alpha_to_one: the config's inference defaults
            (samplers read them).
        zero_terminal_snr: whether betas were rescaled to abar_{T-1} = 0.
    """

    def __init__(
        self,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        zero_terminal_snr: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r} (epsilon, v_prediction, sample)")
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        # One extra slot at index T holds abar = 1: negative timesteps are remapped there (clean end).
        self._abar_ext = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
        self._cache: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict (DDPM/DDIM/Euler/DPM/LCM configs all work)."""
        c = {**_DEFAULTS, **{k: v for k, v in dict(cfg).items() if k in _DEFAULTS and v is not None}}
        betas = _betas(c)
        if c["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls(
            abar,
            c["prediction_type"],
            c["timestep_spacing"],
            c["steps_offset"],
            c["set_alpha_to_one"],
            c["rescale_betas_zero_snr"],
        )

    @classmethod
    def from_pretrained(cls, dir_or_scheduler: Any) -> NoiseSchedule:
        """From a diffusers scheduler object, a config dict, a local model folder (with `scheduler/`),
        a scheduler folder, a scheduler_config.json path, or a hub id already in the local cache (this
        never downloads: diffusers' own lookup, under HF_HUB_OFFLINE)."""
        if hasattr(dir_or_scheduler, "config"):
            return cls.from_config(dict(dir_or_scheduler.config))
        if isinstance(dir_or_scheduler, dict):
            return cls.from_config(dir_or_scheduler)
        path = Path(dir_or_scheduler)
        for cand in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                return cls.from_config(json.loads(cand.read_text()))
        from diffusers import DDPMScheduler  # hub id: diffusers' own cache lookup (HF_HUB_OFFLINE respected)

        return cls.from_config(dict(DDPMScheduler.load_config(str(dir_or_scheduler), subfolder="scheduler")))

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._cache:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
            self._cache[device] = self._abar_ext.to(device, dtype)
        return self._cache[device]

    def abar(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """abar_t at integer timesteps t (any t < 0: 1.0), shape of t, float64 (float32 on mps).

        On `device` if given, else on t's device.
        """
        if device is None:
            device = t.device if isinstance(t, Tensor) else torch.device("cpu")
        device = torch.device(device)
        t = torch.as_tensor(t, device=device).long()
        return self._table(device)[torch.where(t < 0, self.num_train_timesteps, t)]

    def alpha(self, t: Tensor | int, like: Tensor) -> Tensor:
        """sqrt(abar_t) in like's dtype/device, shaped (B, 1, ..., 1) to broadcast against like (t of shape
        (B,)).

        A scalar t gives a 0-dim tensor. alpha = 1 at t < 0.
        """
        return _broadcast(self.abar(t, like.device).sqrt(), like)

    def sigma(self, t: Tensor | int, like: Tensor) -> Tensor:
        """sqrt(1 - abar_t), cast and shaped as `alpha`. sigma = 0 at t < 0."""
        return _broadcast((1.0 - self.abar(t, like.device)).sqrt(), like)

    def ve_sigma(self, t: Tensor | int) -> Tensor:
        """sqrt((1 - abar_t) / abar_t), float64 CPU, shape of t: the noise level in x/alpha coordinates.

        With zero terminal SNR, abar_{T-1} is replaced by 2**-24 here (as diffusers' Euler and DPM schedulers
        do) so the level stays finite.
        """
        abar = self.abar(torch.as_tensor(t).cpu())
        if self.zero_terminal_snr:
            abar = abar.clamp_min(2.0**-24)
        return ((1.0 - abar) / abar).sqrt()

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
            f"abar[0]={self.alphas_cumprod[0].item():.6f}, abar[-1]={self.alphas_cumprod[-1].item():.6f})"
        )


def _broadcast(v: Tensor, like: Tensor) -> Tensor:
    """Cast a per-sample (B,) or scalar coefficient to like's dtype and shape it (B, 1, ..., 1)."""
    v = v.to(like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - 1)) if v.ndim == 1 else v


# ----------------------------------------------------------------------------------------------------
# Timestep grids. Each reproduces the numpy expression of the diffusers scheduler it names, rounding included
# (e.g. trailing with 3 steps is 999, 666, 332), so the same model sees the same timesteps either way.


def inference_timesteps(
    num_steps: int,
    spacing: str = "trailing",
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    solver: str = "ddim",
) -> Tensor:
    """The descending timesteps of `set_timesteps(num_steps)` (Lin et al. 2023, arXiv 2305.08891, Table 2).

    solver: "ddim" (DDIMScheduler; also EulerDiscreteScheduler except linspace) or "dpmpp2m"
    (DPMSolverMultistepScheduler, whose linspace/leading grids divide [0, T) into num_steps + 1 intervals and
    drop t = 0), or "euler" (EulerDiscreteScheduler: linspace is NOT rounded, so it returns float timesteps
    there). Returns a LongTensor, except a float64 tensor for solver="euler" with spacing="linspace".
    """
    n, T = int(num_steps), int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"num_steps={n} must be in [1, {T}]")
    if spacing == "trailing":  # identical in all three schedulers: start at T-1, stride T/n
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif solver in ("ddim", "euler") and spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif solver == "ddim" and spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif solver == "euler" and spacing == "linspace":  # float32 in diffusers, interpolated sigma
        return torch.from_numpy(np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64))
    elif solver == "dpmpp2m" and spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    elif solver == "dpmpp2m" and spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    else:
        raise ValueError(
            f"spacing={spacing!r} / solver={solver!r} (spacing: leading|trailing|linspace; "
            "solver: ddim|euler|dpmpp2m)"
        )
    return torch.from_numpy(ts.copy())


def lcm_skip_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """LCD's skipping-step grid t_i = (i + 1) k - 1, k = T // N, i = 0..N-1 (LCM paper, arXiv 2310.04378,
    Sec. 4.3). For T=1000, N=50: 19, 39, ..., 999 (ascending), the grid that
    LCMScheduler(original_inference_steps=N) samples from.
    """
    k = num_train_timesteps // num_ddim_timesteps
    return (torch.arange(num_ddim_timesteps, dtype=torch.long) + 1) * k - 1


def lcd_timestep_pair(
    index: Tensor, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50
) -> tuple[Tensor, Tensor]:
    """(t_{n+k}, t_n) for LCD grid indices: the noisy point t_i and the teacher's target t_i - k, clamped at
    0.

    The clamp makes the target of i = 0 (t = 19) land on t = 0 with abar_0 (not 1), as diffusers' LCD scripts.
    """
    k = num_train_timesteps // num_ddim_timesteps
    t = (index.long() + 1) * k - 1
    return t, (t - k).clamp_min(0)


def lcm_inference_timesteps(
    num_steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000
) -> Tensor:
    """LCMScheduler.set_timesteps(num_steps) (strength 1): num_steps evenly spaced indices into the reversed
    skip grid, e.g. 4 steps of the 50-grid: 999, 759, 499, 259."""
    n, orig = int(num_steps), int(original_inference_steps)
    if not 1 <= n <= orig <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_steps ({n}) <= original_inference_steps ({orig}) <= T")
    grid = lcm_skip_grid(num_train_timesteps, orig).flip(0)
    idx = np.floor(np.linspace(0, orig, num=n, endpoint=False)).astype(np.int64)
    return grid[torch.from_numpy(idx)]
