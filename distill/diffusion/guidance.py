"""UNet conditioning and classifier-free guidance with cond and uncond in ONE batched forward.

Two forms of the same guidance (arXiv 2207.12598 eq. 6; LCM paper arXiv 2310.04378 eq. 9):
  standard (diffusers pipelines, Imagen): pred = uncond + s (cond - uncond)
  lcm:                                    pred = cond + w (cond - uncond)  ==  standard with s = w + 1
Because x0_hat and eps_hat are affine in the model output with the same x_t coefficients, guiding the
output and then converting equals guiding x0 and eps separately (what diffusers' LCD scripts do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from distill.diffusion.schedule import NoiseSchedule
from distill.diffusion.solvers import ddim_step, to_x0_eps


@dataclass
class UNetCond:
    """Everything a UNet2DConditionModel takes besides (x, t), batched on dim 0.

    encoder_hidden_states: (B, L, D) prompt embeddings. text_embeds: (B, P) SDXL pooled text embedding (None
    for SD 1.5). time_ids: (B, 6) SDXL micro-conditioning [orig_h, orig_w, crop_top, crop_left, target_h,
    target_w]. timestep_cond: (B, Dw) the LCM guidance (w) embedding fed to `time_embedding.cond_proj`.
    """

    encoder_hidden_states: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None
    timestep_cond: Tensor | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `unet(x, t, **cond.kwargs())`."""
        out: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            out["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        if self.timestep_cond is not None:
            out["timestep_cond"] = self.timestep_cond
        return out

    def _map(self, fn: Callable[[Tensor], Tensor]) -> UNetCond:
        return UNetCond(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def zeros_like(self) -> UNetCond:
        """The unconditional branch: all-zero prompt and pooled embeddings with the SAME time_ids and
        timestep_cond (SDXL's force_zeros_for_empty_prompt; the LCD scripts' uncond)."""
        return replace(
            self,
            encoder_hidden_states=torch.zeros_like(self.encoder_hidden_states),
            text_embeds=None if self.text_embeds is None else torch.zeros_like(self.text_embeds),
        )

    def cat(self, other: UNetCond) -> UNetCond:
        """Batch concatenation [self, other]; both must set the same optional fields."""

        def pair(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if (a is None) != (b is None):
                raise ValueError("UNetCond.cat: the two conditions set different optional fields")
            return None if a is None else torch.cat([a, b])

        return UNetCond(**{f.name: pair(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def repeat(self, n: int) -> UNetCond:
        """Each sample repeated n times in place (repeat_interleave): [c0, c0, ..., c1, c1, ...]."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def index(self, idx: Tensor | slice | int | list[int]) -> UNetCond:
        """Select samples along the batch dim (an int keeps the batch dim)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda v: v[idx])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UNetCond:
        """Move every tensor; `dtype` applies to the floating embeddings. SDXL's `time_ids` stay fp32: they are
        pixel sizes (1365 would round to 1368 in bf16), and the UNet embeds them sinusoidally in fp32 anyway."""
        def move(name: str, v: Tensor) -> Tensor:
            keep = name == "time_ids" or not v.is_floating_point()
            return v.to(device=device, dtype=None if keep else dtype)

        return UNetCond(**{f.name: None if getattr(self, f.name) is None else move(f.name, getattr(self, f.name))
                           for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]


def unet_output(out: Any) -> Tensor:
    """The prediction tensor of a diffusers UNet call: `.sample`, or element 0 of a tuple, or the tensor."""
    if isinstance(out, Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def weight_dtype(module: Any) -> torch.dtype:
    """The dtype of a network's (first floating) weights: what its inputs must be in when nothing autocasts it
    (a half-precision frozen net, or a DeepSpeed bf16 engine, which Accelerate does not autocast)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def call_unet(unet: Callable[..., Any], x: Tensor, t: Tensor | int, cond: UNetCond) -> Tensor:
    """`unet(x, t, **cond)` with the inputs cast to the UNet's weight dtype and the prediction returned in fp32,
    so what the caller computes from it (x0, eps, solver steps) stays fp32."""
    dt = weight_dtype(unet)
    return unet_output(unet(x.to(dt), t, **cond.to(dtype=dt).kwargs())).float()


class Fp32Io:
    """A UNet called like one, with its inputs cast to its weight dtype and its prediction returned in fp32: lets
    samplers keep their state and steps in fp32 around a half-precision (or DeepSpeed bf16) network."""

    def __init__(self, unet: Any):
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor | int, **kwargs: Any) -> Tensor:
        dt = weight_dtype(self.unet)
        cond = UNetCond(kwargs.pop("encoder_hidden_states"), **kwargs.pop("added_cond_kwargs", {}),
                        timestep_cond=kwargs.pop("timestep_cond", None))
        return unet_output(self.unet(x.to(dt), t, **cond.to(dtype=dt).kwargs(), **kwargs)).float()


def _per_sample(scale: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(scale, Tensor) and scale.ndim == 1:
        return scale.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
    return scale


def guided_prediction(
    unet: Callable[..., Any],
    x_t: Tensor,
    t: Tensor | int,
    cond: UNetCond,
    uncond: UNetCond | None,
    scale: float | Tensor,
    form: str = "standard",
    net_dtype: torch.dtype | None = None,
) -> Tensor:
    """Classifier-free guided model output, cond and uncond as ONE forward of batch 2B.

    net_dtype: cast only the network's inputs to it (a half-precision frozen teacher) and return fp32, so the
    guidance and whatever the caller computes from the output stay in the inputs' precision.

    form "standard": uncond + scale (cond - uncond); form "lcm": cond + scale (cond - uncond).
    scale: a float or a per-sample (B,) tensor. With uncond None, or a float scale that makes the uncond term
    vanish (1 for standard, 0 for lcm), a single forward of batch B on cond. A tensor scale always runs 2B.
    t: LongTensor (B,), or a scalar shared by the batch.
    """
    if form not in ("standard", "lcm"):
        raise ValueError(f"form={form!r} (standard, lcm)")
    trivial = not isinstance(scale, Tensor) and float(scale) == (1.0 if form == "standard" else 0.0)

    def net(x: Tensor, t: Tensor | int, c: UNetCond) -> Tensor:
        if net_dtype is None:
            return unet_output(unet(x, t, **c.kwargs()))
        return unet_output(unet(x.to(net_dtype), t, **c.to(dtype=net_dtype).kwargs())).float()

    if uncond is None or trivial:
        return net(x_t, t, cond)
    t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 else t
    out_uncond, out_cond = net(torch.cat([x_t, x_t]), t2, uncond.cat(cond)).chunk(2)
    s = _per_sample(scale, out_cond)
    if form == "standard":  # same expression as diffusers' pipelines, so parity is exact
        return out_uncond + s * (out_cond - out_uncond)
    return out_cond + s * (out_cond - out_uncond)


def guided_ddim_step(
    unet: Callable[..., Any],
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
    cond: UNetCond,
    uncond: UNetCond | None,
    scale: float | Tensor,
    schedule: NoiseSchedule,
    form: str = "lcm",
    prediction_type: str | None = None,
    net_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LCD's teacher ODE solve (LCM paper, Algorithm 1 with a DDIM solver Psi): one deterministic DDIM
    step from t (= t_{n+k}) to s (= t_n) on the guided prediction,
        z_s = (1 + w) DDIM(z_t, cond) - w DDIM(z_t, uncond)   (eq. 9, form "lcm"),
    which, DDIM being affine in the model output, is DDIM on the guided x0 and eps. Returns (x_s, x0, eps).
    Runs under whatever grad mode the caller set (the teacher is normally called under torch.no_grad()).
    net_dtype: the teacher's dtype; only its inputs are cast, the solver step runs in x_t's dtype (fp32).
    """
    out = guided_prediction(unet, x_t, t, cond, uncond, scale, form, net_dtype)
    x0, eps = to_x0_eps(out, x_t, t, schedule, prediction_type)
    return ddim_step(x0, eps, s, schedule), x0, eps
