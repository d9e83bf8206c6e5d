"""`python -m distill.prepare`: images + captions -> shards -> loader, and image shards -> latent shards."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import DataConfig, ShardWriter, build_loader
from distill.prepare import main, make_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image(i: int, w: int = 20, h: int = 12) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8))


def _loaded(out, n: int, **kw) -> list[dict]:
    base = {"shards": str(out), "batch_size": 1, "resolution": 8, "num_workers": 0, "pin_memory": False}
    cfg = DataConfig(**{**base, **kw})
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    return [next(loader) for _ in range(n)]


def test_shards_round_trip_from_folder(tmp_path, capsys):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        folder = src / "sub" if i % 2 else src
        _image(i).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
        (folder / f"img{i}.txt").write_text(f"caption {i}\n")
    _image(9).save(src / "nocaption.png")
    (src / "broken.png").write_bytes(b"garbage")
    (src / "broken.txt").write_text("never loaded")

    assert main(["shards", "--input", str(src), "--output", str(tmp_path / "out"), "--samples-per-shard", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["shards"] == 3
    assert summary["skipped"] == {"missing_caption": 1, "decode_error": 1}
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert {n.split(".", 1)[1] for n in names} >= {"json", "txt"} and meta["width"] == 20 and meta["height"] == 12
    assert json.loads((tmp_path / "out" / "00002_stats.json").read_text())["successes"] == 1

    batches = _loaded(tmp_path / "out", 5)
    assert sorted(b["caption"][0] for b in batches) == [f"caption {i}" for i in range(5)]
    assert all(b["original_size"].tolist() == [[12, 20]] for b in batches)


def test_shards_from_jsonl(tmp_path):
    for i in range(3):
        _image(i).save(tmp_path / f"{i}.png")
    rows = [{"path": f"{i}.png", "caption": f"c{i}"} for i in range(3)] + [{"path": "0.png"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = make_shards(tmp_path / "list.jsonl", tmp_path / "out")
    assert summary["samples"] == 3 and summary["skipped"] == {"missing_caption": 1}
    assert sorted(b["caption"][0] for b in _loaded(tmp_path / "out", 3)) == ["c0", "c1", "c2"]


@pytest.mark.timeout(300)
def test_latents_precompute_matches_online_encoding(tmp_path, capsys):
    from distill.models import encode_images, encode_prompts, load_components

    with ShardWriter(tmp_path / "img", 3) as w:
        for i in range(5):
            w.write(f"k{i}", {"png": _image(i, 40, 24), "txt": f"a red circle {i}"})
    assert main(["latents", "--shards", str(tmp_path / "img"), "--model", "distill:random-sdxl", "--output",
                 str(tmp_path / "lat"), "--resolution", "32", "--batch-size", "2", "--num-workers", "1",
                 "--samples-per-shard", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 5
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.tar")) == ["00000-rank000.tar", "00001-rank000.tar"]

    cfg = DataConfig(kind="latents", shards=str(tmp_path / "lat"), batch_size=5, num_workers=0, pin_memory=False)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    assert batch["latents"].dtype == torch.float16 and batch["pooled_prompt_embeds"] is not None
    assert batch["original_size"].tolist() == [[24, 40]] * 5 and batch["target_size"].tolist() == [[32, 32]] * 5

    comps = load_components("distill:random-sdxl", parts=("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                           "tokenizer_2"))
    images = _loaded(tmp_path / "img", 5, resolution=32)
    by_key = {b["key"][0]: b for b in images}
    pixels = torch.cat([by_key[k]["pixels"] for k in batch["key"]])
    want = encode_images(comps, pixels)
    torch.testing.assert_close(batch["latents"].float(), want, atol=2e-3, rtol=2e-3)
    embeds, pooled = encode_prompts(comps, batch["caption"])
    assert batch["prompt_embeds"].shape == embeds.shape
    torch.testing.assert_close(batch["pooled_prompt_embeds"].float(), pooled, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_latents_data_parallel_two_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    with ShardWriter(tmp_path / "img", 3) as w:
        for i in range(7):
            w.write(f"k{i}", {"png": _image(i), "txt": f"c{i}"})
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "distill.prepare", "latents", "--shards",
                    str(tmp_path / "img"), "--model", "distill:random-sd15", "--output", str(tmp_path / "lat"),
                    "--resolution", "16", "--batch-size", "2", "--num-workers", "0"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    per_rank = [json.loads((tmp_path / "lat" / f"summary-rank{r:03d}.json").read_text())["samples"] for r in (0, 1)]
    assert all(n > 0 for n in per_rank) and sum(per_rank) == 7
    cfg = DataConfig(kind="latents", shards=str(tmp_path / "lat"), batch_size=7, num_workers=0, pin_memory=False)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    assert sorted(batch["key"]) == [f"k{i}" for i in range(7)]
    assert "pooled_prompt_embeds" not in batch  # SD 1.5 has no pooled embedding
