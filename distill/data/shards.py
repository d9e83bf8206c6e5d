"""Shards: URL expansion, sample counting, raw tar reading, and the split of an epoch over ranks and workers.

A raw sample is a dict {"__key__", "__url__", ext: bytes, ...} grouped from consecutive tar members that share
a key (the name up to the first dot of the basename, webdataset's convention). Reading uses webdataset's
`gopen` (local paths, `pipe:` commands, http) and our own grouping, so truncated tars and bad shards are
counted per reason instead of vanishing, and the split below is exact and deterministic.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

import braceexpand
from webdataset.gopen import gopen

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class DataError(RuntimeError):
    """Bad data in strict mode, a dataset that yields nothing, or `max_tries` consecutive rejections."""


def expand_urls(shards: object) -> list[str]:
    """A path, folder of .tar files, brace pattern, `pipe:` URL or a list of them -> a flat list of URLs."""
    if shards is None:
        raise DataError("data.shards is not set: give a path, brace pattern, pipe: URL or a list of them")
    items = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(str(item)):
            if os.path.isdir(url):
                urls += sorted(glob.glob(os.path.join(url, "*.tar")))
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"data.shards={shards!r} expands to no shard")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def split_key(name: str) -> tuple[str | None, str]:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _count_members(open_tar) -> int:
    """Number of samples (runs of members sharing a key) in a tar; tolerant of truncation."""
    n, last = 0, None
    try:
        with open_tar() as tf:
            for info in tf:
                key, _ = split_key(info.name)
                if info.isreg() and key is not None and not info.name.startswith("__") and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def is_text(url: str) -> bool:
    """A prompt list: one caption per line (.txt) or one JSON object per line (.jsonl), read as samples."""
    return url.endswith((".txt", ".jsonl"))


def _text_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(line index, line) for the non-empty lines of a prompt list (local path, `pipe:` or URL)."""
    stream = gopen(url, "rb")
    try:
        n = 0
        for line in stream:
            line = line.strip()
            if line:
                yield n, line
                n += 1
    finally:
        _close(stream)


def count_samples(url: str, samples_per_shard: int | None = None) -> int:
    """Samples in one shard: the img2dataset-style `<shard>_stats.json` sidecar ("successes"), else
    `samples_per_shard`, else a scan of the tar (headers only when local; the whole stream otherwise).
    A prompt list (.txt / .jsonl) holds one sample per non-empty line."""
    if is_text(url):
        if is_local(url) and not os.path.exists(url):
            return 0
        try:
            return sum(1 for _ in _text_lines(url))
        except Exception:  # noqa: BLE001 - unreadable: counts 0 here; reading it reports the error
            return 0
    if is_local(url):
        sidecar = re.sub(r"\.tar$", "", url) + "_stats.json"
        if os.path.exists(sidecar):
            try:
                with open(sidecar) as f:
                    return int(json.load(f)["successes"])
            except (ValueError, KeyError, OSError):
                pass
    if samples_per_shard is not None:
        return samples_per_shard
    if is_local(url):  # random access: reads the headers and seeks over the data
        return _count_members(lambda: tarfile.open(url, mode="r:*")) if os.path.exists(url) else 0
    try:
        stream = gopen(url, "rb")
    except Exception:  # noqa: BLE001 - an unopenable shard counts 0 here; reading it reports the error
        return 0
    try:
        return _count_members(lambda: tarfile.open(fileobj=stream, mode="r|*"))
    finally:
        _close(stream)


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001, S110 - a pipe closed early exits with SIGPIPE; nothing to report
        pass


def read_shard(url: str, counters: Counter, strict: bool) -> Iterator[dict]:
    """Yield raw samples of one shard. Unreadable/truncated shards: counted ("shard_error", "truncated_tar")
    and skipped, or raised (strict). The sample being assembled when a tar breaks is dropped with it.
    A prompt list yields {"__key__": the 9-digit line index, "txt" or "json": the line} per non-empty line."""
    if is_text(url):
        yield from _read_text(url, counters, strict)
        return
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        counters["shard_error"] += 1
        if strict:
            raise DataError(f"cannot open shard {url}: {e}") from e
        return
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                key, ext = split_key(info.name)
                if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                data = tf.extractfile(info).read()
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError) as e:
        counters["truncated_tar"] += 1
        if strict:
            key = current["__key__"] if current else None
            raise DataError(f"truncated or corrupt tar {url} (at key {key!r}): {e}") from e
    finally:
        _close(stream)


def _read_text(url: str, counters: Counter, strict: bool) -> Iterator[dict]:
    ext = "json" if url.endswith(".jsonl") else "txt"
    try:
        for i, line in _text_lines(url):
            yield {"__key__": f"{i:09d}", "__url__": url, ext: line}
    except OSError as e:
        counters["shard_error"] += 1
        if strict:
            raise DataError(f"cannot read prompt list {url}: {e}") from e


def shuffled(samples: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle (deterministic for a given rng): hold `buffer` samples, emit a random one per input."""
    if buffer <= 1:
        yield from samples
        return
    held: list[dict] = []
    for sample in samples:
        if len(held) < buffer:
            held.append(sample)
            continue
        i = rng.randrange(buffer)
        held[i], sample = sample, held[i]
        yield sample
    rng.shuffle(held)
    yield from held


@dataclass
class ShardPlan:
    """Which samples each (rank, worker) reads in an epoch, and how many batches every worker yields.

    Slots are rank-major: shards shuffled by (seed, epoch) go to ranks round-robin, then to that rank's workers.
    With fewer shards than slots, every slot reads all shards and keeps the samples whose running index is
    congruent to its slot number. Every worker yields the same number of batches per epoch (`batches(epoch)`),
    which makes every rank yield the same number (no DDP hang) and DataLoader's round-robin deterministic.
    """

    urls: list[str]
    counts: list[int]
    world_size: int
    num_workers: int  # logical workers per rank (>= 1; num_workers=0 runs one in the main process)
    batch_size: int
    seed: int
    resampled: bool = False
    equalize: str = "pad"

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    @property
    def split_by_sample(self) -> bool:
        return len(self.urls) < self.slots

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def assignment(self, epoch: int, rank: int, worker: int) -> tuple[list[int], int, int]:
        """(shard indices in reading order, modulus, remainder): keep running sample index i if i % m == r."""
        order = self._order(epoch)
        if self.split_by_sample:
            return order, self.slots, rank * self.num_workers + worker
        return order[rank:: self.world_size][worker:: self.num_workers], 1, 0

    def slot_samples(self, epoch: int, rank: int, worker: int) -> int:
        shards, m, r = self.assignment(epoch, rank, worker)
        n = sum(self.counts[i] for i in shards)
        return (n - r + m - 1) // m if m > 1 else n

    def batches(self, epoch: int) -> int:
        """Batches each worker yields in `epoch` (the same on every rank and worker)."""
        if self.resampled:
            return max(1, math.ceil(sum(self.counts) / (self.slots * self.batch_size)))
        sizes = [self.slot_samples(epoch, r, w) for r in range(self.world_size) for w in range(self.num_workers)]
        if self.equalize == "drop":
            return min(sizes) // self.batch_size
        return math.ceil(max(sizes) / self.batch_size)

    def raw_stream(self, epoch: int, rank: int, worker: int, shuffle_buffer: int, counters: Counter,
                   strict: bool) -> Iterator[dict]:
        """The endless raw-sample stream of one worker in one epoch: its share, then (when the epoch asks for
        more batches than the share fills: padding, or samples lost to filters) the same share reshuffled."""
        if self.resampled:
            rng = random.Random(f"resample:{self.seed}:{epoch}:{rank}:{worker}")
            yield from shuffled(self._resample(rng, counters, strict), shuffle_buffer,
                                random.Random(f"buffer:{self.seed}:{epoch}:{rank}:{worker}"))
            return
        shards, m, r = self.assignment(epoch, rank, worker)
        for wrap in count():
            rng = random.Random(f"buffer:{self.seed}:{epoch}:{wrap}:{rank}:{worker}")
            n = 0
            # Re-reads while padding are not counted again: per epoch, each bad sample/shard counts once.
            tally = counters if wrap == 0 else Counter()
            for sample in shuffled(self.read(iter(shards), m, r, tally, strict), shuffle_buffer, rng):
                n += 1
                sample["__wrap__"] = wrap
                yield sample
            if n == 0:
                names = [self.urls[i] for i in shards][:5]
                raise DataError(
                    f"rank {rank} worker {worker} got no samples from its shards {names} (epoch {epoch}); "
                    f"counters so far: {dict(counters)}. Check data.shards, or use fewer workers/ranks than "
                    f"there are samples")

    def read(self, shard_ids: Iterator[int], m: int, r: int, counters: Counter, strict: bool) -> Iterator[dict]:
        i = 0
        for s in shard_ids:
            for sample in read_shard(self.urls[s], counters, strict):
                if i % m == r:
                    yield sample
                i += 1

    def _resample(self, rng: random.Random, counters: Counter, strict: bool) -> Iterator[dict]:
        empty = 0  # consecutive shard draws that yielded nothing: fail instead of spinning forever
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            n = 0
            for sample in read_shard(url, counters, strict):
                n += 1
                yield sample
            empty = 0 if n else empty + 1
            if empty >= max(100, 10 * len(self.urls)):
                raise DataError(f"{empty} consecutive shard draws yielded no sample (last: {url}); "
                                f"counters so far: {dict(counters)}")
