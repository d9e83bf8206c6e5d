"""Students built from the teacher: LoRA adapters (PEFT, diffusers-loadable keys), the LCM guidance (w)
embedding, and EMA with foreach ops."""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None, dropout: float,
             target_modules: list[str], adapter_name: str = "default") -> list[nn.Parameter]:
    """Inject PEFT LoRA layers with `unet.add_adapter` (keys that diffusers' load_lora_weights reads back).
    Base weights are frozen; the returned LoRA parameters are fp32 and trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel):
    """Run the base model (the teacher) through the same UNet that carries the student's adapters."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def lora_fused(unet: nn.Module, enabled: bool = True):
    """Passes WITHOUT gradient through a LoRA student run each adapted Linear / Conv2d as one call with the merged
    weight W + scale B A (PEFT's get_delta_weight, per call) where PEFT runs three (base, A, B) and an add: a
    diffusers `fuse_lora` for one pass, layer by layer, so no second copy of the weights is held and the base
    weights are never written (merging and unmerging in place would drift them). Only fp32 arithmetic is fused: a
    bf16 / fp16 base weight or an autocast region would round a small delta away inside the merged weight (see
    tests/test_precision.py), so those calls, and layers with dropout, DoRA or other variants, adapters disabled,
    a ZeRO-3 partitioned weight, or grad enabled, run PEFT's own path. A module without LoRA layers (a full
    student) passes through unchanged."""
    from peft.tuners.lora import LoraLayer

    layers = [] if not enabled else [
        m for m in unet.modules()
        if isinstance(m, LoraLayer) and isinstance(m.base_layer, (nn.Linear, nn.Conv2d)) and not m.lora_variant
        and "forward" not in m.__dict__  # not already fused by an enclosing scope
        and all(isinstance(m.lora_dropout[a], nn.Identity) for a in m.active_adapters if a in m.lora_A)]
    for layer in layers:
        layer.forward = _fused_forward(layer, layer.forward)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _fused_forward(layer, peft_forward):
    base = layer.base_layer

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if (torch.is_grad_enabled() or layer.disable_adapters or layer.merged or args or kwargs
                or base.weight.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
                or hasattr(base.weight, "ds_id")):
            return peft_forward(x, *args, **kwargs)
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            return base(x)
        w = base.weight + sum(layer.get_delta_weight(a).to(torch.float32) for a in active)
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, w, base.bias)
        return base._conv_forward(x, w, base.bias)

    return forward


def student_with_w_embedding(teacher: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """A copy of the teacher that also takes a guidance-scale embedding (`timestep_cond`) through the new
    `time_embedding.cond_proj`. The projection is ZERO-initialised, so at step 0 the student reproduces the
    teacher exactly (the public scripts initialise it randomly and perturb the student)."""
    config = dict(teacher.config)
    config["time_cond_proj_dim"] = dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert set(missing) == {"time_embedding.cond_proj.weight"} and not unexpected, (missing, unexpected)
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(dtype=torch.float32)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of 1000 w, as diffusers' LCM pipelines compute `timestep_cond` (they pass
    w = guidance_scale - 1, which is our LCM-form w)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class EMA:
    """Exponential moving average of a module's parameters (foreach lerp: one kernel per dtype group)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.model = model  # a separate copy, frozen

    def decay_at(self, step: int | None) -> float:
        """With warmup, decay = min(decay, (1 + step) / (10 + step)) so early random weights are forgotten fast
        (a plain 0.999 EMA still holds 37% of the initial weights after 1000 steps)."""
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, source: nn.Module, step: int | None = None) -> None:
        from distill.parallel import gathered

        src = [p for p in source.parameters()]
        dst = [p for p in self.model.parameters()]
        with gathered(src):  # a ZeRO-3 partitioned source is read whole (every rank updates its own full EMA copy)
            torch._foreach_lerp_(dst, [s.detach().to(d.dtype) for s, d in zip(src, dst)], 1.0 - self.decay_at(step))

    def state_dict(self, prefix: str = "ema.") -> dict[str, Tensor]:
        return {prefix + k: v for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor], prefix: str = "ema.") -> None:
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            self.model.load_state_dict(own)


def load_lora(unet: nn.Module, lora_dir: str) -> None:
    """Continue a LoRA: load a diffusers-format LoRA export (`unet.<path>.lora_A.weight`) into adapter "default"."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"))
    state = {k.removeprefix("unet."): v.float() for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"LoRA {lora_dir} does not fit this stage's adapter (rank / targets changed?): "
                         f"{result.unexpected_keys[:3]}")
