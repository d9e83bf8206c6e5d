"""Feature taps and a discriminator on tapped features: the backbone is a choice.

  copy    a trainable copy of the teacher's encoder (SDXL-Lightning; distill.methods.discriminator.Discriminator
          is this case with one mid-block head and the conditional form)
  frozen  the frozen teacher's encoder with small trainable heads at several levels (PCM's discriminator)
  shared  the features of a network trained elsewhere, read during its own forward
A `copy` backbone that is a whole UNet is DMD2's fake score: the UNet trains on its own output (the denoising loss)
and the head on its mid-block features, in one forward (`forward(..., with_output=True)`).

`FeatureTaps` records the outputs of named submodules with forward hooks, only while armed (inside `with taps:`).
Gradient checkpointing recomputes a block's forward during backward, outside the `with`: the hook sees the
recompute but records nothing, and the recorded tensors (the checkpointed block's real outputs) stay in the graph,
so gradients flow through them as through an untapped forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from distill.diffusion import UNetCond, call_unet
from distill.methods.discriminator import UNetEncoder, head_blocks, make_head, norm_groups  # noqa: F401  (re-exported)


class FeatureTaps:
    """Forward hooks on `net`'s submodules `names` (dotted, as in named_modules), recording their outputs."""

    def __init__(self, net: nn.Module, names: Sequence[str]):
        modules = dict(net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"no submodules {missing} to tap in {type(net).__name__} (have e.g. "
                           f"{[n for n in modules if n.count('.') <= 1][:8]})")
        self.names = list(names)
        self.armed = False
        self.features: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            if self.armed:
                self.features[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        self.armed = True
        return self

    def __exit__(self, *exc) -> None:
        self.armed = False

    def __call__(self) -> list[Tensor]:
        """The recorded features, in tap order."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"taps {missing} recorded nothing: the forward did not reach them")
        return [self.features[n] for n in self.names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def encoder_levels(encoder: UNetEncoder) -> list[str]:
    """Tap names of a UNetEncoder: every down block and the mid block (multi-level, as PCM's heads)."""
    return [f"down_blocks.{i}" for i in range(len(encoder.down_blocks))] + ["mid_block"]


class TapDiscriminator(nn.Module):
    """Logits from heads on tapped features of a backbone. Only the heads (and a `copy` backbone) are this
    module's parameters: a `frozen` or `shared` backbone is held outside the module tree, so optimizers,
    checkpoints and DDP see the heads alone.

    The backbone is a UNetEncoder (called as backbone(x, t, cond)) or a UNet (called through call_unet; for
    `shared`, the trained network's own forward, whose prediction the caller gets back from
    `forward_with_output`). `channels` are the tapped features' channel counts and
    `sizes` their spatial sides at the training resolution (they set each head's depth to reach 1x1)."""

    def __init__(self, backbone: nn.Module, taps: Sequence[str], channels: Sequence[int], sizes: Sequence[int],
                 head_channels: int, mode: str):
        super().__init__()
        if mode not in ("copy", "frozen", "shared"):
            raise ValueError(f"mode={mode!r}: expected copy | frozen | shared")
        self.mode = mode
        if mode == "copy":
            self.backbone = backbone.float().requires_grad_(True)
        else:
            self._outside = [backbone]  # not a registered submodule
            if mode == "frozen":
                backbone.requires_grad_(False)
        self.taps = FeatureTaps(backbone, taps)
        self.heads = nn.ModuleList(make_head(c, head_channels, head_blocks(s), s) for c, s in zip(channels, sizes))
        self.heads.float().requires_grad_(True)

    @property
    def net(self) -> nn.Module:
        return self.backbone if self.mode == "copy" else self._outside[0]

    def forward_with_output(self, x: Tensor, t: Tensor, cond: UNetCond) -> tuple[Tensor, object]:
        """(logits (B,), the backbone's own output)."""
        with self.taps:
            out = self.net(x, t, cond) if isinstance(self.net, UNetEncoder) else call_unet(self.net, x, t, cond)
        return self.logits(self.taps()), out

    def logits(self, feats: list[Tensor]) -> Tensor:
        """The mean over levels of each head's mean logit."""
        dt = next(self.heads.parameters()).dtype
        per_level = [h(f.to(dt)).float().mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)]
        return torch.stack(per_level).mean(0)

    def forward(self, x: Tensor, t: Tensor, cond: UNetCond, with_output: bool = False):
        """Logits (B,), or (logits, the backbone's output) with `with_output`: one forward through a DDP or
        DeepSpeed wrapper that trains the backbone on its output and the heads on its features (DMD2's fake
        score)."""
        logits, out = self.forward_with_output(x, t, cond)
        return (logits, out) if with_output else logits


def frozen_encoder_discriminator(unet: nn.Module, latent_size: int, head_channels: int,
                                 share: bool = True) -> TapDiscriminator:
    """PCM's discriminator: the frozen teacher's encoder (its own modules, or frozen copies with share=False) with a
    head per level."""
    enc = UNetEncoder(unet, share=share).requires_grad_(False).eval()
    names = encoder_levels(enc)
    channels, sizes = _level_shapes(unet, latent_size)
    return TapDiscriminator(enc, names, channels, sizes, head_channels, "frozen")


def _level_shapes(unet: nn.Module, latent_size: int) -> tuple[list[int], list[int]]:
    """Output channels and sides of each down block and of the mid block of a diffusers UNet."""
    channels, sizes, size = [], [], latent_size
    for block, c in zip(unet.down_blocks, unet.config.block_out_channels):
        if getattr(block, "downsamplers", None) is not None:
            size = max(1, size // 2)
        channels.append(int(c))
        sizes.append(size)
    return channels + [int(unet.config.block_out_channels[-1])], sizes + [size]
