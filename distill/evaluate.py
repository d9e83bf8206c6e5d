"""Tiny-world evaluation: a shipped attribute classifier, its features for a Frechet distance, and grids.

The classifier (a small BatchNorm CNN, 64-d penultimate features, one head per attribute) is trained on images
from `distill.data.synthetic.generate` and shipped in distill/assets/tiny/evaluator.safetensors. It serves two
metrics that must be read together (references/tiny-world-prototype.md: FD alone rewarded a student that
smoothed away the teacher's noise while following prompts worse):
- attribute accuracy: does the image show the prompt's colour, shape and background;
- Frechet distance between feature Gaussians (FID's formula, Heusel et al. 2017, on this classifier's
  features).

    python -m distill.evaluate train-classifier [--steps N] [--out PATH]  # retrain the shipped weights
    python -m distill.evaluate report [--n 1000]  # accuracy and the real-vs-real FD floor

Images everywhere are float tensors (N, 3, H, W) in [-1, 1], as the diffusion code produces them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from distill.data.synthetic import ATTRIBUTES, RESOLUTION, caption, generate_batch, parse_caption

ASSET = Path(__file__).parent / "assets" / "tiny" / "evaluator.safetensors"
FEATURE_DIM = 64


class Classifier(nn.Module):
    """conv-BN-ReLU stack 32 -> 16 -> 8 -> 4, global average pool, a 64-d feature layer, one linear head per
    attribute. About 80k parameters: a few hundred KB shipped and ~2 ms per 100 images on one CPU thread."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 32, 64, 64), feature_dim: int = FEATURE_DIM):
        super().__init__()
        strides = (1, 2, 1, 2, 2)
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, stride in zip(widths, strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x in [-1, 1], (N, 3, 32, 32) -> (features (N, 64), {attribute: logits})."""
        h = self.body(x).mean(dim=(2, 3))
        f = self.feature(h)
        return f, {k: head(f) for k, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def labels(prompts: list[str]) -> dict[str, Tensor]:
    """Class indices of each attribute for a list of tiny-world captions."""
    parsed = [parse_caption(p) for p in prompts]
    return {k: torch.tensor([v.index(a[k]) for a in parsed]) for k, v in ATTRIBUTES.items()}


class Evaluator:
    """The trained classifier in eval mode, with the metrics that need it."""

    def __init__(self, model: Classifier, meta: dict | None = None):
        self.model = model.eval()
        self.meta = meta or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prep(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32).clamp(-1.0, 1.0)  # decoded images get clipped when saved
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(
                x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False
            )
        return x

    @torch.no_grad()
    def _run(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, dict[str, Tensor]]:
        feats, logits = [], {k: [] for k in ATTRIBUTES}
        for chunk in images.split(batch_size):
            f, out = self.model(self._prep(chunk))
            feats.append(f.cpu())
            for k in ATTRIBUTES:
                logits[k].append(out[k].cpu())
        return torch.cat(feats), {k: torch.cat(v) for k, v in logits.items()}

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features (N, 64), float32 on CPU."""
        return self._run(images)[0]

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Predicted class index per attribute (index into ATTRIBUTES[attribute])."""
        return {k: v.argmax(dim=1) for k, v in self._run(images)[1].items()}

    def predict_captions(self, images: Tensor) -> list[str]:
        """The caption the classifier reads in each image."""
        pred = self.predict(images)
        return [caption({k: ATTRIBUTES[k][int(pred[k][i])] for k in ATTRIBUTES}) for i in range(len(images))]

    def attribute_accuracy(self, images: Tensor, prompts: list[str]) -> dict[str, float]:
        """Fraction of images showing each attribute of their prompt, and "all" (all three right)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pred, true = self.predict(images), labels(prompts)
        right = {k: pred[k] == true[k] for k in ATTRIBUTES}
        acc = {k: v.float().mean().item() for k, v in right.items()}
        acc["all"] = torch.stack(list(right.values())).all(dim=0).float().mean().item()
        return acc


def train_classifier(
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 1234,
    log_every: int = 100,
    noise: float = 0.0,
) -> tuple[Classifier, dict]:
    """Train on fresh images from the "evaluator" split (never the train or heldout splits) for `steps` steps.

    `noise` > 0 adds Gaussian noise (sigma up to `noise`, [-1, 1] units) to half of each batch. Off by
    default: measured, 0.15 made the features (and so FD) ~3x less sensitive to noise and blur, while the
    clean-trained classifier already reads images with sigma 0.2 noise or a 3x3 blur without an error.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        imgs, attrs = generate_batch(range(step * batch_size, (step + 1) * batch_size), seed, "evaluator")
        x = to_tensor(imgs)
        sigma = (
            torch.rand(batch_size, 1, 1, 1, generator=gen)
            * noise
            * (torch.rand(batch_size, 1, 1, 1, generator=gen) < 0.5)
        )
        x = x + sigma * torch.randn(x.shape, generator=gen)
        y = labels([caption(a) for a in attrs])
        _, logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    meta = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "noise": noise,
        "seed": seed,
        "train_seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "feature_dim": FEATURE_DIM,
        "attributes": ATTRIBUTES,
    }
    return model, meta


def save_evaluator(model: Classifier, meta: dict, path: str | Path = ASSET) -> None:
    """Weights as safetensors (metadata inside too) and the metadata beside it as JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"meta": json.dumps(meta)})
    path.chmod(0o644)  # save_file creates 0600; others read the shipped asset
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> Evaluator:
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        print(f"{p} is missing: training the evaluator (python -m distill.evaluate train-classifier)")
        model, meta = train_classifier()
        save_evaluator(model, meta, p)
    model = Classifier()
    model.load_state_dict(load_file(str(p)))
    with safe_open(str(p), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return Evaluator(model.to(device), meta)


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """The shipped evaluator (cached per path and device); trains and saves it first if the file is
    missing."""
    return _load(str(path or ASSET), str(device))


def features(images: Tensor, evaluator: Evaluator | None = None) -> Tensor:
    """64-d classifier features of images (N, 3, H, W) in [-1, 1]."""
    return (evaluator or load_evaluator()).features(images)


def attribute_accuracy(
    images: Tensor, prompts: list[str], evaluator: Evaluator | None = None
) -> dict[str, float]:
    """{"color", "shape", "background", "all"}: fraction of images whose classified attribute matches the
    prompt ("all": all three)."""
    return (evaluator or load_evaluator()).attribute_accuracy(images, prompts)


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2) (FID's formula, float64).

    tr((S_a S_b)^1/2) is computed as the trace of the square root of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2, by eigenvalues clipped at zero: real and stable for singular covariances, unlike a
    general sqrtm.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets with equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def real_images(n: int, split: str = "heldout", seed: int = 0) -> tuple[Tensor, list[str]]:
    """Samples 0..n-1 of a split of the tiny world, as (float images in [-1, 1], captions).

    Identical to the images in the shards `python -m distill.data.synthetic --seed SEED` writes for that
    split.
    """
    imgs, attrs = generate_batch(range(n), seed, split)
    return to_tensor(imgs), [caption(a) for a in attrs]


@functools.lru_cache(maxsize=8)
def _reference(n: int, split: str, seed: int, path: str) -> Tensor:
    return load_evaluator(path).features(real_images(n, split, seed)[0])


def real_reference(
    n: int = 2000, split: str = "heldout", seed: int = 0, evaluator_path: str | Path | None = None
) -> Tensor:
    """Features (n, 64) of the first n real images of `split` (cached in memory): the FD reference set."""
    return _reference(n, split, seed, str(evaluator_path or ASSET)).clone()


def mse_to_reference(a: Tensor, b: Tensor) -> float:
    """Mean over samples of the per-sample pixel MSE between paired images (e.g. a student's sample and the
    teacher's ODE solution from the same noise and prompt), in the images' own units ([-1, 1])."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).mean().item()


def save_grid(
    images: Tensor | list[Tensor],
    path: str | Path,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 4,
    pad: int = 2,
) -> Image.Image:
    """Save a labelled grid of images (in [-1, 1]) as PNG and return it.

    `images` is either one tensor (rows * cols, 3, H, W) in row-major order (cols from col_labels, else from
    row_labels, else a near-square grid) or a list of columns, each (rows, 3, H, W), e.g. one column per model
    with the same prompts and noise in every row. Images are upscaled `scale`x nearest so pixels stay visible.
    """
    if isinstance(images, (list, tuple)):
        rows, cols = len(images[0]), len(images)
        cells = torch.stack(list(images), dim=1).flatten(0, 1)  # row-major
    else:
        n = len(images)
        cols = (
            len(col_labels)
            if col_labels
            else (math.ceil(n / len(row_labels)) if row_labels else math.ceil(math.sqrt(n)))
        )
        rows, cells = math.ceil(n / cols), images
    arr = (
        ((cells.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .numpy()
    )
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    left = max((size(t)[0] for t in row_labels), default=0) + 2 * pad + 4 if row_labels else 0
    top = max((size(t)[1] for t in col_labels), default=0) + 2 * pad + 4 if col_labels else 0
    grid = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), (200, 200, 200))
    draw = ImageDraw.Draw(grid)
    for i, cell in enumerate(arr):
        r, c = divmod(i, cols)
        tile = Image.fromarray(cell).resize((w, h), Image.NEAREST)
        grid.paste(tile, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text(
            (pad, top + pad + r * (h + pad) + (h - size(text)[1]) // 2), text, fill=(0, 0, 0), font=font
        )
    for c, text in enumerate(col_labels or []):
        draw.text(
            (left + pad + c * (w + pad) + max(0, (w - size(text)[0]) // 2), pad),
            text,
            fill=(0, 0, 0),
            font=font,
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def report(n: int = 1000, n_ref: int = 2000, seed: int = 0) -> dict:
    """Held-out accuracy of the shipped evaluator and the real-vs-real FD floor (n fresh train-split images
    against the n_ref held-out reference): the best FD any generator can reach at these sample sizes."""
    ev = load_evaluator()
    ref_imgs, ref_prompts = real_images(n_ref, "heldout", seed)
    fresh = real_images(n, "train", seed + 1)[0]
    ref = real_reference(n_ref, "heldout", seed)
    return {
        "heldout_accuracy": ev.attribute_accuracy(ref_imgs, ref_prompts),
        "fd_floor": frechet_distance(ev.features(fresh), ref),
        "n": n,
        "n_ref": n_ref,
        "fd_floor_same_n": frechet_distance(ev.features(fresh), ref[:n]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Tiny-world evaluator: train the classifier or report its numbers."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-classifier", help="train the attribute classifier and save its weights")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--noise", type=float, default=0.0, help="max Gaussian noise sigma on half of each batch")
    t.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 leaves the other cores to training)"
    )
    t.add_argument("--out", default=str(ASSET))
    r = sub.add_parser("report", help="held-out accuracy and the real-vs-real FD floor")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--n-ref", type=int, default=2000)
    args = p.parse_args(argv)
    if args.cmd == "train-classifier":
        torch.set_num_threads(args.threads)
        model, meta = train_classifier(args.steps, args.batch_size, seed=args.seed, noise=args.noise)
        imgs, prompts = real_images(2000, "heldout", 0)
        meta["heldout_accuracy"] = Evaluator(model, meta).attribute_accuracy(imgs, prompts)
        save_evaluator(model, meta, args.out)
        print(json.dumps(meta["heldout_accuracy"]), "->", args.out)
    else:
        print(json.dumps(report(args.n, args.n_ref), indent=1))


if __name__ == "__main__":
    main()
