"""SDXL-Lightning's discriminator (arXiv 2402.13929, Sec. 3.2-3.4, eqs. 17-23).

Backbone d: a TRAINABLE copy of the teacher UNet's encoder half (conv_in, time embedding, SDXL added
conditioning, down blocks, mid block), made of deep copies of the UNet's own submodules, so it runs in latent
space at any t and reads text (cross-attention) and the SDXL pooled text + time_ids as the UNet does. It is
built afresh from the teacher at every stage (re-initialised), and fully trained (no LoRA on it).

Heads: [4x4 conv stride 2, GroupNorm, SiLU] blocks down to 1x1, then a 1x1 conv to one logit per sample.
  conditional   D(x_t, x_s):  d(x_t, t) and d(x_s, s) through the shared backbone, concatenated on channels
  unconditional D'(x_s):      d(x_s, s) only
A stage trains one of the two (both in one module would leave the other's parameters without gradients,
which DDP rejects).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import Tensor, nn

from distill.diffusion import UNetCond, weight_dtype


class UNetEncoder(nn.Module):
    """conv_in + time/added embeddings + down blocks + mid block of a diffusers UNet2DConditionModel, copied.
    `forward` mirrors UNet2DConditionModel.forward up to the mid block (no residuals are kept)."""

    def __init__(self, unet: nn.Module, share: bool = False):
        """share=True references the UNet's own modules instead of copying them (a frozen-teacher backbone)."""
        super().__init__()
        cfg = unet.config
        if cfg.addition_embed_type not in (None, "text_time") or unet.class_embedding is not None \
                or unet.encoder_hid_proj is not None:
            raise ValueError("UNetEncoder supports SD 1.5 / SDXL UNets (addition_embed_type None or text_time, "
                             "no class embedding, no encoder_hid_proj)")
        self.addition_embed_type = cfg.addition_embed_type
        own = (lambda m: m) if share else copy.deepcopy
        self.conv_in = own(unet.conv_in)
        self.time_proj = own(unet.time_proj)
        self.time_embedding = own(unet.time_embedding)
        self.time_embed_act = own(unet.time_embed_act)
        if self.addition_embed_type == "text_time":
            self.add_time_proj = own(unet.add_time_proj)
            self.add_embedding = own(unet.add_embedding)
        self.down_blocks = own(unet.down_blocks)
        self.mid_block = own(unet.mid_block)
        self.out_channels = int(cfg.block_out_channels[-1])
        self.downsample_factor = 2 ** sum(getattr(b, "downsamplers", None) is not None for b in self.down_blocks)

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' blocks checkpoint themselves when these two attributes are set (ModelMixin does the same)."""
        fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m._gradient_checkpointing_func = fn
                m.gradient_checkpointing = True

    def forward(self, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        """Mid-block features (B, C_mid, H/f, W/f) of latents x at timesteps t (B,)."""
        t_emb = self.time_proj(t.reshape(-1).expand(x.shape[0])).to(x.dtype)  # Timesteps returns fp32
        emb = self.time_embedding(t_emb, cond.timestep_cond)
        if self.addition_embed_type == "text_time":  # SDXL: pooled text + Fourier-embedded micro-conditioning
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(x.shape[0], -1)
            add = torch.cat([cond.text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        ehs = cond.encoder_hidden_states
        h = self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(h, emb, encoder_hidden_states=ehs)
        return self.mid_block(h, emb)


def latent_side(comps, resolution: int) -> int:
    """Side of the training latents: the pixel resolution over the VAE's downsampling (2^(levels - 1); 8 when the
    model folder has no VAE config)."""
    import json
    from pathlib import Path

    vae_cfg = Path(comps.path) / "vae" / "config.json"
    levels = len(json.loads(vae_cfg.read_text())["block_out_channels"]) if vae_cfg.exists() else 4
    return resolution // 2 ** (levels - 1)


def head_blocks(mid_size: int) -> int:
    """Number of 4x4 stride-2 (padding 1) convs that take a mid feature of side `mid_size` to 1x1."""
    n = 0
    while mid_size > 1:
        mid_size //= 2
        n += 1
    return n


def norm_groups(width: int, spatial: int, min_elements: int = 16) -> int:
    """GroupNorm groups for `width` channels on a spatial x spatial map: 32 when each group then normalises at least
    `min_elements` values, fewer otherwise. At 1x1 with one channel per group (32 groups of a 32-wide head) every
    group is a single value, which GroupNorm maps to 0: the block's output would be its bias whatever the input,
    a discriminator blind to its input (real and fake logits equal) and no gradient for the generator."""
    g = math.gcd(32, width)
    while g > 1 and (width // g) * spatial * spatial < min_elements:
        g //= 2
    return g


def make_head(in_channels: int, width: int, num_blocks: int, mid_size: int) -> nn.Sequential:
    """[Conv 4x4 s2, GroupNorm, SiLU] x num_blocks, then Conv 1x1 to one channel (the paper's head; DMD2's SDXL
    head is an instance). GroupNorm uses 32 groups unless a group would normalise fewer than 16 values (see
    `norm_groups`: late blocks of narrow heads use fewer groups)."""
    layers: list[nn.Module] = []
    c, size = in_channels, mid_size
    for _ in range(num_blocks):
        size = max(1, size // 2)
        layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.GroupNorm(norm_groups(width, size), width), nn.SiLU()]
        c = width
    layers.append(nn.Conv2d(c, 1, 1))
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Lightning's D (conditional=True) or D' (conditional=False) in logits; sigmoid(logit) is the paper's
    probability that a sample came from the teacher.

    latent_size: side of the training latents (sets the head's depth so it ends at 1x1; any remainder is
    averaged). head_channels: the head's width.
    """

    def __init__(self, unet: nn.Module, latent_size: int, head_channels: int, conditional: bool):
        super().__init__()
        self.backbone = UNetEncoder(unet)
        self.conditional = conditional
        c = self.backbone.out_channels * (2 if conditional else 1)
        mid = max(1, latent_size // self.backbone.downsample_factor)
        self.head = make_head(c, head_channels, head_blocks(mid), mid)
        self.float().requires_grad_(True).train()

    def forward(self, x_s: Tensor, s: Tensor, cond: UNetCond, x_t: Tensor | None = None,
                t: Tensor | None = None) -> Tensor:
        """Logits (K B,) of K B candidates x_s (K blocks of the B samples, e.g. [real; fake]) at timesteps s (K B,),
        for conditions `cond` of the B samples; the conditional D also takes each sample's x_t at t (B,).
        Everything goes through the backbone as ONE batch (one DDP forward per phase)."""
        dt = weight_dtype(self.backbone)  # inputs in D's weight dtype: a DeepSpeed bf16 engine is not autocast
        x_s, cond = x_s.to(dt), cond.to(dtype=dt)
        x_t = None if x_t is None else x_t.to(dt)
        b = cond.batch_size
        k = x_s.shape[0] // b
        if k * b != x_s.shape[0]:
            raise ValueError(f"x_s has {x_s.shape[0]} samples, not a multiple of the {b} conditions")
        if self.conditional:
            if x_t is None or t is None:
                raise ValueError("the conditional discriminator needs x_t and t")
            conds = _tile(cond, k + 1)
            feats = self.backbone(torch.cat([x_t, x_s]), torch.cat([t, s]), conds)
            f_t, f_s = feats[:b], feats[b:]
            feats = torch.cat([f_s, f_t.repeat(k, 1, 1, 1)], dim=1)  # paper: concatenated on channels
        else:
            feats = self.backbone(x_s, s, _tile(cond, k))
        return self.head(feats).float().mean(dim=(1, 2, 3))


def _tile(cond: UNetCond, k: int) -> UNetCond:
    """[cond; cond; ...] k times as blocks (not interleaved), matching how candidates are stacked."""
    out = cond
    for _ in range(k - 1):
        out = out.cat(cond)
    return out
