"""Write WebDataset shards in img2dataset's layout, atomically, with `NNNNN_stats.json` sidecars.

    with ShardWriter("out/", samples_per_shard=1000) as w:
        w.write("000000001", {"jpg": jpeg_bytes, "txt": "a cat", "json": {"width": 640, "height": 480}})

Values are encoded by extension: bytes as is; str as UTF-8; dict/list as JSON; numpy arrays and torch tensors
as `.npy` (no pickle); PIL images by their extension (jpg/png/webp). A shard is written to `NAME.tar.tmp` and
renamed when complete, so a killed writer never leaves a truncated shard under a final name. The sidecar's
"successes" count lets the loader size epochs without scanning tars.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self


def encode_value(ext: str, value: Any) -> bytes:
    """Bytes stored for `KEY.<ext>`."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext.endswith("npy"):
        if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
            value = value.detach().cpu().numpy()
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext.endswith("json") or isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    if hasattr(value, "save"):  # PIL.Image
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext.rsplit(".", 1)[-1].lower()]
        buf = io.BytesIO()
        value.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    raise TypeError(f"cannot encode {type(value).__name__} as .{ext}")


class ShardWriter:
    """Write samples into `output_dir/{index:05d}{suffix}.tar`, `samples_per_shard` per shard.

    `suffix` (e.g. "-rank003") keeps the files of parallel writers apart. `paths` lists the shards written.
    """

    def __init__(self, output_dir: str | os.PathLike, samples_per_shard: int = 1000, *, suffix: str = "",
                 start_index: int = 0) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard, self.suffix, self.index = samples_per_shard, suffix, start_index
        self.paths: list[str] = []
        self.total = 0
        self._tar: tarfile.TarFile | None = None
        self._n = 0
        self._keys: set[str] = set()

    def _path(self) -> Path:
        return self.dir / f"{self.index:05d}{self.suffix}.tar"

    def write(self, key: str, files: dict[str, Any]) -> None:
        """Add one sample: `files` maps extension (no leading dot, e.g. "jpg", "latents.npy") to a value."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/' (the key ends at the first dot)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._path()}")
        if self._tar is None:
            self._tar = tarfile.open(str(self._path()) + ".tmp", "w")  # noqa: SIM115 - open across writes
        now = time.time()
        for ext, value in files.items():
            data = encode_value(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._n += 1
        self.total += 1
        if self._n >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._path()
        os.replace(str(path) + ".tmp", path)
        with open(self.dir / f"{self.index:05d}{self.suffix}_stats.json", "w") as f:
            json.dump({"successes": self._n, "count": self._n}, f)
        self.paths.append(str(path))
        self._tar, self._n, self._keys = None, 0, set()
        self.index += 1

    def close(self) -> list[str]:
        """Finish the last (partial) shard; returns the list of shard paths written."""
        self._finish()
        return self.paths

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            os.remove(str(self._path()) + ".tmp")
