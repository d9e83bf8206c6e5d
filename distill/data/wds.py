"""The training loader: WebDataset shards -> batches, split exactly over ranks and workers, resumable.

Design (docs/data.md has the user's view):
- `ShardPlan` (shards.py) decides which samples every (rank, worker) reads in an epoch and how many batches Q
  each worker yields; all ranks compute the same plan from (urls, counts, seed, epoch), with no communication.
- Each DataLoader worker batches inside the worker and yields exactly Q batches per epoch, then moves on to the
  next epoch by itself. torch's DataLoader hands out worker results round-robin, so batch j of an epoch comes
  from logical worker j % W: the stream is a deterministic function of (seed, rank, epoch).
- Every batch carries its worker's position (epoch, raw samples consumed) and cumulative drop counters; the
  TrainLoader records them for the batches the caller actually received, so `state_dict` is exact even with
  prefetching. Resuming replays the worker's raw byte stream up to that position without decoding it, and
  rotates worker ids so that the next batch comes from the worker whose turn it was.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.data.config import DataConfig
from distill.data.shards import DataError, ShardPlan, count_samples, expand_urls
from distill.data.transforms import BAD_DATA, Rejected, collate, image_sample, latent_sample, pair_sample, prompt_sample

log = logging.getLogger(__name__)


def _processor(cfg: DataConfig) -> Callable[[dict, DataConfig, random.Random], dict]:
    if cfg.kind == "images":
        return image_sample
    if cfg.kind == "latents":
        return latent_sample
    if cfg.kind == "prompts":
        return prompt_sample
    if cfg.kind == "pairs":
        return pair_sample
    raise ValueError(f"data.kind must be 'images', 'latents', 'pairs' or 'prompts', got {cfg.kind!r}")


class _Worker:
    """One logical worker's sample loop: decode, filter, count, batch."""

    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int, worker: int) -> None:
        self.cfg, self.plan, self.rank, self.worker = cfg, plan, rank, worker
        self.counters: Counter = Counter(images_read=0)  # images decoded (0 for data.kind=prompts / latents)
        self.process = _processor(cfg)
        self._streak: Counter = Counter()  # reasons of the current run of consecutive rejections

    def samples(self, raws: Iterator[dict], epoch: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(raw position, processed sample) for the samples that pass; the first `skip` raws are replayed only."""
        cfg, n = self.cfg, 0
        for raw in raws:
            n += 1
            if n <= skip:
                continue
            # Per-sample rng: random crops/flips do not depend on how many samples a resume skipped.
            rng = random.Random(f"aug:{self.plan.seed}:{epoch}:{self.rank}:{self.worker}:{n}")
            try:
                sample = self.process(raw, cfg, rng)
            except Rejected as e:
                self._reject(e, raw)
                continue
            self._streak.clear()
            if "pixels" in sample:
                self.counters["images_read"] += 1
            if raw.get("__wrap__", 0) > 0:
                self.counters["padded"] += 1
            yield n, sample

    def _reject(self, e: Rejected, raw: dict) -> None:
        if raw.get("__wrap__", 0) == 0:  # counted once per epoch, not again when padding re-reads it
            self.counters[e.reason] += 1
        if self.cfg.strict and e.reason in BAD_DATA:
            raise DataError(f"{e} in shard {raw['__url__']} at key {raw['__key__']!r} (data.strict=true)")
        self._streak[e.reason] += 1
        if sum(self._streak.values()) >= self.cfg.max_tries:
            worst = self._streak.most_common(1)[0][0]
            raise DataError(
                f"{self.cfg.max_tries} consecutive samples rejected without one passing (data.max_tries), "
                f"mostly by filter {worst!r}: {dict(self._streak)}. Last: {e} (shard {raw['__url__']}, "
                f"key {raw['__key__']!r}). Check the data.* filter settings and the shards' json/caption keys.")

    def epoch(self, epoch: int, batches_done: int, skip: int) -> Iterator[dict]:
        """The rest of this worker's `epoch`: exactly plan.batches(epoch) - batches_done batches."""
        q = self.plan.batches(epoch)
        if batches_done >= q:
            return
        raws = self.plan.raw_stream(epoch, self.rank, self.worker, self.cfg.shuffle_buffer, self.counters,
                                    self.cfg.strict)
        pending: list[dict] = []
        try:
            for n, sample in self.samples(raws, epoch, skip):
                pending.append(sample)
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending)
                    pending = []
                    batches_done += 1
                    batch["__pos__"] = (self.worker, epoch, n)
                    batch["__counters__"] = dict(self.counters)
                    yield batch
                    if batches_done == q:
                        return
        finally:
            raws.close()


@dataclasses.dataclass
class _Start:
    epoch: int
    batches_done: int = 0
    raw: int = 0


class _ShardStream(IterableDataset):
    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int, starts: list[_Start], rotation: int) -> None:
        self.cfg, self.plan, self.rank, self.starts, self.rotation = cfg, plan, rank, starts, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.plan.num_workers
        worker, start = _Worker(self.cfg, self.plan, self.rank, w), self.starts[w]
        epoch, done, skip = start.epoch, start.batches_done, start.raw
        while True:
            yield from worker.epoch(epoch, done, skip)
            epoch, done, skip = epoch + 1, 0, 0


class TrainLoader:
    """Endless iterator of batch dicts (see docs/data.md) with an exact, resumable position.

    Position = (epoch, batches this rank consumed in it, each worker's raw-sample offset). Resuming needs the same
    shards, world size, num_workers, batch size and seed; otherwise it warns and starts the next epoch.
    """

    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int, epoch: int = 0) -> None:
        self.cfg, self.plan, self.rank = cfg, plan, rank
        self._epoch, self._batch = epoch, 0
        self._raw = [0] * plan.num_workers
        self._base: Counter = Counter()  # counters of finished iterators and restored checkpoints
        self._live: dict[int, dict] = {}  # latest cumulative counters per worker of the live iterator
        self._it: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank (and every other) yields in the current epoch."""
        return self.plan.num_workers * self.plan.batches(self._epoch)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        w, epoch, raw = batch.pop("__pos__")
        self._live[w] = batch.pop("__counters__")
        W = self.plan.num_workers
        assert epoch == self._epoch and w == self._batch % W, (w, epoch, self._epoch, self._batch)
        self._raw[w] = raw
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch, self._raw = self._epoch + 1, 0, [0] * W
        return batch

    def _start(self) -> Iterator[dict]:
        W, k = self.plan.num_workers, self._batch
        # Batch j of an epoch comes from worker j % W, so worker w has already delivered ceil((k - w) / W).
        starts = [_Start(self._epoch, max(0, -(-(k - w) // W)), self._raw[w]) for w in range(W)]
        dataset = _ShardStream(self.cfg, self.plan, self.rank, starts, rotation=k % W)
        workers = self.cfg.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None)
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes (a later `next` restarts them at the current position)."""
        for counts in self._live.values():
            self._base.update(counts)
        self._live, self._it = {}, None

    def counters(self) -> dict[str, int]:
        """Dropped/padded sample counts by reason, summed over workers (and restored checkpoints)."""
        total = Counter(self._base)
        for counts in self._live.values():
            total.update(counts)
        return dict(total)

    def _signature(self) -> dict:
        p = self.plan
        return {"world_size": p.world_size, "num_workers": p.num_workers, "batch_size": p.batch_size,
                "seed": p.seed, "num_shards": len(p.urls), "resampled": p.resampled}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, "raw": list(self._raw),
                "counters": self.counters(), **self._signature()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._base = Counter(state.get("counters", {}))
        sig = {k: state.get(k) for k in self._signature()}
        if sig != self._signature():
            log.warning("data position saved with %s, now %s: cannot resume mid-epoch, starting epoch %d",
                        sig, self._signature(), state["epoch"] + 1)
            self._epoch, self._batch, self._raw = state["epoch"] + 1, 0, [0] * self.plan.num_workers
            return
        self._epoch, self._batch, self._raw = state["epoch"], state["batch"], list(state["raw"])


def as_data_config(cfg: object) -> DataConfig:
    """Accept a DataConfig, an OmegaConf node (Hydra's cfg.data) or a plain dict."""
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            obj = OmegaConf.to_object(cfg)
            if isinstance(obj, DataConfig):
                return obj
            cfg = obj
    except ImportError:  # pragma: no cover
        pass
    return DataConfig(**dict(cfg))  # type: ignore[arg-type]


def make_plan(cfg: DataConfig, *, world_size: int, seed: int) -> ShardPlan:
    """Expand and count the shards (sidecars, local tar headers, or `samples_per_shard`) into a ShardPlan."""
    from distill.data.synthetic import ensure_default_shards

    ensure_default_shards(cfg.shards)  # the embedded default's data, written on first use
    urls = expand_urls(cfg.shards)
    counts = [count_samples(u, cfg.samples_per_shard) for u in urls]
    if sum(counts) == 0:
        hint = ("; the tiny world's shards are made by `make data` (python -m distill.data.synthetic --out "
                "DIR/tiny_world)" if "tiny_world" in str(cfg.shards) else "")
        raise DataError(f"data.shards={cfg.shards!r}: {len(urls)} shard(s), none holds a sample "
                        f"(missing files? first: {urls[0]}){hint}")
    if cfg.equalize not in ("pad", "drop"):
        raise ValueError(f"data.equalize must be 'pad' or 'drop', got {cfg.equalize!r}")
    return ShardPlan(urls, counts, world_size, max(1, cfg.num_workers), cfg.batch_size, seed,
                     cfg.resampled, cfg.equalize)


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int = 0) -> TrainLoader:
    """The training loader of process `rank` of `world_size`: endless, same batches per epoch on every rank."""
    cfg = as_data_config(cfg)
    _processor(cfg)  # validate kind early
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    plan = make_plan(cfg, world_size=world_size, seed=seed)
    if plan.batches(epoch) == 0:
        raise DataError(f"data.equalize=drop leaves 0 batches: the smallest of {plan.slots} reader slots "
                        f"(ranks x workers) has fewer than batch_size={cfg.batch_size} samples")
    if plan.split_by_sample and not plan.resampled:
        log.info("%d shards < %d ranks x workers: every reader scans all shards and keeps every %d-th sample",
                 len(plan.urls), plan.slots, plan.slots)
    return TrainLoader(cfg, plan, rank, epoch)


class _OnceStream(IterableDataset):
    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int) -> None:
        self.cfg, self.plan, self.rank = cfg, plan, rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = _Worker(self.cfg, self.plan, self.rank, info.id if info else 0)
        shards, m, r = self.plan.assignment(0, self.rank, worker.worker)
        raws = self.plan.read(iter(shards), m, r, worker.counters, self.cfg.strict)
        pending: list[dict] = []
        for _, sample in worker.samples(raws, 0, 0):
            pending.append(sample)
            if len(pending) == self.cfg.batch_size:
                yield {**collate(pending), "__counters__": (worker.worker, dict(worker.counters))}
                pending = []
        if pending:
            yield {**collate(pending), "__counters__": (worker.worker, dict(worker.counters))}


class OnceLoader:
    """Every sample of this rank's share exactly once, in shard order, last batch partial (for `prepare`)."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int) -> None:
        self.cfg = as_data_config(cfg)
        _processor(self.cfg)
        self.plan = make_plan(self.cfg, world_size=world_size, seed=0)
        self.rank = rank
        self._counters: dict[int, dict] = {}

    @property
    def num_samples(self) -> int:
        """Samples this rank will read (before drops), from the shard counts."""
        return sum(self.plan.slot_samples(0, self.rank, w) for w in range(self.plan.num_workers))

    def __iter__(self) -> Iterator[dict]:
        workers = self.cfg.num_workers
        loader = DataLoader(_OnceStream(self.cfg, self.plan, self.rank), batch_size=None, num_workers=workers,
                            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None)
        for batch in loader:
            w, counts = batch.pop("__counters__")
            self._counters[w] = counts
            yield batch

    def counters(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self._counters.values():
            total.update(counts)
        return dict(total)
