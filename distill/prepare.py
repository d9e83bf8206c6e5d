"""Dataset preparation CLI.

    python -m distill.prepare shards  --input FOLDER_OR_JSONL --output DIR [--samples-per-shard N]
    python -m distill.prepare latents --shards PATTERN --model MODEL --output DIR [--resolution R] [--batch-size B]
    accelerate launch -m distill.prepare latents ...     # data-parallel: each process encodes its share
    python -m distill.prepare pairs   --model MODEL --prompts FILE_OR_SHARDS --output DIR [--steps N] [--guidance W]

`shards` packs images + captions into img2dataset-layout WebDataset shards (KEY.jpg|png|webp, KEY.txt,
KEY.json with width/height), from a folder (same-named .txt captions) or a .jsonl/.parquet of {path|image, caption}.
`latents` runs the VAE and text encoder(s) once over image shards and writes `data.kind=latents` shards
(KEY.latents.npy, KEY.prompt_embeds.npy, KEY.pooled_prompt_embeds.npy for SDXL, KEY.json), one set of
`NNNNN-rankRRR.tar` files per process. `pairs` writes teacher ODE pairs (`data.kind=pairs`): per prompt, seeded
noise (KEY.noise.npy, fp32), the teacher latent the deterministic solve with CFG reaches from it (KEY.latents.npy)
and the prompt embeddings, in the latent shards' layout; resumable (keys already in the output are skipped), any
process count, and counted (the output must hold every prompt's pair, or it fails naming the count). Each prints a
JSON summary (samples, shards, skipped counts by reason).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from distill.data.writer import ShardWriter


class PairSettingsError(ValueError):
    """A pair folder holds pairs made with other settings; `detail` says which, without the folder."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


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

PAIRS_MANIFEST, PAIRS_SUMMARY = "pairs.json", "summary.json"
PAIR_SOLVERS = ("ddim", "euler")


def pair_seed(seed: int, key: str) -> int:
    """The noise seed of the pair of sample `key`: from the key alone, so any process count, batch size or resume
    writes the same pair (and `torch.Generator().manual_seed(pair_seed(...))` redraws the noise in diffusers)."""
    from distill.batch import _mix

    return _mix(int(seed), f"pair/{key}")


def prompt_items(prompts: object, resolution: int, caption_keys: list[str] | None = None,
                 limit: int | None = None) -> tuple[list[tuple[str, str]], dict]:
    """Every (key, caption) of a prompt list or caption shards, in order (the first `limit`), and the skip counts."""
    from distill.data.config import DataConfig
    from distill.data.wds import OnceLoader

    cfg = DataConfig(kind="prompts", shards=prompts, batch_size=256, resolution=resolution, num_workers=0,
                     shuffle_buffer=0, pin_memory=False, **({"caption_keys": caption_keys} if caption_keys else {}))
    loader = OnceLoader(cfg, rank=0, world_size=1)
    items: list[tuple[str, str]] = []
    for batch in loader:
        items += list(zip(batch["key"], batch["caption"]))
        if limit is not None and len(items) >= limit:
            break
    items = items[:limit] if limit is not None else items
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ValueError(f"prompts {prompts!r}: sample key {key!r} occurs twice (several prompt lists number "
                             "their lines alike: merge them into one file, or give caption shards with unique keys)")
        seen.add(key)
    return items, {k: v for k, v in loader.counters().items() if v}


def shard_keys(output: str | Path) -> set[str]:
    """Keys of the complete pair samples in the finished shards of `output` (a killed writer's .tmp is not one)."""
    import tarfile

    keys: set[str] = set()
    for path in sorted(Path(output).glob("*.tar")):
        with tarfile.open(path) as tar:
            keys |= {n[: -len(".latents.npy")] for n in tar.getnames() if n.endswith(".latents.npy")}
    return keys


def pairs_settings(model: str, prompts: object, steps: int, guidance: float, solver: str, resolution: int,
                   seed: int, limit: int | None, states: bool = False) -> dict:
    return {"model": str(model), "prompts": prompts if isinstance(prompts, (str, list)) else str(prompts),
            "solver": solver, "steps": int(steps), "guidance": float(guidance), "resolution": int(resolution),
            "seed": int(seed), "limit": limit, "spacing": "trailing", "states": bool(states)}


def pairs_complete(output: str | Path, settings: dict) -> bool:
    """True when `output` holds a finished, counted pair set made with exactly these settings."""
    summary = Path(output) / PAIRS_SUMMARY
    if not summary.exists():
        return False
    done = json.loads(summary.read_text())
    if not done.get("complete") or {"states": False, **done.get("settings", {})} != settings:
        return False
    counted = 0
    for tar in Path(output).glob("*.tar"):
        sidecar = tar.with_name(tar.stem + "_stats.json")
        counted += json.loads(sidecar.read_text())["successes"] if sidecar.exists() else 0
    return counted == done["pairs"] + done["extra"]  # a shard deleted since: not complete any more


def make_pairs(prompts: object, model: str, output: str | Path, *, steps: int = 25, guidance: float = 5.0,
               solver: str = "ddim", resolution: int = 1024, batch_size: int = 8, seed: int = 0,
               samples_per_shard: int = 1000, limit: int | None = None, dtype: str = "float32",
               caption_keys: list[str] | None = None, unet=None, states: bool = False) -> dict:
    """Teacher ODE pairs for this process's share (every world_size-th prompt, Accelerate's process index/count):
    seeded noise (fp32), the teacher's deterministic `solver` solve from it with CFG `guidance` on `steps` trailing
    timesteps (KEY.latents.npy, fp16), and the prompt embeddings (fp16). Keys already in `output` are skipped (a
    resume, with any process count); settings that differ from the output's `pairs.json` are refused, naming them.
    Ends with a count check on the main process: every prompt's pair must be in the shards. `unet`: the teacher
    already in memory (a training run that writes its own pairs), else loaded from `model`. `states` (DDIM): also
    the solve's trajectory (KEY.states.npy (steps, C, h, w) fp16: x at each timestep it visits, from 999 down,
    before its step there; the timesteps in KEY.json), the trajectory-state data of MLCM-style training."""
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from distill.batch import prompt_cond
    from distill.diffusion import Fp32Io, NoiseSchedule, inference_timesteps, sample_teacher, seeded_noise
    from distill.methods.discriminator import latent_side
    from distill.models import load_components

    if solver not in PAIR_SOLVERS:
        raise ValueError(f"pairs solver={solver!r}: expected one of {PAIR_SOLVERS} (deterministic solves)")
    if steps < 1:
        raise ValueError(f"pairs steps={steps} must be >= 1")
    if states and solver != "ddim":
        raise ValueError(f"pairs with states record the DDIM path: solver={solver!r}")
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    out = Path(output)
    settings = pairs_settings(model, prompts, steps, guidance, solver, resolution, seed, limit, states)
    manifest = out / PAIRS_MANIFEST
    solve = {k: v for k, v in settings.items() if k != "limit"}  # what every pair of the folder shares
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            manifest.write_text(json.dumps(solve, indent=1))
    state.wait_for_everyone()
    old = {"states": False, **json.loads(manifest.read_text())}  # folders written before states existed have none
    changed = sorted(k for k in set(old) | set(solve) if old.get(k) != solve.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {solve.get(k)!r} now" for k in changed)
        raise PairSettingsError(f"{out} holds pairs made with other settings ({diff}): give a new --output, or the "
                                "same settings to resume", detail=f"holds pairs made with other settings ({diff})")
    items, skipped = prompt_items(prompts, resolution, caption_keys, limit)
    for tmp in out.glob(f"*-rank{rank:03d}.tar.tmp"):  # this rank's shard a killed run left half-written
        tmp.unlink()
    done = shard_keys(out)
    mine = [it for i, it in enumerate(items) if i % world == rank and it[0] not in done]
    parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") + (() if unet is not None else ("unet",))
    comps = load_components(model, dtype=getattr(torch, dtype), device=state.device, parts=parts)
    unet = (unet if unet is not None else comps.unet).eval()
    schedule = NoiseSchedule.from_config(comps.scheduler_config)
    shape = (int(unet.config.in_channels), latent_side(comps, resolution), latent_side(comps, resolution))
    visited = inference_timesteps(steps, "trailing", schedule.num_train_timesteps, schedule.steps_offset, "ddim").tolist()
    indices = [int(p.name.split("-")[0]) for p in out.glob(f"*-rank{rank:03d}.tar")]
    bar = tqdm(total=len(mine), unit="pair", desc=f"pairs rank {rank}", position=rank)
    t0, written = time.time(), 0
    with ShardWriter(out, samples_per_shard, suffix=f"-rank{rank:03d}", start_index=max(indices, default=-1) + 1) \
            as writer, torch.no_grad():
        for i in range(0, len(mine), batch_size):
            chunk = mine[i: i + batch_size]
            keys, caps = [k for k, _ in chunk], [c for _, c in chunk]
            seeds = [pair_seed(seed, k) for k in keys]
            noise = seeded_noise(seeds, (len(keys), *shape), state.device, torch.float32)
            cond = prompt_cond(comps, caps, resolution, state.device)
            path: list | None = [] if states else None
            lat = sample_teacher(Fp32Io(unet), noise, cond, cond.zeros_like(), schedule, steps, solver, guidance,
                                 "trailing", states=path)
            for j, key in enumerate(keys):
                meta = {"caption": caps[j], "original_size": [resolution, resolution], "crop_top_left": [0, 0],
                        "target_size": [resolution, resolution], "model": str(model), "arch": comps.arch,
                        "scaling_factor": comps.vae_scaling_factor,
                        "pair": {"solver": solver, "steps": steps, "guidance": guidance, "seed": seeds[j]}}
                files = {"noise.npy": noise[j].cpu(), "latents.npy": lat[j].to("cpu", torch.float16),
                         "prompt_embeds.npy": cond.encoder_hidden_states[j].to("cpu", torch.float16),
                         "txt": caps[j], "json": meta}
                if cond.text_embeds is not None:
                    files["pooled_prompt_embeds.npy"] = cond.text_embeds[j].to("cpu", torch.float16)
                if path is not None:
                    files["states.npy"] = torch.stack([x[j] for x in path]).to("cpu", torch.float16)
                    meta["pair"]["state_timesteps"] = [int(t) for t in visited]
                writer.write(key, files)
            written += len(keys)
            bar.update(len(keys))
    bar.close()
    seconds = time.time() - t0
    state.wait_for_everyone()
    summary = {"rank": rank, "written": written, "seconds": round(seconds, 2),
               "pairs_per_s": round(written / seconds, 3) if written else None, "skipped": skipped,
               "output": str(out)}
    if state.is_main_process:
        have, want = shard_keys(out), {k for k, _ in items}
        missing = want - have
        summary.update(pairs=len(have & want), expected=len(want), extra=len(have - want), complete=not missing,
                       settings=settings)
        (out / PAIRS_SUMMARY).write_text(json.dumps(summary, indent=1))
        if missing:
            raise RuntimeError(f"pairs count check failed in {out}: {len(have & want)} of {len(want)} prompts have "
                               f"a pair (first missing key: {sorted(missing)[0]!r}); run the same command again "
                               "to write the rest")
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
    p = sub.add_parser("pairs", help="prompts -> teacher ODE pairs (noise, teacher latent, embeddings) shards")
    p.add_argument("--model", required=True, help="the teacher: hub id or local diffusers folder")
    p.add_argument("--prompts", required=True, help="a .txt / .jsonl prompt list or caption shards (as data.shards)")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=25, help="solver steps (trailing timesteps)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale of the solve")
    p.add_argument("--solver", default="ddim", choices=list(PAIR_SOLVERS))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the set (each pair's from it and its key)")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--states", action="store_true", help="also store the DDIM path (trajectory-state data, MLCM)")
    args = parser.parse_args(argv)
    if args.command == "pairs":
        summary = make_pairs(args.prompts, args.model, args.output, steps=args.steps, guidance=args.guidance,
                             solver=args.solver, resolution=args.resolution, batch_size=args.batch_size,
                             seed=args.seed, samples_per_shard=args.samples_per_shard, limit=args.limit,
                             dtype=args.dtype, states=args.states)
        print(json.dumps(summary))
        return 0
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
