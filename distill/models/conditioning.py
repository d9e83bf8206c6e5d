"""Turning a batch into what the UNet eats: latents, text embeddings and SDXL micro-conditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.models.loader import Components


@torch.no_grad()
def encode_prompts(comps: Components, captions: list[str]) -> tuple[Tensor, Tensor | None]:
    """SDXL: penultimate hidden states of both CLIP encoders concatenated, pooled output of encoder 2.
    SD 1.5: last hidden state of the single encoder, no pooled output."""
    device = next(comps.text_encoder.parameters()).device

    def ids(tok) -> Tensor:
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    if comps.arch == "sd15":
        return comps.text_encoder(ids(comps.tokenizer))[0], None
    out1 = comps.text_encoder(ids(comps.tokenizer), output_hidden_states=True)
    out2 = comps.text_encoder_2(ids(comps.tokenizer_2), output_hidden_states=True)
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return embeds, out2.text_embeds


@torch.no_grad()
def encode_images(comps: Components, pixels: Tensor) -> Tensor:
    """Pixels in [-1, 1] -> latents times the VAE scaling factor. Uses the posterior mode, not a sample, so
    precomputed latent shards and online encoding give the same latents."""
    vae = comps.vae
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(comps_or_vae, latents: Tensor) -> Tensor:
    """Latents (scaled) -> pixels in [-1, 1]."""
    return vae_decode(comps_or_vae, latents).clamp(-1, 1)


def vae_decode(comps_or_vae, latents: Tensor) -> Tensor:
    """Latents (scaled) -> pixels, differentiable in the latents and unclamped (a reward's gradient must not vanish
    where a pixel leaves [-1, 1]); the VAE in its own dtype."""
    vae = comps_or_vae.vae if isinstance(comps_or_vae, Components) else comps_or_vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL add_time_ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def drop_captions(cond, mask: Tensor):
    """Caption dropout: zero the text (and pooled) embeddings of the samples where `mask` is True, keeping
    their micro-conditioning; all-zero embeddings are SDXL's unconditional input (force_zeros_for_empty_prompt)."""
    from dataclasses import replace

    keep = (~mask).to(cond.encoder_hidden_states.dtype)
    emb = cond.encoder_hidden_states * keep.view(-1, 1, 1)
    pooled = cond.text_embeds * keep.view(-1, 1) if cond.text_embeds is not None else None
    return replace(cond, encoder_hidden_states=emb, text_embeds=pooled)
