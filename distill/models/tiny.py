"""Tiny models of the real SDXL and SD 1.5 architectures, built offline in about a second.

The tests and the embedded default (the tiny world) need a complete diffusers pipeline without a hub:
UNet2DConditionModel (with SDXL's `text_time` added conditioning), AutoencoderKL, two CLIP text encoders and
their tokenizers. Everything here is the real diffusers/transformers class with a small config, so every code
path that runs on SDXL runs on these too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# The tiny world's words (distill/data/synthetic.py). They get single tokens in the tiny vocabulary so a small
# frozen text encoder separates captions cleanly; any other text still tokenizes (byte fallback).
WORLD_WORDS = [
    "a", "on", "background", "red", "green", "blue", "yellow", "circle", "square", "triangle", "black", "white",
]

# SDXL's scheduler config (stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False, sample_max_value=1.0, clip_sample=False, set_alpha_to_one=False,
)

# Sizes. "test": smallest that exercises every block type (unit tests). "world": the tiny world's teacher.
PRESETS: dict[str, dict] = {
    # The two text encoders get different widths as in SDXL (768 / 1280): diffusers' single-file loader tells
    # them apart by width.
    "test": dict(unet_channels=(32, 64), heads=(2, 4), vae_channels=(16, 32), vae_groups=8, text_hidden=16,
                 text_hidden_2=24, text_layers=2, resolution=32, latent_channels=4, time_embed=8),
    "world": dict(unet_channels=(64, 128), heads=(4, 8), vae_channels=(32, 64, 64), vae_groups=16, text_hidden=32,
                  text_hidden_2=48, text_layers=2, resolution=32, latent_channels=4, time_embed=16),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map: every byte has a symbol, so any text tokenizes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(words: list[str] = WORLD_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary: every byte symbol (plain and end-of-word), plus merges that make each of
    `words` a single token. Merges are chained left to right per word and deduplicated; a word whose chain is
    broken by an earlier merge of another word simply ends up as a few tokens, which is still valid BPE."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"] if len(word) > 1 else [word + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(cur)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write vocab.json + merges.txt and load them as a CLIPTokenizer (max length 77, as SDXL's)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    tok.save_pretrained(str(out))
    return tok


def _text_config(p: dict, vocab_size: int, projection: bool) -> CLIPTextConfig:
    width = p["text_hidden_2"] if projection else p["text_hidden"]
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=p["text_layers"], num_attention_heads=2, max_position_embeddings=77,
        projection_dim=width if projection else 512, hidden_act="gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def build_unet(arch: str = "sdxl", preset: str = "test") -> UNet2DConditionModel:
    p = PRESETS[preset]
    ch = p["unet_channels"]
    common = dict(
        sample_size=p["resolution"] // 2 ** (len(p["vae_channels"]) - 1),
        in_channels=p["latent_channels"], out_channels=p["latent_channels"], layers_per_block=1,
        block_out_channels=ch, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=p["heads"], norm_num_groups=16,
    )
    if arch == "sdxl":
        # SDXL: the two encoders' penultimate states concatenated; pooled text + 6 time ids as added embedding.
        return UNet2DConditionModel(
            **common, cross_attention_dim=p["text_hidden"] + p["text_hidden_2"], addition_embed_type="text_time",
            addition_time_embed_dim=p["time_embed"], use_linear_projection=True,
            projection_class_embeddings_input_dim=p["text_hidden_2"] + 6 * p["time_embed"],
        )
    if arch == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=p["text_hidden"])
    raise ValueError(f"unknown arch {arch!r}: expected 'sdxl' or 'sd15'")


def build_vae(preset: str = "test") -> AutoencoderKL:
    p = PRESETS[preset]
    n = len(p["vae_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=p["vae_channels"], layers_per_block=1,
        latent_channels=p["latent_channels"], norm_num_groups=p["vae_groups"], sample_size=p["resolution"],
    )


def build_pipeline(arch: str = "sdxl", preset: str = "test", seed: int = 0, tokenizer_dir: str | Path | None = None):
    """A complete randomly initialised tiny pipeline (StableDiffusionXLPipeline or StableDiffusionPipeline)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return _build_pipeline(arch, preset, tokenizer_dir)


def _build_pipeline(arch: str, preset: str, tokenizer_dir: str | Path | None):
    import tempfile

    p = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tokenizer_dir or tmp)
    vocab_size = len(tok)
    unet, vae = build_unet(arch, preset), build_vae(preset)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one", "sample_max_value")})
    te1 = CLIPTextModel(_text_config(p, vocab_size, projection=False))
    if arch == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te1, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    te2 = CLIPTextModelWithProjection(_text_config(p, vocab_size, projection=True))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(out_dir: str | Path, arch: str = "sdxl", preset: str = "test", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a normal diffusers folder (safetensors)."""
    out = Path(out_dir)
    pipe = build_pipeline(arch, preset, seed)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
