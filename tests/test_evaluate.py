"""The tiny world's evaluator: shipped classifier accuracy, FD behaviour, MSE and comparison grids."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from distill import evaluate
from distill.evaluate import (
    attribute_accuracy,
    features,
    frechet_distance,
    load_evaluator,
    mse_to_reference,
    real_images,
    real_reference,
    save_grid,
)


@pytest.fixture(scope="module")
def fresh():
    """Real images the classifier never saw (train split, another seed than the shards' default)."""
    return real_images(1000, "train", seed=7)


def _blur(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    w = torch.full((3, 1, k, k), 1.0 / (k * k))
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), w, groups=3)


def test_shipped_weights_classify_fresh_real_images(fresh):
    assert evaluate.ASSET.exists(), (
        "ship distill/assets/tiny/evaluator.safetensors (python -m distill.evaluate train-classifier)"
    )
    ev = load_evaluator()
    assert ev.meta["steps"] > 0 and ev.meta["heldout_accuracy"]["all"] >= 0.98
    acc = attribute_accuracy(*fresh)
    assert set(acc) == {"color", "shape", "background", "all"}
    assert acc["all"] >= 0.98, acc
    images, prompts = fresh
    assert ev.predict_captions(images[:50]) == prompts[:50]
    # Other resolutions are resized: a 2x nearest upscale is the same picture.
    assert attribute_accuracy(F.interpolate(images[:100], scale_factor=2), prompts[:100])["all"] >= 0.98


def test_permuted_prompts_score_low(fresh):
    images, prompts = fresh
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
    acc = attribute_accuracy(images, [prompts[i] for i in perm])
    assert acc["all"] < 0.15 and acc["color"] < 0.5 and acc["shape"] < 0.6, acc
    with pytest.raises(ValueError):
        attribute_accuracy(images[:2], prompts[:3])


def test_fd_small_for_real_large_for_degraded(fresh):
    images, _ = fresh
    ref = real_reference(1000)
    assert ref.shape == (1000, evaluate.FEATURE_DIM)
    assert torch.equal(ref, real_reference(1000))  # cached and deterministic
    floor = frechet_distance(features(images), ref)
    blurred = frechet_distance(features(_blur(images)), ref)
    shuffled = frechet_distance(features(images[:, [2, 0, 1]]), ref)  # red -> green -> blue -> red
    assert 0.0 < floor < blurred / 3, (floor, blurred)
    assert shuffled > 10 * floor, (floor, shuffled)


def _fd_scipy(a: np.ndarray, b: np.ndarray) -> float:
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def test_frechet_distance_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) * 2.0 + 1.5
    assert frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Identical covariances: only the mean term remains.
    assert frechet_distance(a, a + 3.0) == pytest.approx(8 * 9.0, rel=1e-6)
    # Fewer samples than dimensions: singular covariances still give a finite, non-negative value.
    fd = frechet_distance(torch.randn(5, 64), torch.randn(6, 64))
    assert np.isfinite(fd) and fd >= 0.0
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


def test_mse_to_reference_is_mean_per_sample():
    a = torch.zeros(4, 3, 8, 8)
    b = torch.zeros(4, 3, 8, 8)
    b[0] = 2.0  # one sample off by 2 everywhere: per-sample MSE 4, 0, 0, 0
    assert mse_to_reference(a, b) == pytest.approx(1.0)
    assert mse_to_reference(a, a) == 0.0
    with pytest.raises(ValueError):
        mse_to_reference(a, b[:3])


def test_save_grid_size_and_content(tmp_path, fresh):
    images = fresh[0][:6]
    cols = [images[0:2], images[2:4], images[4:6]]  # 3 columns of 2 rows
    plain = save_grid(cols, tmp_path / "plain.png", scale=4, pad=2)
    on_disk = Image.open(tmp_path / "plain.png")
    assert on_disk.size == plain.size == (3 * (128 + 2) + 2, 2 * (128 + 2) + 2)
    # Row 1, column 2 is images[5], upscaled 4x nearest.
    tile = np.asarray(on_disk.convert("RGB"))[2 + 130 : 2 + 130 + 128, 2 + 260 : 2 + 260 + 128]
    expect = ((images[5].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(tile, expect.repeat(4, axis=0).repeat(4, axis=1))

    rows = ["a red circle on a black background", "a blue square on a white background"]
    labelled = save_grid(images, tmp_path / "labelled.png", row_labels=rows, col_labels=["teacher", "4", "1"])
    w, h = labelled.size
    assert w > plain.size[0] + 100 and h > plain.size[1]  # room for prompts on the left, headers on top
    left_margin = np.asarray(labelled.convert("L"))[:, : w - plain.size[0]]
    assert left_margin.min() < 128  # text was drawn
    # A flat tensor takes its column count from col_labels.
    assert save_grid(images, tmp_path / "flat.png", col_labels=["a", "b"]).size[1] > 3 * 128


@pytest.mark.slow
def test_classifier_trains_from_scratch(tmp_path):
    model, meta = evaluate.train_classifier(steps=150, log_every=0)
    ev = evaluate.Evaluator(model, meta)
    # Chance is 1/24; the shipped 600-step run reaches 1.0, 150 steps about 0.8.
    assert ev.attribute_accuracy(*real_images(300, "heldout", 0))["all"] >= 0.7
    evaluate.save_evaluator(model, meta, tmp_path / "ev.safetensors")
    loaded = load_evaluator(tmp_path / "ev.safetensors")
    x = real_images(8, "heldout", 1)[0]
    assert torch.allclose(loaded.features(x), ev.features(x))
