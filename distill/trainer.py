"""The one training loop. Methods plug in through distill.methods.base.Method (modules, optimizer specs, losses per
phase); what happens around the steps (EMA, logging, checkpoints, preemption, validation grids, export) is
callbacks (distill.callbacks). The loop owns accumulation, backward, clipping, the optimizer steps and their
schedules, the non-finite policy and the run's resumable state."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distill import checkpoint as ckpt
from distill.batch import Batch, needed_parts, sample_seed, to_batch
from distill.callbacks import Callback, Preempted, default_callbacks  # noqa: F401  (Preempted: re-exported)
from distill.data.wds import build_loader
from distill.methods import build_method
from distill.models import load_components
from distill.models.loader import frozen_dtype  # noqa: F401  (re-exported for bench/throughput.py)
from distill.optim import build_optimizer, build_schedule, load_schedule_state, schedule_state
from distill.parallel import engine_backward, fill_deepspeed_auto, no_zero3_init, prepare_engines
from distill.profiling import span
from distill.tracking import Terms, Tracker, config_changes


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator, run_dir: Path, carry: dict | None = None,
                 stage=None, callbacks: list[Callback] | None = None):
        """`carry`: where the previous stage of a staged run left off (`Trainer.carry()`), so this one continues
        the data stream and the per-sample seed sequence instead of replaying them. `stage`: the
        distill.stages.Stage this run is (None: a single-stage run). `callbacks`: replaces `default_callbacks()`."""
        self.cfg, self.acc, self.run_dir, self.stage = cfg, accelerator, Path(run_dir), stage
        self.device = accelerator.device
        self.step = 0
        self.carried = carry or {}
        self.seed_step = int(self.carried.get("seed_step", 0))  # added to the step in per-sample seeds
        self.nonfinite_in_a_row = 0
        self.counters: dict[str, int] = {"nonfinite_steps": 0}
        self.images_per_step = cfg.data.batch_size * cfg.trainer.gradient_accumulation_steps * accelerator.num_processes
        self.last_batch_size = 0
        self.bar = None
        self.tracker = Tracker(cfg, self.run_dir, accelerator)  # the tracker is per stage
        self.build()
        self.callbacks = [*self.method.callbacks(), *(default_callbacks() if callbacks is None else callbacks)]

    # -- construction ------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.ckpt_manager = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.trainer.checkpoints_keep, acc)
        self.ckpt_manager.check_writable()
        from distill.methods import METHOD_CLASSES

        cls = METHOD_CLASSES[cfg.method.name]
        parts = tuple(dict.fromkeys(needed_parts(cls.input_kind, cfg.data.kind) + tuple(cls.extra_parts)))
        with no_zero3_init(acc):  # frozen parts whole on every rank; only what trains is partitioned (prepare)
            self.comps = self.components(parts)
            self.method = build_method(cfg, self.comps, self.device, stage=self.stage)
        self.make_optimizers()
        # A checkpoint holds the trainable weights, two Adam moments and the method's extra state (EMA): check
        # there is room for one before the first step, not when the first save fails hours later. (Counted before
        # prepare: ZeRO-3 leaves each rank only a slice.)
        trainable = sum(p.numel() * p.element_size() for p in self.trained_params())
        extra = sum(t.numel() * t.element_size() for t in self.method.state_dict().values())
        self.ckpt_manager.check_writable(min_free_bytes=int(3 * trainable + extra) + (16 << 20))
        fill_deepspeed_auto(acc, cfg)
        self.prepare()
        self.loader = self.make_loader()
        if "data" in self.carried:  # a later stage: go on from the previous stage's data position
            self.loader.load_state_dict(self.carried["data"])

    def components(self, parts: tuple[str, ...]):
        """The pretrained parts the method needs (frozen ones in frozen_dtype), from `model.*`."""
        m = self.cfg.model
        return load_components(m.pretrained, vae=m.vae, dtype=frozen_dtype(self.cfg, self.device), device=self.device,
                               parts=parts, revision=m.revision, variant=m.variant)

    def make_loader(self):
        return build_loader(self.cfg.data, rank=self.acc.process_index, world_size=self.acc.num_processes,
                            seed=self.cfg.trainer.seed)

    def carry(self) -> dict:
        """Where this run left off, for the next stage: data position and seed sequence."""
        return {"data": self.loader.state_dict(), "seed_step": self.seed_step + self.step}

    def make_optimizers(self) -> None:
        """One optimizer per spec of the method, each with its own settings (`optim.*` plus the spec's overrides)."""
        self.specs = self.method.optimizers()
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer names must be unique: {names}")
        if len(self.specs) == 1:
            self.specs[0].primary = True
        self.method.optimizer_specs = self.specs
        self.index = {s.name: i for i, s in enumerate(self.specs)}
        self.optimizers = [build_optimizer(s, self.cfg.optim) for s in self.specs]

    def prepare(self) -> None:
        """Hand the method's modules and the optimizers to Accelerate (DDP, or one DeepSpeed engine per module), then
        build each optimizer's LR schedule on its own step count."""
        acc, names, modules = self.acc, list(self.method.modules), self.method.modules
        if acc.distributed_type == DistributedType.DEEPSPEED:
            wrapped, self.optimizers, self.engines = prepare_engines(acc, modules, self.optimizers,
                                                                     [s.name for s in self.specs])
        else:
            prepared = acc.prepare(*[modules[n] for n in names], *self.optimizers)
            prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
            wrapped, self.optimizers = dict(zip(names, prepared[: len(names)])), list(prepared[len(names):])
            self.engines = [None] * len(self.optimizers)
        self.method.set_prepared(wrapped)
        self.schedulers = [build_schedule(s, o, self.cfg.optim, self.cfg.trainer.max_steps)
                           for s, o in zip(self.specs, self.optimizers)]

    def trained_params(self, optimizers: list | None = None) -> list[torch.Tensor]:
        """The parameters the optimizers update (all of them, or those of `optimizers`)."""
        return [p for o in (optimizers or self.optimizers) for g in o.param_groups for p in g["params"]]

    def to_batch(self, raw: dict) -> Batch:
        seeds = [sample_seed(self.cfg.trainer.seed, self.seed_step + self.step, k) for k in raw["key"]]
        return to_batch(raw, self.comps, self.method.input_kind, seeds, self.device)

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        self._each("on_fit_start")
        accum, max_steps = cfg.trainer.gradient_accumulation_steps, cfg.trainer.max_steps
        it = iter(self.loader)
        self.bar = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not (self.acc.is_main_process and cfg.trainer.progress_bar))
        while self.step < max_steps:
            batches = [self.to_batch(next(it)) for _ in range(accum)]
            logs = self.train_step(batches)
            self.last_batch_size = sum(b.size for b in batches)
            self.step += 1
            self.bar.update(1)
            self._each("on_step_end", logs)
        self.bar.close()
        self._each("on_fit_end")

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def show(self, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix)

    def train_step(self, batches: list[Batch]) -> dict:
        """One optimizer step per phase, each over `len(batches)` micro-batches (gradient accumulation). Returns the
        step's logged values (tensors on device), averaged over micro-batches and repeated phases."""
        terms = Terms()
        for phase in self.method.phases(self.step):
            with self.method.phase_scope(phase):
                taken = self.phase_step(self.index[phase], batches, terms)
            if not taken:
                return terms.means()
        self.nonfinite_in_a_row = 0
        with span("callbacks"):
            self._each("on_train_step_end", self.step + 1)
        return terms.means()

    def phase_step(self, i: int, batches: list[Batch], terms: Terms) -> bool:
        """One phase's micro-batches and optimizer step; False when the step is skipped (non-finite on any rank).
        The decision is made on the phase's `loss` and gradient norm, once per optimizer step."""
        acc, spec, opt, sched, engine = self.acc, self.specs[i], self.optimizers[i], self.schedulers[i], self.engines[i]
        prefix = "train/" if spec.primary else f"train/{spec.name}_"
        max_norm = spec.settings(self.cfg.optim)["max_grad_norm"]
        params = [p for p in self.trained_params([opt]) if p.requires_grad] if engine is None else []
        bad, backed = torch.zeros((), dtype=torch.bool, device=self.device), False
        for batch in batches:
            with acc.accumulate(*self.method.modules.values()):
                out = self.method.losses(batch, spec.name, self.step)
                for k, v in out.items():
                    terms.add(prefix + k, v)
                loss = out["loss"]
                if engine is not None:  # DeepSpeed: the engine applies the step inside its backward
                    if self.any_rank(not bool(torch.isfinite(loss.detach()))):  # agreed BEFORE backward
                        self.counters["nonfinite_microbatches"] = self.counters.get("nonfinite_microbatches", 0) + 1
                        if not acc.sync_gradients:
                            continue  # dropped from the step; the boundary micro-batch decides the step
                        if not backed:  # nothing back-propagated this step: skip it, the engine is untouched
                            return self.on_nonfinite(terms)
                        trained = [p for p in engine.module.parameters() if p.requires_grad]
                        loss = sum(p.sum() for p in trained) * 0.0  # zero gradient: step on the finite ones
                    with span("backward"):  # and, at the boundary, clipping and the optimizer step
                        norm = engine_backward(engine, loss, acc.sync_gradients)
                    backed = True
                    if norm is not None:
                        sched.step()
                        terms.add(f"train/grad_norm_{spec.name}", norm)
                        if not math.isfinite(norm):  # seen only after the engine stepped: counted as skipped
                            return self.on_nonfinite(terms)
                    continue
                bad |= ~torch.isfinite(loss.detach())
                with span("backward"):
                    acc.backward(loss)
                if acc.sync_gradients:
                    with span("clip"):
                        norm = acc.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
                        norm = norm.detach() if norm is not None else torch.zeros((), device=self.device)
                    terms.add(f"train/grad_norm_{spec.name}", norm)
                    if self.any_rank(bool(bad | ~torch.isfinite(norm))):
                        opt.zero_grad(set_to_none=True)
                        return self.on_nonfinite(terms)
                    with span("optimizer"):
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
        terms.sums[f"train/lr_{spec.name}"] = [sched.get_last_lr()[0], 1]
        return True

    def on_nonfinite(self, terms: Terms) -> bool:
        self.counters["nonfinite_steps"] += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.trainer.max_nonfinite_steps:
            last = self.ckpt_manager.latest()
            shown = {k: float(v) for k, v in terms.means().items() if "loss" in k or "grad_norm" in k}
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive non-finite steps, the last at step {self.step + 1}: {shown}. "
                f"Last good checkpoint: {last or 'none'} (resume with resume=latest after fixing the cause)")
        return False

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an all-reduce when there are several): for decisions all must share."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def loader_counters(self) -> dict[str, int]:
        counters = self.loader.counters() if hasattr(self.loader, "counters") else {}
        if self.acc.num_processes > 1:  # every rank reduces the same keys, also those another rank never saw
            from distill.data.transforms import BAD_DATA, FILTERS

            keys = sorted(set(counters) | {*BAD_DATA, *FILTERS, "padded", "images_read", "shard_error",
                                           "truncated_tar"})
            counters = {k: counters.get(k, 0) for k in keys}
            t = torch.tensor([counters[k] for k in keys], device=self.device, dtype=torch.float64)
            counters = dict(zip(keys, self.acc.reduce(t, reduction="sum").long().tolist()))
        return {f"data/{k}": v for k, v in counters.items()}

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's JSON state: step, data position, counters, each optimizer's schedule, the config."""
        stage = {"index": self.stage.index, "name": self.stage.name} if self.stage is not None else None
        return {"step": self.step, "data": self.loader.state_dict(), "method": self.method.meta_state(),
                "counters": self.counters, "config": self.tracker.config, "stage": stage,
                "schedules": {s.name: schedule_state(x) for s, x in zip(self.specs, self.schedulers)}}

    def save(self) -> None:
        """Checkpoint, unless the weights are no longer finite (then the last good checkpoint stays the latest)."""
        params = [getattr(p, "ds_tensor", p) for p in self.trained_params()]  # ZeRO-3: this rank's slice
        finite = bool(torch.stack([torch.isfinite(n) for n in torch._foreach_norm(params)]).all()) if params else True
        finite = not self.any_rank(not finite)  # all ranks decide together (under ZeRO-3 each sees only its slice)
        if self.nonfinite_in_a_row or not finite:
            self.counters["skipped_checkpoints"] = self.counters.get("skipped_checkpoints", 0) + 1
            self.tracker.print(f"step {self.step}: not checkpointing non-finite weights")
            return
        self.ckpt_manager.save(self.step, self.state_dict(), self.method.state_dict())

    def resume(self) -> None:
        path = self.ckpt_manager.find(self.cfg.resume)
        if path is None:
            return
        state, tensors = self.ckpt_manager.load(path)
        own = self.state_dict()["stage"]
        if state.get("stage") and own and state["stage"]["index"] != own["index"]:
            raise RuntimeError(f"checkpoint {path} of stage {state['stage']} loaded into stage {own}")
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        self.method.load_meta_state(state.get("method", {}))
        self.method.load_state_dict(tensors)
        self.counters.update(state.get("counters", {}))
        saved = state.get("schedules", {})
        for spec, s in zip(self.specs, self.schedulers):
            if spec.name in saved:
                load_schedule_state(s, saved[spec.name])
            else:  # a checkpoint from before schedules were saved: its step count from the cadence
                s.last_epoch = spec.steps_before(self.step)
                s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        self.tracker.print(f"resumed from {path} at step {self.step}")
        changed = config_changes(state.get("config"), self.tracker.config)
        if changed:  # allowed (a finer skip grid for the last steps, a longer run), but said out loud
            self.tracker.print("resumed with changed settings: " + "; ".join(changed)
                               + (" (the LR schedule follows the new trainer.max_steps from this step on)"
                                  if any(c.startswith("trainer.max_steps:") for c in changed) else ""))

    def close(self) -> None:
        for cb in self.callbacks:
            cb.close()
        self.tracker.close()
