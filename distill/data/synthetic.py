"""The tiny world: 32x32 images of one coloured shape on a plain background, with exact captions.

24 prompts ("a {color} {shape} on a {bg} background"), rendered with numpy in about 0.1 ms each. Every sample
is a pure function of (index, seed, split), so a sample can be regenerated anywhere (the evaluator's real
reference, a test, a shard) without storing it. The world is deliberately easy (large shapes, saturated
colours, two backgrounds): the prototype (references/tiny-world-prototype.md) showed that a CPU-trained
teacher does not learn shape in a harder world, and then the student's prompt-following cannot be measured.

    python -m distill.data.synthetic --out DIR [--train N] [--heldout M] [--seed S] [--samples-per-shard K]

writes WebDataset shards DIR/{train,heldout}/00000.tar ... in img2dataset's layout
(KEY.png, KEY.txt, KEY.json).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 32
SUPERSAMPLE = 4  # anti-aliasing: render at 4x, average 4x4 blocks
SIZE_RANGE = (7.0, 11.0)  # radius (circle) or half-side (square, triangle), pixels
COLOR_JITTER = 0.05

# Order matters: it is the class index of the evaluator's heads (distill/evaluate.py).
ATTRIBUTES: dict[str, list[str]] = {
    "color": ["red", "green", "blue", "yellow"],
    "shape": ["circle", "square", "triangle"],
    "background": ["black", "white"],
}
# RGB in [0, 1]; chosen far apart so a colour stays recognisable after jitter and on either background.
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}
# Splits draw from disjoint random streams of the same seed.
SPLITS: dict[str, int] = {"train": 0, "heldout": 1, "evaluator": 2, "reward": 3}

_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")

# Supersampled pixel-centre coordinates in output-pixel units (computed once: the same for every image).
_ss = (np.arange(RESOLUTION * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
_X, _Y = np.meshgrid(_ss, _ss)


def caption(attrs: dict) -> str:
    """The exact caption of a sample: "a {color} {shape} on a {background} background"."""
    return f"a {attrs['color']} {attrs['shape']} on a {attrs['background']} background"


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of `caption`: {"color", "shape", "background"}. Raises ValueError for any other text."""
    m = _CAPTION_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not a tiny-world caption: {text!r}")
    attrs = dict(zip(("color", "shape", "background"), m.groups()))
    for key, value in attrs.items():
        if value not in ATTRIBUTES[key]:
            raise ValueError(f"unknown {key} {value!r} in caption {text!r}")
    return attrs


# All 24 prompts, colour-major; handy for fixed evaluation prompt lists.
PROMPTS: list[str] = [
    caption({"color": c, "shape": s, "background": b})
    for c in ATTRIBUTES["color"]
    for s in ATTRIBUTES["shape"]
    for b in ATTRIBUTES["background"]
]


def _coverage(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction of each output pixel covered by the shape (supersampled inside-test, then box-averaged)."""
    dx, dy = _X - cx, _Y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        # Apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r): the square's bounding box,
        # so shape is the only thing that differs. |dx| <= (dy + r) / 2 are the two slanted edges.
        inside = (dy <= r) & (2.0 * np.abs(dx) <= dy + r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    n = RESOLUTION
    return inside.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def generate(index: int, seed: int, split: str = "train") -> tuple[np.ndarray, dict]:
    """Render sample `index` of `split` for `seed`: (uint8 image of shape (32, 32, 3), attrs).

    attrs holds "color", "shape", "background" (the caption's words) and the geometry ("size", "cx", "cy").
    Deterministic: the same (index, seed, split) gives the same bytes on every machine.
    """
    rng = np.random.default_rng([seed, SPLITS[split], index])
    color = ATTRIBUTES["color"][rng.integers(len(ATTRIBUTES["color"]))]
    shape = ATTRIBUTES["shape"][rng.integers(len(ATTRIBUTES["shape"]))]
    background = ATTRIBUTES["background"][rng.integers(len(ATTRIBUTES["background"]))]
    r = float(rng.uniform(*SIZE_RANGE))
    # Centre jitter keeps the whole bounding box (and a 1 px margin) inside the image.
    cx, cy = (float(v) for v in rng.uniform(r + 1.0, RESOLUTION - 1.0 - r, size=2))
    fg = np.clip(np.asarray(COLOR_RGB[color]) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0.0, 1.0)
    bg = np.clip(
        np.asarray(BACKGROUND_RGB[background]) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0.0, 1.0
    )
    alpha = _coverage(shape, cx, cy, r)[..., None]
    img = alpha * fg.astype(np.float32) + (1.0 - alpha) * bg.astype(np.float32)
    img = np.rint(img * 255.0).astype(np.uint8)
    attrs = {"color": color, "shape": shape, "background": background, "size": r, "cx": cx, "cy": cy}
    return img, attrs


def generate_batch(
    indices: range | list[int], seed: int, split: str = "train"
) -> tuple[np.ndarray, list[dict]]:
    """`generate` for many indices: (uint8 array (N, 32, 32, 3), list of attrs)."""
    out = [generate(int(i), seed, split) for i in indices]
    return np.stack([img for img, _ in out]), [a for _, a in out]


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime/owner so the same arguments give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_split(
    out_dir: str | Path, split: str, n: int, seed: int, samples_per_shard: int = 1000
) -> list[Path]:
    """Write samples 0..n-1 of `split` as shards out_dir/00000.tar, ... and return their paths.

    Each sample is KEY.png, KEY.txt (the caption) and KEY.json ({"width", "height", "caption", "color",
    "shape", "background"} plus "index", "seed", "split" to regenerate it). KEY is the 9-digit sample index.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, n, samples_per_shard)):
        path = out_dir / f"{shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + samples_per_shard, n)):
                img, attrs = generate(i, seed, split)
                key = f"{i:09d}"
                meta = {
                    "width": RESOLUTION,
                    "height": RESOLUTION,
                    "caption": caption(attrs),
                    "color": attrs["color"],
                    "shape": attrs["shape"],
                    "background": attrs["background"],
                    "index": i,
                    "seed": seed,
                    "split": split,
                }
                _add(tar, f"{key}.png", _png_bytes(img))
                _add(tar, f"{key}.txt", caption(attrs).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        tmp.replace(path)  # a killed run never leaves a truncated shard under the final name
        paths.append(path)
    return paths


def write_prompts(path: Path, shards: list[Path]) -> None:
    """The captions of `shards`, one per line in sample order (data/tiny_world_prompts.yaml reads it)."""
    lines = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            lines += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def brace_pattern(paths: list[Path]) -> str:
    """WebDataset brace pattern covering consecutive shards, e.g. DIR/train/{00000..00019}.tar."""
    if len(paths) == 1:
        return str(paths[0])
    return str(paths[0].parent / f"{{{paths[0].stem}..{paths[-1].stem}}}.tar")


# configs/data/tiny_world.yaml's shards under $DISTILL_DATA (default data/): what `make data` writes.
DEFAULT_SHARDS = "tiny_world/train/{00000..00019}.tar"
PROMPTS_FILE = "train_prompts.txt"  # tiny_world/train_prompts.txt: the train split's captions
DEFAULT_PROMPTS = "tiny_world/" + PROMPTS_FILE


def ensure_default_shards(shards: object) -> bool:
    """Write the tiny world (exactly `make data`'s seeded content) on first use when `shards` is the embedded
    default's location and a shard is missing, so `train.py +experiment=lcm_lora_tiny` works on a fresh clone.
    The prompt list (`tiny_world/train_prompts.txt`) is written from the shards when only it is missing.
    Processes that start together (accelerate launch) serialise on a file lock: the first writes, the others
    wait and then find the shards. Returns True when this process wrote them."""
    if not isinstance(shards, str):
        return False
    prompts = shards == DEFAULT_PROMPTS or shards.endswith("/" + DEFAULT_PROMPTS)
    if prompts:
        root = Path(shards).parent  # DIR/tiny_world
    elif shards == DEFAULT_SHARDS or shards.endswith("/" + DEFAULT_SHARDS):
        root = Path(shards).parent.parent
    else:
        return False

    def done() -> bool:
        return _complete(root) and (not prompts or (root / PROMPTS_FILE).exists())

    if done():
        return False
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".tiny_world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if done():
            return False
        if _complete(root):  # the shards are there (an older `make data`): only the prompt list is missing
            write_prompts(root / PROMPTS_FILE, [root / "train" / f"{i:05d}.tar" for i in range(20)])
            return True
        print(f"distill: the tiny world's shards are missing: writing them to {root} "
              "(once, seeded, as `make data`; about 20 s)", flush=True)
        main(["--out", str(root)])
        (root / ".done").touch()  # the Makefile's stamp: `make data` then skips it
    return True


def _complete(root: Path) -> bool:
    return all((root / "train" / f"{i:05d}.tar").exists() for i in range(20))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the tiny world as WebDataset shards (train and heldout).")
    p.add_argument("--out", required=True, help="output folder; gets train/ and heldout/")
    p.add_argument("--train", type=int, default=20000, help="number of training images")
    p.add_argument("--heldout", type=int, default=2000, help="number of held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    out = Path(args.out)
    info = {
        "seed": args.seed,
        "resolution": RESOLUTION,
        "samples_per_shard": args.samples_per_shard,
        "splits": {},
    }
    for split, n in (("train", args.train), ("heldout", args.heldout)):
        if n <= 0:
            continue
        paths = write_split(out / split, split, n, args.seed, args.samples_per_shard)
        info["splits"][split] = {"samples": n, "shards": brace_pattern(paths)}
        if split == "train":  # the prompt list of data-free methods (data.kind=prompts): line i = sample i's caption
            write_prompts(out / PROMPTS_FILE, paths)
        print(f"{split}: {n} samples in {len(paths)} shards: {brace_pattern(paths)}")
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
