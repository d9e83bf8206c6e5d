"""The WebDataset training loader on real shards written here with PIL + tarfile (no writer helper involved)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from distill.data import DataConfig, DataError, build_loader


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, sizes: list[int], hw: tuple[int, int] = (12, 20)) -> str:
    """Shards of small images; sample key "SSIII" and caption "cap SSIII"; returns a brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"{s:02d}{i:03d}"
            img = np.full((*hw, 3), (s * 37 + i * 11) % 256, np.uint8)
            samples.append((key, {"png": _png(img), "txt": f"cap {key}".encode()}))
        write_tar(root / f"{s:05d}.tar", samples)
    return str(root / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def all_keys(sizes: list[int]) -> list[str]:
    return sorted(f"{s:02d}{i:03d}" for s, n in enumerate(sizes) for i in range(n))


def cfg_for(shards: str, **kw) -> DataConfig:
    base = {"shards": shards, "batch_size": 2, "resolution": 8, "num_workers": 2, "pin_memory": False}
    return DataConfig(**{**base, **kw})


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def epoch_keys(cfg: DataConfig, world: int, seed: int = 0, epochs: int = 1) -> tuple[list[list[str]], list[int]]:
    """Keys each rank sees in `epochs` epochs, and each rank's batches per epoch."""
    keys, lengths = [], []
    for rank in range(world):
        loader = build_loader(cfg, rank=rank, world_size=world, seed=seed)
        lengths.append(loader.batches_per_epoch)
        got = []
        for _ in range(epochs):
            for batch in take(loader, loader.batches_per_epoch):
                got += batch["key"]
        keys.append(got)
        loader.close()
    return keys, lengths


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [[2] * 8, [8, 8]], ids=["split-shards", "split-samples"])
def test_epoch_sees_every_sample_once_across_ranks_and_workers(tmp_path, sizes):
    cfg = cfg_for(make_shards(tmp_path, sizes))
    keys, lengths = epoch_keys(cfg, world=2, epochs=2)
    assert lengths[0] == lengths[1] == 4  # 16 samples / (2 ranks x batch 2)
    for epoch in range(2):
        seen = [k for rank_keys in keys for k in rank_keys[epoch * 8:(epoch + 1) * 8]]
        assert sorted(seen) == all_keys(sizes)
    assert keys[0][:8] != keys[0][8:], "epoch 1 must be reshuffled"


@pytest.mark.timeout(120)
def test_unequal_shards_equalized_pad_and_drop(tmp_path):
    sizes = [5, 3, 4, 1]
    shards = make_shards(tmp_path, sizes)
    pad, pad_len = epoch_keys(cfg_for(shards, num_workers=1), world=2)
    assert pad_len[0] == pad_len[1]
    assert set(pad[0] + pad[1]) == set(all_keys(sizes))  # at least once
    drop, drop_len = epoch_keys(cfg_for(shards, num_workers=1, equalize="drop"), world=2)
    assert drop_len[0] == drop_len[1] < pad_len[0]
    seen = drop[0] + drop[1]
    assert len(seen) == len(set(seen))  # at most once


@pytest.mark.timeout(120)
def test_order_is_set_by_seed(tmp_path):
    cfg = cfg_for(make_shards(tmp_path, [6] * 4), crop="random")

    def run(seed):
        loader = build_loader(cfg, rank=0, world_size=1, seed=seed)
        batches = take(loader, 6)
        loader.close()
        return [k for b in batches for k in b["key"]], torch.cat([b["crop_top_left"] for b in batches])

    a, b, c = run(1), run(1), run(2)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert a[0] != c[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,stop", [(2, 5), (0, 3), (2, 9)])
def test_resume_continues_exactly(tmp_path, workers, stop):
    cfg = cfg_for(make_shards(tmp_path, [4] * 4), num_workers=workers, crop="random", random_flip=True,
                  shuffle_buffer=3)
    ref_loader = build_loader(cfg, rank=0, world_size=1, seed=3)
    ref = take(ref_loader, 14)  # crosses an epoch boundary (8 batches per epoch)
    ref_loader.close()
    first = build_loader(cfg, rank=0, world_size=1, seed=3)
    head = take(first, stop)
    state = first.state_dict()
    first.close()
    second = build_loader(cfg, rank=0, world_size=1, seed=3)
    second.load_state_dict(state)
    tail = take(second, 14 - stop)
    second.close()
    for got, want in zip(head + tail, ref, strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got["pixels"], want["pixels"])
        assert torch.equal(got["crop_top_left"], want["crop_top_left"])
    assert second.epoch == 1


def test_non_square_micro_conditioning(tmp_path):
    h, w, r = 24, 40, 16
    # a horizontal gradient, so every crop window and flip is distinguishable
    img = np.broadcast_to(np.linspace(0, 255, w).astype(np.uint8)[None, :, None], (h, w, 3)).copy()
    write_tar(tmp_path / "00000.tar", [(f"k{i}", {"png": _png(img), "txt": b"x"}) for i in range(8)])
    url = str(tmp_path / "00000.tar")

    center = next(build_loader(cfg_for(url, resolution=r, num_workers=0), rank=0, world_size=1, seed=0))
    assert center["original_size"].tolist() == [[h, w]] * 2  # (H, W), not (W, H)
    assert center["target_size"].tolist() == [[r, r]] * 2
    nw = round(w * r / h)  # 27: short side 24 -> 16
    assert center["crop_top_left"].tolist() == [[0, round((nw - r) / 2)]] * 2
    assert center["pixels"].shape == (2, 3, r, r) and center["pixels"].dtype == torch.float32
    assert -1.0 <= center["pixels"].min() < center["pixels"].max() <= 1.0

    resized = Image.fromarray(img).resize((nw, r), Image.Resampling.BICUBIC)
    cfg = cfg_for(url, resolution=r, num_workers=0, crop="random", random_flip=True, batch_size=8)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    flips = 0
    for pixels, (top, left) in zip(batch["pixels"], batch["crop_top_left"].tolist()):
        got = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        plain = np.asarray(resized.crop((left, top, left + r, top + r)))
        # crop_top_left of a flipped sample is the window's corner in the mirrored resized frame
        mirrored = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + r, top + r)))
        def close(a, b):  # the loader resamples only the crop window: equal up to rounding
            return np.abs(a.astype(int) - b.astype(int)).max() <= 1

        if close(got, mirrored) and not close(got, plain):
            flips += 1
        else:
            assert close(got, plain)
    assert 0 < flips < 8


def test_json_original_size_wins(tmp_path):
    meta = json.dumps({"caption": "from json", "original_width": 300, "original_height": 200}).encode()
    write_tar(tmp_path / "00000.tar", [(f"k{i}", {"jpg": _png(np.zeros((8, 12, 3), np.uint8)), "json": meta})
                                       for i in range(2)])
    batch = next(build_loader(cfg_for(str(tmp_path / "00000.tar"), num_workers=0), rank=0, world_size=1, seed=0))
    assert batch["caption"] == ["from json"] * 2
    assert batch["original_size"].tolist() == [[200, 300]] * 2


def _bad_shards(root: Path) -> str:
    good = _png(np.zeros((8, 8, 3), np.uint8))
    ok = [(f"a{i}", {"png": good, "txt": b"ok"}) for i in range(6)]
    write_tar(root / "00000.tar", ok[:2] + [("corrupt", {"png": b"not an image", "txt": b"x"})] + ok[2:4])
    write_tar(root / "00001.tar", [("nocap", {"png": good})] + ok[4:])
    write_tar(root / "tmp.tar", [(f"t{i}", {"png": good, "txt": b"ok"}) for i in range(4)])
    with tarfile.open(root / "tmp.tar") as tf:
        cut = tf.getmember("t2.png").offset_data + 10  # inside t2.png's bytes: t0, t1 survive
    data = (root / "tmp.tar").read_bytes()
    (root / "tmp.tar").unlink()
    (root / "00002.tar").write_bytes(data[:cut])
    return str(root / "{00000..00002}.tar")


@pytest.mark.timeout(120)
def test_bad_data_counted_or_raised(tmp_path):
    shards = _bad_shards(tmp_path)
    loader = build_loader(cfg_for(shards), rank=0, world_size=1, seed=0)
    take(loader, loader.batches_per_epoch)
    counts = loader.counters()
    loader.close()
    assert counts["decode_error"] == 1 and counts["missing_caption"] == 1 and counts["truncated_tar"] == 1
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"0000[0-2]\.tar.*key"):
            strict = build_loader(cfg_for(shards, strict=True, num_workers=workers), rank=0, world_size=1, seed=0)
            take(strict, 20)
    # the message names both the shard and the key
    with pytest.raises(DataError) as err:
        take(build_loader(cfg_for(str(tmp_path / "00000.tar"), strict=True, num_workers=0), rank=0,
                          world_size=1, seed=0), 10)
    assert "00000.tar" in str(err.value) and "'corrupt'" in str(err.value) and "decode_error" in str(err.value)


@pytest.mark.timeout(60)
def test_all_filtered_raises_naming_filter(tmp_path):
    shards = make_shards(tmp_path, [5, 5])
    loader = build_loader(cfg_for(shards, min_size=64, max_tries=7), rank=0, world_size=1, seed=0)
    with pytest.raises(DataError, match="min_size"):
        next(loader)
    with pytest.raises(DataError, match="none holds a sample"):
        build_loader(cfg_for(str(tmp_path / "missing-{0..3}.tar")), rank=0, world_size=1, seed=0)
    with pytest.raises(DataError, match="not set"):
        build_loader(cfg_for(None), rank=0, world_size=1, seed=0)
    # shards promised (samples_per_shard) but unreadable: an error, not an endless loop
    for resampled in (False, True):
        broken = cfg_for("pipe:exit 1 {0..1}", samples_per_shard=5, resampled=resampled, num_workers=1)
        with pytest.raises(DataError, match="no sample"):
            next(build_loader(broken, rank=0, world_size=1, seed=0))


@pytest.mark.timeout(60)
def test_resampled_stream_and_latent_shards(tmp_path):
    rows = []
    for i in range(6):
        meta = {"caption": f"c{i}", "original_size": [30, 40], "crop_top_left": [0, 5], "target_size": [32, 32]}
        files = {"json": json.dumps(meta).encode()}
        for name, shape in (("latents", (4, 4, 4)), ("prompt_embeds", (77, 16))):
            buf = io.BytesIO()
            np.save(buf, np.full(shape, i, np.float16))
            files[f"{name}.npy"] = buf.getvalue()
        rows.append((f"s{i}", files))
    write_tar(tmp_path / "00000.tar", rows)
    cfg = cfg_for(str(tmp_path / "00000.tar"), kind="latents", num_workers=1, resampled=True)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    batches = take(loader, 7)  # beyond one "epoch" (3 batches) of the infinite stream
    b = batches[0]
    assert b["latents"].dtype == torch.float16 and b["latents"].shape == (2, 4, 4, 4)
    assert b["prompt_embeds"].shape == (2, 77, 16) and "pooled_prompt_embeds" not in b
    assert b["original_size"].tolist() == [[30, 40]] * 2 and b["crop_top_left"].tolist() == [[0, 5]] * 2
    for batch in batches:
        for lat, cap in zip(batch["latents"], batch["caption"]):
            assert float(lat[0, 0, 0]) == int(cap[1:])
    assert loader.epoch == 2


def test_structured_config_schema():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, {"shards": ["a.tar", "b/{0..2}.tar"], "batch_size": 8})
    assert merged.batch_size == 8 and list(merged.caption_keys) == ["txt", "caption", "text"]
    with pytest.raises(Exception, match="batch_size"):
        OmegaConf.merge(schema, {"batch_size": "many"})
    with pytest.raises(Exception, match="bogus"):
        OmegaConf.merge(schema, {"bogus": 1})


@pytest.mark.timeout(60)
def test_pipe_urls_lists_and_omegaconf_input(tmp_path):
    sizes = [3, 3, 2]
    make_shards(tmp_path, sizes)
    pipe = f"pipe:cat {tmp_path}/{{00000..00001}}.tar"  # counted by streaming it once (no sidecar for pipes)
    node = OmegaConf.merge(OmegaConf.structured(DataConfig),
                           {"shards": [pipe, str(tmp_path / "00002.tar")], "batch_size": 2, "resolution": 8,
                            "num_workers": 1, "pin_memory": False})
    loader = build_loader(node, rank=0, world_size=1, seed=0)
    assert loader.batches_per_epoch == 4
    keys = [k for b in take(loader, 4) for k in b["key"]]
    assert sorted(keys) == all_keys(sizes)
    assert {u.split("/")[-1] for b in take(loader, 4) for u in b["url"]} >= {"00000.tar", "00002.tar"}
