"""Dataset preparation CLI.

    python -m distill.prepare shards  --input FOLDER_OR_JSONL --output DIR [--samples-per-shard N]
    python -m distill.prepare latents --shards PATTERN --model MODEL --output DIR [--resolution R] [--batch-size B]
    accelerate launch -m distill.prepare latents ...     # data-parallel: each process encodes its share

`shards` packs images + captions into img2dataset-layout WebDataset shards (KEY.jpg|png|webp, KEY.txt,
KEY.json with width/height), from a folder (same-named .txt captions) or a .jsonl/.parquet of {path|image, caption}.
`latents` runs the VAE and text encoder(s) once over image shards and writes `data.kind=latents` shards
(KEY.latents.npy, KEY.prompt_embeds.npy, KEY.pooled_prompt_embeds.npy for SDXL, KEY.json), one set of
`NNNNN-rankRRR.tar` files per process. Both print a JSON summary (samples, shards, skipped counts by reason).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from distill.data.writer import ShardWriter

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _folder_items(root: Path, skipped: Counter) -> Iterator[tuple[str, bytes | Path, str]]:
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        txt = path.with_suffix(".txt")
        if not txt.exists():
            skipped["missing_caption"] += 1
            continue
        yield str(path.relative_to(root)), path, txt.read_text(encoding="utf-8").strip()


def _record_item(row: dict, base: Path, skipped: Counter) -> tuple[str, bytes | Path, str] | None:
    caption = row.get("caption", row.get("text"))
    image = row.get("image", row.get("path"))
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if not isinstance(caption, str):
        skipped["missing_caption"] += 1
        return None
    if isinstance(image, (bytes, bytearray)):
        return "<bytes>", bytes(image), caption
    if not isinstance(image, str):
        skipped["missing_image"] += 1
        return None
    path = Path(image) if Path(image).is_absolute() else base / image
    return image, path, caption


def _table_items(path: Path, skipped: Counter) -> Iterator[tuple[str, bytes | Path, str]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise SystemExit("reading .parquet needs pyarrow (pip install pyarrow), or convert it to .jsonl") from e
        rows: Iterator[dict] = iter(pq.read_table(path).to_pylist())
    else:
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for row in rows:
        item = _record_item(row, path.parent, skipped)
        if item is not None:
            yield item


def make_shards(input_path: str | Path, output: str | Path, samples_per_shard: int = 1000) -> dict:
    """Pack images + captions into shards. Unreadable images and missing captions are skipped and counted."""
    from PIL import Image

    src = Path(input_path)
    skipped: Counter = Counter()
    items = _folder_items(src, skipped) if src.is_dir() else _table_items(src, skipped)
    with ShardWriter(output, samples_per_shard) as writer:
        for name, image, caption in items:
            try:
                data = image if isinstance(image, bytes) else image.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
                    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format or "")
                if ext is None:  # another format PIL reads: store it re-encoded as PNG
                    ext, data = "png", _to_png(data)
            except Exception:  # noqa: BLE001 - any unreadable input image is skipped, not fatal
                skipped["decode_error"] += 1
                continue
            meta = {"caption": caption, "width": width, "height": height, "original_width": width,
                    "original_height": height, "source": name}
            writer.write(f"{writer.total:09d}", {ext: data, "txt": caption, "json": meta})
        paths = writer.close()
    return {"samples": writer.total, "shards": len(paths), "skipped": dict(skipped), "output": str(output)}


def _to_png(data: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_latents(shards: str, model: str, output: str | Path, *, resolution: int = 1024, batch_size: int = 8,
                 vae: str | None = None, dtype: str = "float32", samples_per_shard: int = 1000,
                 num_workers: int = 2, strict: bool = False, caption_keys: list[str] | None = None) -> dict:
    """Encode image shards into latent shards with this process's share (Accelerate's process index/count).
    Center crop at `resolution`; latents (times the VAE scaling factor), prompt embeddings stored fp16."""
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from distill.data.config import DataConfig
    from distill.data.wds import OnceLoader
    from distill.models import encode_images, encode_prompts, load_components

    # Without a GPU, Accelerate only treats torchrun/mpirun ranks as distributed when told cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    comps = load_components(model, vae=vae, dtype=getattr(torch, dtype), device=state.device,
                            parts=("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    cfg = DataConfig(kind="images", shards=shards, batch_size=batch_size, resolution=resolution, crop="center",
                     num_workers=num_workers, shuffle_buffer=0, strict=strict, pin_memory=False,
                     **({"caption_keys": caption_keys} if caption_keys else {}))
    loader = OnceLoader(cfg, rank=rank, world_size=world)
    scaling = comps.vae_scaling_factor
    bar = tqdm(total=loader.num_samples, unit="img", desc=f"latents rank {rank}", position=rank)
    with ShardWriter(output, samples_per_shard, suffix=f"-rank{rank:03d}") as writer:
        for batch in loader:
            latents = encode_images(comps, batch["pixels"]).to("cpu", torch.float16)
            embeds, pooled = encode_prompts(comps, batch["caption"])
            embeds = embeds.to("cpu", torch.float16)
            for i, key in enumerate(batch["key"]):
                meta = {"caption": batch["caption"][i], "original_size": batch["original_size"][i].tolist(),
                        "crop_top_left": batch["crop_top_left"][i].tolist(),
                        "target_size": batch["target_size"][i].tolist(), "source_url": batch["url"][i],
                        "model": model, "arch": comps.arch, "scaling_factor": scaling}
                files = {"latents.npy": latents[i], "prompt_embeds.npy": embeds[i], "json": meta}
                if pooled is not None:
                    files["pooled_prompt_embeds.npy"] = pooled[i].to("cpu", torch.float16)
                writer.write(key, files)
            bar.update(len(batch["key"]))
        paths = writer.close()
    bar.close()
    summary = {"rank": rank, "samples": writer.total, "shards": len(paths), "skipped": loader.counters(),
               "output": str(output)}
    Path(output, f"summary-rank{rank:03d}.json").write_text(json.dumps(summary, indent=1))
    state.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shards", help="images + captions -> WebDataset shards")
    p.add_argument("--input", required=True, help="folder of images with same-named .txt, or .jsonl/.parquet")
    p.add_argument("--output", required=True)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p = sub.add_parser("latents", help="image shards -> precomputed latent + text-embedding shards")
    p.add_argument("--shards", required=True, help="path, folder, brace pattern or pipe: URL of image shards")
    p.add_argument("--model", required=True, help="hub id or local diffusers folder (as model.pretrained)")
    p.add_argument("--output", required=True)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vae", default=None, help="VAE override, e.g. an fp16-fixed SDXL VAE for --dtype float16")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    args = parser.parse_args(argv)
    if args.command == "shards":
        summary = make_shards(args.input, args.output, args.samples_per_shard)
    else:
        summary = make_latents(args.shards, args.model, args.output, resolution=args.resolution,
                               batch_size=args.batch_size, vae=args.vae, dtype=args.dtype,
                               samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
                               strict=args.strict)
    print(json.dumps(summary))
    return 0 if summary["samples"] > 0 or args.command == "latents" else 1


if __name__ == "__main__":
    sys.exit(main())
