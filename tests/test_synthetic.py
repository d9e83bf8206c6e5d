"""The tiny world: deterministic rendering, images that show their caption, and readable WebDataset shards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import webdataset as wds

from distill.data import synthetic
from distill.data.synthetic import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOR_RGB,
    PROMPTS,
    RESOLUTION,
    caption,
    generate,
    parse_caption,
)


def test_generation_is_deterministic_and_seeded():
    a, attrs_a = generate(17, seed=3)
    b, attrs_b = generate(17, seed=3)
    assert a.dtype == np.uint8 and a.shape == (RESOLUTION, RESOLUTION, 3)
    assert np.array_equal(a, b) and attrs_a == attrs_b
    # Another index, seed or split is another sample.
    assert not np.array_equal(a, generate(18, seed=3)[0])
    assert not np.array_equal(a, generate(17, seed=4)[0])
    assert not np.array_equal(a, generate(17, seed=3, split="heldout")[0])


def _nearest(rgb: np.ndarray, table: dict[str, tuple[float, float, float]]) -> str:
    return min(table, key=lambda k: float(((rgb - np.asarray(table[k])) ** 2).sum()))


def test_images_show_their_caption_attributes():
    seen, antialiased = set(), 0
    for i in range(200):
        img, attrs = generate(i, seed=0)
        seen.add(caption(attrs))
        assert parse_caption(caption(attrs)) == {k: attrs[k] for k in ATTRIBUTES}
        lo, hi = synthetic.SIZE_RANGE
        assert lo <= attrs["size"] <= hi
        # The shape's centre pixel has the caption's colour; the corner is outside every shape, so background.
        centre = img[int(attrs["cy"]), int(attrs["cx"])] / 255.0
        assert _nearest(centre, COLOR_RGB) == attrs["color"]
        assert np.abs(centre - COLOR_RGB[attrs["color"]]).max() <= synthetic.COLOR_JITTER + 0.01
        assert _nearest(img[0, 0] / 255.0, BACKGROUND_RGB) == attrs["background"]
        # Anti-aliased: edge pixels lie strictly between the two colours (unless a square's edges happen to
        # fall between supersamples on all four sides, about 1 in 256).
        antialiased += len(np.unique(img.reshape(-1, 3), axis=0)) > 2
    assert antialiased >= 190
    assert len(seen) == 24  # 200 samples cover all prompts


@pytest.mark.parametrize("shape,area", [("circle", math.pi), ("square", 4.0), ("triangle", 2.0)])
def test_shape_coverage_matches_geometry(shape: str, area: float):
    r, cx, cy = 9.0, 15.3, 16.1
    alpha = synthetic._coverage(shape, cx, cy, r)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert alpha.sum() == pytest.approx(area * r * r, rel=0.02)
    assert alpha[int(cy), int(cx)] == 1.0
    # The triangle points up: its top half holds less of the shape than its bottom half.
    top, bottom = alpha[: int(cy)].sum(), alpha[int(cy) :].sum()
    assert (top < 0.5 * bottom) if shape == "triangle" else (top == pytest.approx(bottom, rel=0.15))


def test_caption_round_trip_and_rejects_other_text():
    assert len(PROMPTS) == len(set(PROMPTS)) == 24
    assert PROMPTS[0] == "a red circle on a black background"
    for p in PROMPTS:
        assert caption(parse_caption(p)) == p
    for bad in [
        "",
        "a purple circle on a black background",
        "a red circle on black",
        "a red hexagon on a white background",
    ]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_shards_written_and_readable_with_webdataset(tmp_path):
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--train",
            "25",
            "--heldout",
            "7",
            "--samples-per-shard",
            "10",
            "--seed",
            "5",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == ["00000.tar"]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["splits"]["train"]["shards"] == str(tmp_path / "train" / "{00000..00002}.tar")

    for split, n in (("train", 25), ("heldout", 7)):
        ds = wds.WebDataset(info["splits"][split]["shards"], shardshuffle=False).decode("pil")
        samples = list(ds)
        assert len(samples) == n
        for s in samples:
            meta = s["json"]
            assert {"width", "height", "caption", "color", "shape", "background"} <= set(meta)
            assert s["txt"] == meta["caption"] == caption(meta)
            assert s["png"].size == (meta["width"], meta["height"]) == (RESOLUTION, RESOLUTION)
            # The stored sample regenerates exactly from its index, seed and split (PNG is lossless).
            img, attrs = generate(meta["index"], meta["seed"], meta["split"])
            assert meta["split"] == split and int(s["__key__"]) == meta["index"]
            assert np.array_equal(np.asarray(s["png"].convert("RGB")), img)
            assert caption(attrs) == meta["caption"]
