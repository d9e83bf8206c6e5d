"""Per-sample decoding, filtering and SDXL micro-conditioning, and batch collation.

Micro-conditioning (SDXL, arXiv 2307.01952 sec. 2.2) is recorded exactly as the UNet's add_time_ids expect it:
original_size = (H, W) of the source image (the diffusers wds scripts' trap was (W, H)), crop_top_left =
(top, left) of the crop in the resized frame, target_size = (R, R).
"""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import torch
from PIL import Image

from distill.data.config import DataConfig

# Reasons a sample is dropped. BAD_DATA ones raise in strict mode; FILTERS never do (they are the user's choice).
BAD_DATA = ("missing_image", "decode_error", "missing_caption", "bad_json", "missing_latents", "bad_latents",
            "missing_noise")
FILTERS = ("min_size", "max_watermark", "max_aspect_ratio")

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS}


class Rejected(Exception):
    """A sample was dropped; `reason` is one of BAD_DATA or FILTERS (the counter key)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise Rejected("bad_json", "not an object")
    return meta


def find_caption(raw: dict, meta: dict, keys: list[str]) -> str:
    """The first of `keys` present as a file extension (KEY.txt), then as a string field of KEY.json."""
    for k in keys:
        if k in raw:
            return raw[k].decode("utf-8", errors="replace").strip()
    for k in keys:
        if isinstance(meta.get(k), str):
            return meta[k].strip()
    raise Rejected("missing_caption", f"none of {keys} in files or json")


def check_filters(cfg: DataConfig, h: int, w: int, meta: dict) -> None:
    """Apply the configured metadata filters to a source size (H, W) and json metadata."""
    if cfg.min_size and min(h, w) < cfg.min_size:
        raise Rejected("min_size", f"{h}x{w} < {cfg.min_size}")
    if cfg.max_aspect_ratio is not None and max(h, w) > cfg.max_aspect_ratio * max(1, min(h, w)):
        raise Rejected("max_aspect_ratio", f"{h}x{w}")
    if cfg.max_watermark is not None:
        p = meta.get("pwatermark")
        if isinstance(p, (int, float)) and p > cfg.max_watermark:  # missing or null passes
            raise Rejected("max_watermark", f"{p}")


def _source_size(meta: dict, decoded_hw: tuple[int, int]) -> tuple[int, int]:
    # img2dataset may resize on download; its json keeps the true source size as original_height/width.
    oh, ow = meta.get("original_height"), meta.get("original_width")
    if isinstance(oh, int) and isinstance(ow, int) and oh > 0 and ow > 0:
        return oh, ow
    return decoded_hw


def resize_crop(img: Image.Image, cfg: DataConfig, rng: random.Random) -> tuple[Image.Image, int, int]:
    """Resize the short side to R (antialiased), crop R x R (center or random), optional flip.
    Returns (image, top, left) with (top, left) the crop's corner in the resized (and, if flipped, mirrored)
    frame, the convention of diffusers' SDXL training scripts."""
    r = cfg.resolution
    w, h = img.size
    scale = r / min(w, h)
    nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
    if cfg.crop == "random":
        top, left = rng.randint(0, nh - r), rng.randint(0, nw - r)
    elif cfg.crop == "center":
        top, left = round((nh - r) / 2.0), round((nw - r) / 2.0)
    else:
        raise ValueError(f"data.crop must be 'center' or 'random', got {cfg.crop!r}")
    if (nw, nh) == (w, h):
        img = img.crop((left, top, left + r, top + r))
    else:
        # Resample only the crop window: PIL's `box` maps the same source region (filter support still reads
        # pixels outside it), so this equals resize-then-crop at a fraction of the cost for non-square images.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + r) * sx, (top + r) * sy)
        img = img.resize((r, r), _RESAMPLE[cfg.interpolation], box=box)
    if cfg.random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - r  # the same window, seen in the mirrored resized frame
    return img, top, left


def image_sample(raw: dict, cfg: DataConfig, rng: random.Random) -> dict:
    """Raw tar sample -> {"pixels" uint8 (R,R,3), "caption", "original_size", "crop_top_left", ...}.
    Raises Rejected. Cheap checks (caption, json, size filters on the lazily opened header) run before decode."""
    ext = next((k for k in cfg.image_keys if k in raw), None)
    if ext is None:
        raise Rejected("missing_image", f"no {cfg.image_keys} file")
    meta = _json(raw)
    caption = find_caption(raw, meta, cfg.caption_keys)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw[ext]))
            w, h = img.size
            size = _source_size(meta, (h, w))
            check_filters(cfg, *size, meta)
            # JPEG: decode at a power-of-two reduction that still covers the target (much faster for big images).
            scale = cfg.resolution / min(w, h)
            img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            img = img.convert("RGB")
    except Rejected:
        raise
    except Exception as e:
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from e
    img, top, left = resize_crop(img, cfg, rng)
    return {"pixels": np.asarray(img, dtype=np.uint8), "caption": caption, "original_size": size,
            "crop_top_left": (top, left), "target_size": (cfg.resolution, cfg.resolution),
            "key": raw["__key__"], "url": raw["__url__"]}


def _npy(raw: dict, name: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(raw[name]), allow_pickle=False)  # never unpickle shard data
    except Exception as e:
        raise Rejected("bad_latents", f"{name}: {type(e).__name__}: {e}") from e
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # a NaN sample is skipped, never trained on
        raise Rejected("bad_latents", f"{name}: non-finite values")
    return arr


def latent_sample(raw: dict, cfg: DataConfig, rng: random.Random) -> dict:
    """Raw precomputed sample (written by `distill.prepare latents`) -> tensors as stored (fp16)."""
    if "latents.npy" not in raw or "prompt_embeds.npy" not in raw:
        raise Rejected("missing_latents", "needs KEY.latents.npy and KEY.prompt_embeds.npy")
    meta = _json(raw)
    caption = find_caption(raw, meta, cfg.caption_keys)
    try:
        size = tuple(int(v) for v in meta["original_size"])
        crop = tuple(int(v) for v in meta["crop_top_left"])
        target = tuple(int(v) for v in meta["target_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise Rejected("bad_json", f"micro-conditioning: {e}") from e
    check_filters(cfg, size[0], size[1], meta)
    out = {"latents": _npy(raw, "latents.npy"), "prompt_embeds": _npy(raw, "prompt_embeds.npy"),
           "caption": caption, "original_size": size, "crop_top_left": crop, "target_size": target,
           "key": raw["__key__"], "url": raw["__url__"]}
    if "pooled_prompt_embeds.npy" in raw:
        out["pooled_prompt_embeds"] = _npy(raw, "pooled_prompt_embeds.npy")
    return out


def pair_sample(raw: dict, cfg: DataConfig, rng: random.Random) -> dict:
    """Raw teacher ODE pair (written by `distill.prepare pairs`) -> a latent sample (the teacher's latent) plus
    the noise the teacher's solve started from (fp32)."""
    if "noise.npy" not in raw:
        raise Rejected("missing_noise", "a pair needs KEY.noise.npy (shards from `python -m distill.prepare pairs`)")
    out = latent_sample(raw, cfg, rng)
    out["noise"] = _npy(raw, "noise.npy")
    if "states.npy" in raw:  # the solve's trajectory, from 999 down (`prepare pairs --states`)
        try:
            ts = [int(t) for t in _json(raw)["pair"]["state_timesteps"]]
        except (KeyError, TypeError, ValueError) as e:
            raise Rejected("bad_json", f"states.npy without pair.state_timesteps: {e}") from e
        out["states"], out["state_timesteps"] = _npy(raw, "states.npy"), ts
    return out


def prompt_sample(raw: dict, cfg: DataConfig, rng: random.Random) -> dict:
    """Raw sample -> its caption alone (data.kind=prompts): no image is decoded, whatever the shard holds. The
    micro-conditioning is that of a square image at the training resolution, as validation prompts get."""
    caption = find_caption(raw, _json(raw), cfg.caption_keys)
    r = cfg.resolution
    return {"caption": caption, "original_size": (r, r), "crop_top_left": (0, 0), "target_size": (r, r),
            "key": raw["__key__"], "url": raw["__url__"]}


def collate(samples: list[dict]) -> dict:
    """Stack a list of processed samples into the batch dict of the data contract (docs/data.md)."""
    batch: dict = {}
    first = samples[0]
    if "pixels" in first:
        u8 = torch.from_numpy(np.stack([s["pixels"] for s in samples]))  # (B, R, R, 3)
        batch["pixels"] = u8.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)  # permute the bytes
    for name in ("latents", "noise", "states", "prompt_embeds", "pooled_prompt_embeds"):
        if name in first:
            if any(name not in s for s in samples):
                raise ValueError(f"{name} present in some samples of a batch only (mixed shards?)")
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    if "state_timesteps" in first:
        batch["state_timesteps"] = torch.tensor([s["state_timesteps"] for s in samples], dtype=torch.long)
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
    for name in ("caption", "key", "url"):
        batch[name] = [s[name] for s in samples]
    return batch
