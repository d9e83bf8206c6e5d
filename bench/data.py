"""Data loader throughput: samples/s for image shards and precomputed latent shards with 0, 1 and 2 workers.

    python bench/data.py --out data_bench.json [--images 256] [--image-size 768x576] [--resolution 512]

Writes its own shards (random-noise JPEGs with captions; SDXL-shaped fp16 latents + embeddings) to a temporary
folder, then for each (kind, num_workers) times the first batch (worker start-up) and the steady state after it.
Random-noise JPEGs are a worst case for decode cost per pixel; real photos decode somewhat faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data import DataConfig, ShardWriter, build_loader


def write_image_shards(root: Path, n: int, size: tuple[int, int], per_shard: int) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    # low-frequency noise upsampled: JPEG sizes closer to photos than white noise
    with ShardWriter(root, per_shard) as writer:
        for i in range(n):
            small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
            writer.write(f"{i:09d}", {"jpg": img, "txt": f"sample {i}", "json": {"width": w, "height": h}})


def write_latent_shards(root: Path, n: int, resolution: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    lat = resolution // 8
    with ShardWriter(root, per_shard) as writer:
        for i in range(n):
            writer.write(f"{i:09d}", {
                "latents.npy": rng.standard_normal((4, lat, lat)).astype(np.float16),
                "prompt_embeds.npy": rng.standard_normal((77, 2048)).astype(np.float16),
                "pooled_prompt_embeds.npy": rng.standard_normal(1280).astype(np.float16),
                "json": {"caption": f"sample {i}", "original_size": [resolution, resolution],
                         "crop_top_left": [0, 0], "target_size": [resolution, resolution]}})


def measure(cfg: DataConfig, batches: int) -> dict:
    t0 = time.perf_counter()
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    next(loader)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(loader)
    t2, c2 = time.perf_counter(), time.process_time()
    loader.close()
    row = {"kind": cfg.kind, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
           "first_batch_s": round(t1 - t0, 3), "samples_per_s": round(batches * cfg.batch_size / (t2 - t1), 1)}
    if cfg.num_workers == 0:  # CPU time per sample: comparable across machines and load, unlike wall time
        row["cpu_ms_per_sample"] = round(1000 * (c2 - c1) / (batches * cfg.batch_size), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", default="768x576", help="WxH of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches after the first")
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_image_shards(Path(tmp, "img"), args.images, size, 32)
        write_latent_shards(Path(tmp, "lat"), args.images, args.resolution, 32)
        for kind in ("images", "latents"):
            for workers in (int(w) for w in args.workers.split(",")):
                cfg = DataConfig(kind=kind, shards=str(Path(tmp, "img" if kind == "images" else "lat")),
                                 batch_size=args.batch_size, resolution=args.resolution, num_workers=workers,
                                 shuffle_buffer=64, pin_memory=False)
                rows.append(measure(cfg, args.batches))
                print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "image_size": list(size), "resolution": args.resolution,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
