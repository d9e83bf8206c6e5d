"""The data configuration schema (`cfg.data`), a Hydra structured config.

Only OmegaConf-supported types: a typo or a wrong type fails when the config is composed, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """WebDataset input for training. See docs/data.md for the shard layout and the epoch/resume semantics."""

    # "images" (decode + resize + crop here) | "latents" (precomputed by distill.prepare) | "prompts" (captions
    # only, never an image: a .txt / .jsonl prompt list, one per line, or caption shards; data-free methods) |
    # "pairs" (teacher ODE pairs from `distill.prepare pairs`: latent shards plus the noise each solve started from)
    kind: str = "images"
    # A path (a .tar, or a folder of .tar files), a brace pattern ("data/{00000..00099}.tar"), a `pipe:` URL
    # ("pipe:curl -s -L https://.../{00000..01099}.tar") or a list of any of these.
    shards: Any = None
    batch_size: int = 4  # per process
    resolution: int = 1024  # square side R after resize + crop (images); recorded as target_size
    crop: str = "center"  # "center" | "random"
    random_flip: bool = False  # horizontal flip with probability 0.5; crop_top_left is mirrored to match
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "lanczos" (PIL, antialiased when downscaling)
    num_workers: int = 2  # DataLoader workers per process
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool = True  # only takes effect when CUDA is available
    shuffle_buffer: int = 1000  # samples held per worker for shuffling (0 = shard order only)
    resampled: bool = False  # infinite stream drawing shards with replacement; "epoch" = one dataset's worth
    # How ranks are made to yield the same number of batches per epoch (DDP hangs otherwise):
    # "pad" = every sample at least once, short workers wrap around; "drop" = at most once, long ones stop early.
    equalize: str = "pad"
    strict: bool = False  # raise on the first bad sample / shard (naming shard URL and key) instead of skipping
    # Filters (rejections are counted, never errors). Sizes are of the source image (json original_* if present).
    min_size: int = 0  # min(H, W) >= min_size
    max_watermark: float | None = None  # json "pwatermark" <= this (a missing value passes)
    max_aspect_ratio: float | None = None  # max(H, W) / min(H, W) <= this
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "caption", "text"])  # file ext, then json key
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    # Fail (naming the filter) after this many consecutive samples were rejected or failed without one passing.
    max_tries: int = 1000
    # Samples per shard when it cannot be read from a `*_stats.json` sidecar or a local tar (e.g. `pipe:` URLs);
    # None = stream each such shard once at start to count it (slow for remote data; set it for img2dataset).
    samples_per_shard: int | None = None
