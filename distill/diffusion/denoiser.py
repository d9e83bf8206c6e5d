"""A UNet seen through a noise schedule: the one object methods call for x0 / eps, DDIM jumps, consistency
functions with a boundary time and the guided (CFG) teacher, instead of writing the conversions at each call site.

    teacher = Denoiser(comps.unet, schedule, net_dtype=torch.bfloat16)      # frozen, half precision
    x_s = teacher.guided_jump(x_t, t, s, cond, cond.zeros_like(), w)        # one 2B forward, LCM-form w
    f = Denoiser(student, schedule).consistency(x_t, t, cond, boundary=b)   # c_skip, c_out around b

The network's inputs are cast to its weight dtype (or `net_dtype`) and its output returned in fp32, so every solver step
stays fp32 (DESIGN.md's precision rule). `scope` is a context held around each forward: a LoRA student seen as its
own teacher passes `lambda: adapters_disabled(unet)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distill.diffusion.guidance import UNetCond, guided_prediction, unet_output, weight_dtype
from distill.diffusion.schedule import NoiseSchedule
from distill.diffusion.solvers import add_noise, consistency_scalings, to_x0_eps


def _bt(t: Tensor | int, like: Tensor) -> Tensor:
    return torch.as_tensor(t, device=like.device).reshape(-1).expand(like.shape[0])


class Denoiser:
    def __init__(self, net: Callable[..., Any], schedule: NoiseSchedule, *, prediction_type: str | None = None,
                 net_dtype: torch.dtype | None = None, scope: Callable[[], contextlib.AbstractContextManager] | None
                 = None):
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.prediction_type
        self.net_dtype = net_dtype
        self.scope = scope or contextlib.nullcontext

    def _dtype(self) -> torch.dtype | None:
        if self.net_dtype is not None:
            return self.net_dtype
        return weight_dtype(self.net) if hasattr(self.net, "parameters") else None

    def output(self, x: Tensor, t: Tensor | int, cond: UNetCond) -> Tensor:
        """The raw network output at (x, t) (its prediction type) in fp32; the inputs go in as the network's
        weight dtype (or net_dtype), as distill.diffusion.call_unet does."""
        dt = self._dtype()
        with self.scope():
            if dt is None:
                return unet_output(self.net(x, _bt(t, x), **cond.kwargs())).float()
            return unet_output(self.net(x.to(dt), _bt(t, x), **cond.to(dtype=dt).kwargs())).float()

    def x0_eps(self, x: Tensor, t: Tensor | int, cond: UNetCond, output: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = self.output(x, t, cond) if output is None else output
        return to_x0_eps(out, x, _bt(t, x), self.schedule, self.prediction_type)

    def jump(self, x: Tensor, t: Tensor | int, s: Tensor | int, cond: UNetCond) -> Tensor:
        """One deterministic DDIM step from t to s with this network's x0 and eps (s < 0: the clean end)."""
        x0, eps = self.x0_eps(x, t, cond)
        return add_noise(x0, eps, _bt(s, x), self.schedule)

    def consistency(self, x: Tensor, t: Tensor | int, cond: UNetCond, boundary: Tensor | int = 0, *,
                    timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Tensor:
        """The boundary-conditioned consistency function f(x, t) = c_skip x + c_out F(x, t), F the DDIM jump from
        t to `boundary`, with LCM's scalings of (t - boundary): f(x, boundary) = x. Boundary 0 is LCM's (F = x0,
        the jump to the clean end); a segment's lower edge is a phased (PCM) consistency function."""
        t, b = _bt(t, x), _bt(boundary, x)
        x0, eps = self.x0_eps(x, t, cond)
        target = torch.where((b <= 0).view((-1,) + (1,) * (x.ndim - 1)), x0,
                             add_noise(x0, eps, b.clamp(min=0), self.schedule))
        c_skip, c_out = consistency_scalings(t - b, timestep_scaling, sigma_data)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.to(x).view(shape) * x + c_out.to(x).view(shape) * target

    def guided(self, x: Tensor, t: Tensor | int, cond: UNetCond, uncond: UNetCond | None, scale: float | Tensor,
               form: str = "lcm") -> Tensor:
        """Classifier-free guided output, cond and uncond in ONE 2B forward (distill.diffusion.guidance)."""
        with self.scope():
            return guided_prediction(self.net, x, _bt(t, x), cond, uncond, scale, form, net_dtype=self._dtype())

    def guided_jump(self, x: Tensor, t: Tensor | int, s: Tensor | int, cond: UNetCond, uncond: UNetCond | None,
                    scale: float | Tensor, form: str = "lcm") -> Tensor:
        """The guided teacher's DDIM step from t to s (fp32 state around a half-precision network)."""
        out = self.guided(x, t, cond, uncond, scale, form)
        x0, eps = to_x0_eps(out, x, _bt(t, x), self.schedule, self.prediction_type)
        return add_noise(x0, eps, _bt(s, x), self.schedule)
