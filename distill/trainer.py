"""The one training loop. Methods plug in through distill.methods.base.Method; parallelism, precision,
accumulation, clipping, checkpoints, logging, validation and export live here and only here."""

from __future__ import annotations

import logging
import math
import os
import signal  # scale-out (issue 9): preemption signals
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distill import checkpoint as ckpt
from distill.data.wds import build_loader
from distill.diffusion import UNetCond, seeded_noise
from distill.methods import build_method
from distill.methods.base import Batch, sample_seed
from distill.models import decode_latents, encode_images, encode_prompts, load_components, time_ids
from distill.parallel import gathered, no_zero3_init, zero3_enabled
from distill.tracking import Tracker, flat_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# scale-out (issue 9): checkpoint on preemption. SLURM's warning signal (USR1 forwarded to every rank by
# launch/slurm/train.sbatch; USR2 from submitit) only sets a flag; all ranks agree at the next step boundary, save a
# checkpoint and stop, so a requeued job continues with resume=latest.
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exit status 0 (the job script requeues)."""


def _nan_fault() -> tuple[int, int, int | None] | None:
    """Testing hook: DISTILL_FAULT_NAN_LOSS=STEP[@RANK][/MICRO] makes the loss of that step (1-based) NaN on that
    rank (default 0), in every micro-batch or only micro-batch MICRO (0-based), so the fault tests can check that
    all ranks skip the step together. Unset in normal runs."""
    spec = os.environ.get("DISTILL_FAULT_NAN_LOSS")
    if not spec:
        return None
    spec, _, micro = spec.partition("/")
    step, _, rank = spec.partition("@")
    return int(step), int(rank or 0), int(micro) if micro else None


def frozen_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """Frozen nets (teacher, VAE, text encoders) run in half precision on GPU, fp32 on CPU."""
    if cfg.model.frozen_dtype != "auto":
        return DTYPES[cfg.model.frozen_dtype]
    if device.type == "cuda" and cfg.trainer.mixed_precision in ("fp16", "bf16"):
        return DTYPES[cfg.trainer.mixed_precision]
    return torch.float32


def lr_lambda(cfg: DictConfig):
    """LR multiplier per optimizer step. Stepped once per optimizer step on every rank, so a schedule means the
    same at any process count (the scheduler is deliberately not handed to accelerator.prepare)."""
    warm, total, kind = cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.scheduler

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


def config_changes(old: dict | None, new: dict, ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """'key: old -> new' for every leaf setting that differs between a checkpoint's config and this run's."""
    if not old:
        return []
    a, b = flat_config(old), flat_config(new)
    return [f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k, "<unset>") != b.get(k, "<unset>")]


class Trainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator, run_dir: Path, carry: dict | None = None):
        """`carry`: where the previous stage of a staged run left off (`Trainer.carry()`), so this one continues
        the data stream and the per-sample seed sequence instead of replaying them."""
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.device = accelerator.device
        self.step = 0
        self.carried = carry or {}
        self.seed_step = int(self.carried.get("seed_step", 0))  # added to the step in per-sample seeds
        self.nonfinite_in_a_row = 0
        self.counters: dict[str, int] = {"nonfinite_steps": 0}
        self.nan_fault = _nan_fault()
        self.tracker = Tracker(cfg, run_dir, accelerator)  # the tracker is per stage
        self.build()
        self.install_preempt_handlers()  # scale-out (issue 9)

    # -- construction ------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.ckpt_manager = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.trainer.checkpoints_keep, acc)
        self.ckpt_manager.check_writable()
        dtype = frozen_dtype(cfg, self.device)
        from distill.methods import METHOD_CLASSES

        kind = METHOD_CLASSES[cfg.method.name].input_kind
        parts = ["unet", "vae"] if kind == "pixels" else ["unet"]
        if kind == "latents" and cfg.data.kind == "images":
            parts += ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        with no_zero3_init(acc):  # frozen parts whole on every rank; only what trains is partitioned (prepare)
            self.comps = load_components(cfg.model.pretrained, vae=cfg.model.vae, dtype=dtype, device=self.device,
                                         parts=tuple(parts), revision=cfg.model.revision, variant=cfg.model.variant)
            self.method = build_method(cfg, self.comps, self.device)
        self.make_optimizers()
        # A checkpoint holds the trainable weights, two Adam moments and the method's extra state (EMA): check
        # there is room for one before the first step, not when the first save fails hours later. (Counted before
        # prepare: ZeRO-3 leaves each rank only a slice.)
        trainable = sum(p.numel() * p.element_size() for p in self.trained_params())
        extra = sum(t.numel() * t.element_size() for t in self.method.state_dict().values())
        self.ckpt_manager.check_writable(min_free_bytes=int(3 * trainable + extra) + (16 << 20))
        ds = acc.state.deepspeed_plugin  # scale-out (issue 9): the loader is not prepared, so DeepSpeed's "auto"
        if ds is not None:  # micro-batch and clipping cannot be inferred from it: fill them from this config
            for key, value in (("train_micro_batch_size_per_gpu", cfg.data.batch_size),
                               ("gradient_clipping", cfg.optim.max_grad_norm)):
                if ds.is_auto(key):
                    ds.deepspeed_config[key] = value
        self.prepare()
        self.loader = build_loader(cfg.data, rank=acc.process_index, world_size=acc.num_processes,
                                   seed=cfg.trainer.seed)
        if "data" in self.carried:  # a later stage: go on from the previous stage's data position
            self.loader.load_state_dict(self.carried["data"])

    def carry(self) -> dict:
        """Where this run left off, for the next stage: data position and seed sequence."""
        return {"data": self.loader.state_dict(), "seed_step": self.seed_step + self.step}

    def make_optimizers(self) -> None:
        """One optimizer per group list of the method (`optimizer_names` order)."""
        o = self.cfg.optim
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.optimizers = [opt_cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
                           for groups in self.method.param_groups()]

    def prepare(self) -> None:
        """Hand the method's modules and the optimizers to Accelerate (DDP, or one DeepSpeed engine per module), then
        build the LR schedules on the prepared optimizers."""
        acc, names = self.acc, list(self.method.modules)
        self.engines: list = [None] * len(self.optimizers)  # [i]: the DeepSpeed engine of optimizer i
        if acc.distributed_type == DistributedType.DEEPSPEED:
            self.prepare_engines(names)
        else:
            prepared = acc.prepare(*[self.method.modules[n] for n in names], *self.optimizers)
            prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
            self.method.set_prepared(dict(zip(names, prepared[: len(names)])))
            self.optimizers = list(prepared[len(names):])
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(self.cfg)) for o in self.optimizers]

    def prepare_engines(self, names: list[str]) -> None:
        """scale-out (issue 9): one DeepSpeed engine per trained module, each with the optimizer of its parameters.
        Accelerate's prepare turns every module of one call into the same engine and drives only one engine in
        `backward`, so a method with two models and two optimizers (PAD: student and discriminator) is prepared
        pair by pair here, and `train_step` runs each engine's backward and step itself."""
        acc = self.acc
        owned = {n: {id(p) for p in self.method.modules[n].parameters()} for n in names}
        pairs: dict[str, int] = {}
        for i, opt in enumerate(self.optimizers):
            ids = {id(p) for g in opt.param_groups for p in g["params"]}
            owner = [n for n in names if ids <= owned[n]]
            if len(owner) != 1 or owner[0] in pairs:
                raise ValueError(f"DeepSpeed needs one optimizer per trained module; optimizer "
                                 f"{self.method.optimizer_names[i]!r} updates {owner or 'no single module'}")
            pairs[owner[0]] = i
        if set(pairs) != set(names):
            raise ValueError(f"DeepSpeed needs an optimizer for every trained module: {sorted(set(names) - set(pairs))}")
        wrapped = {}
        def quiet(record: logging.LogRecord) -> bool:  # Accelerate warns from the 2nd engine on that its backward
            return "wrapped DeepSpeed engine reference" not in record.getMessage()  # drives one: we never call it

        logging.getLogger("accelerate.accelerator").addFilter(quiet)
        try:
            for n in names:  # in the modules' order: checkpoints name the first one model.safetensors
                i = pairs[n]
                wrapped[n], self.optimizers[i] = acc.prepare(self.method.modules[n], self.optimizers[i])
                self.engines[i] = wrapped[n]
        finally:
            logging.getLogger("accelerate.accelerator").removeFilter(quiet)
        self.method.set_prepared(wrapped)

    def trained_params(self, optimizers: list | None = None) -> list[torch.Tensor]:
        """The parameters the optimizers update (all of them, or those of `optimizers`)."""
        return [p for o in (optimizers or self.optimizers) for g in o.param_groups for p in g["params"]]

    # -- batches -----------------------------------------------------------------------------------------
    def to_batch(self, raw: dict) -> Batch:
        dev = self.device
        seeds = [sample_seed(self.cfg.trainer.seed, self.seed_step + self.step, k) for k in raw["key"]]
        if self.method.input_kind == "pixels":
            return Batch(latents=None, cond=None, captions=raw["caption"], pixels=raw["pixels"].to(dev), seeds=seeds)
        ids = time_ids(raw["original_size"], raw["crop_top_left"], raw["target_size"]).to(dev)
        if "latents" in raw:
            lat, emb, pooled = raw["latents"], raw["prompt_embeds"], raw.get("pooled_prompt_embeds")
        else:
            lat = encode_images(self.comps, raw["pixels"])
            emb, pooled = encode_prompts(self.comps, raw["caption"])
        sdxl = self.comps.arch == "sdxl"
        cond = UNetCond(encoder_hidden_states=emb.to(dev, torch.float32),
                        text_embeds=pooled.to(dev, torch.float32) if sdxl else None,
                        time_ids=ids if sdxl else None)
        return Batch(latents=lat.to(dev, torch.float32), cond=cond, captions=list(raw["caption"]), seeds=seeds)

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.resume()
        accum, max_steps = cfg.trainer.gradient_accumulation_steps, cfg.trainer.max_steps
        it = iter(self.loader)
        bar = tqdm(total=max_steps, initial=self.step, desc="train", disable=not (acc.is_main_process and cfg.trainer.progress_bar),
                   dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        samples_seen, t_window = 0, time.time()
        while self.step < max_steps and not self.method.is_done(self.step):
            batches = [self.to_batch(next(it)) for _ in range(accum)]
            logs = self.train_step(batches)
            samples_seen += sum(b.size for b in batches) * acc.num_processes
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            self.step += 1
            bar.update(1)
            if self.step % cfg.trainer.log_every_steps == 0 or self.step == max_steps:
                dt = max(time.time() - t_window, 1e-9)
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                metrics = self.reduce_mean(metrics)
                metrics["samples_per_s"] = samples_seen / dt
                metrics.update(self.loader_counters())
                metrics.update({f"train/{k}": v for k, v in self.counters.items()})
                self.tracker.log(metrics, self.step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("train/loss")})
                window, samples_seen, t_window = {}, 0, time.time()
            if self.step < max_steps and self.preempt_requested():  # scale-out (issue 9)
                self.stop_preempted()
            if self.step % cfg.trainer.checkpoint_every_steps == 0 and self.step < max_steps:
                self.save()
            if cfg.trainer.validate_every_steps and self.step % cfg.trainer.validate_every_steps == 0:
                self.validate()
        bar.close()
        self.save()
        self.validate()
        if cfg.trainer.export_at_end:
            self.export()

    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step per phase, each over `len(batches)` micro-batches (gradient accumulation)."""
        logs: dict[str, float] = {}
        for phase in self.method.phases(self.step):
            oi = self.method.optimizer_names.index(phase)
            opt, sched = self.optimizers[oi], self.schedulers[oi]
            engine = self.engines[oi]
            # what DDP clips (a DeepSpeed engine clips inside its step)
            params = [p for p in self.trained_params([opt]) if p.requires_grad] if engine is None else []
            prefix = "train/" if phase == "g" else f"train/{phase}_"
            with self.method.phase_scope(phase):
                out = self.phase_step(phase, batches, logs, opt, sched, engine, params, prefix)
            if out is not None:
                return out
            logs[f"train/lr_{phase}"] = sched.get_last_lr()[0]
        self.nonfinite_in_a_row = 0
        self.method.after_step(self.step + 1)
        return logs

    def phase_step(self, phase, batches, logs, opt, sched, engine, params, prefix) -> dict[str, float] | None:
        """One phase's micro-batches and optimizer step; returns the logs when the step is skipped (non-finite)."""
        cfg, acc = self.cfg, self.acc
        backed = False
        for micro, batch in enumerate(batches):
            with acc.accumulate(*self.method.modules.values()):
                out = self.method.losses(batch, phase, self.step)
                if self.nan_fault and self.nan_fault[:2] == (self.step + 1, acc.process_index) and \
                        self.nan_fault[2] in (None, micro):  # testing hook, see _nan_fault
                    out["loss"] = out["loss"] * float("nan")
                for k, v in out.items():
                    logs[prefix + k] = float(v.detach())
                if engine is not None:  # DeepSpeed: the engine applies the step inside its backward
                    loss = out["loss"]  # its finiteness agreed by all ranks before backward (logged value)
                    if self.any_rank(not math.isfinite(logs[prefix + "loss"])):
                        self.counters["nonfinite_microbatches"] = self.counters.get("nonfinite_microbatches", 0) + 1
                        if not acc.sync_gradients:
                            continue  # dropped from the step; the boundary micro-batch decides the step
                        if not backed:  # nothing back-propagated this step: skip it, the engine is untouched
                            self.on_nonfinite(logs)
                            return logs
                        trained = [p for p in engine.module.parameters() if p.requires_grad]
                        loss = sum(p.sum() for p in trained) * 0.0  # zero gradient: step on the finite ones
                    norm = self.engine_backward(engine, loss)
                    backed = True
                    if norm is not None:
                        sched.step()
                        logs[f"train/grad_norm_{phase}"] = norm
                        if not math.isfinite(norm):  # seen only after the engine stepped: counted as skipped
                            self.on_nonfinite(logs)
                            return logs
                    continue
                acc.backward(out["loss"])
                if acc.sync_gradients:
                    max_norm = cfg.optim.max_grad_norm
                    norm = acc.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
                    norm = float(norm) if norm is not None else 0.0
                    logs[f"train/grad_norm_{phase}"] = norm
                    if not math.isfinite(norm) or not all(math.isfinite(v) for k, v in logs.items() if "loss" in k):
                        self.on_nonfinite(logs)
                        opt.zero_grad(set_to_none=True)
                        return logs
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        return None

    def engine_backward(self, engine, loss: torch.Tensor) -> float | None:
        """Backward of one DeepSpeed engine and, at the accumulation boundary, its step (clipping included, from
        the DeepSpeed config); returns the gradient norm after a step, None between micro-batches.
        The engine steps inside, so `train_step` has all ranks agree on the loss's finiteness BEFORE this call:
        a non-finite loss never reaches the weights. Without accumulation that skips the step, as under DDP; with
        accumulation a bad micro-batch is dropped and the step is made of the finite ones (the engine already holds
        their gradients). A finite loss with a non-finite gradient is seen only after the step: it is counted."""
        boundary = self.acc.sync_gradients
        engine.set_gradient_accumulation_boundary(is_boundary=boundary)
        engine.backward(loss)
        if not boundary:
            return None
        engine.step()
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def on_nonfinite(self, logs: dict[str, float]) -> None:
        self.counters["nonfinite_steps"] += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.trainer.max_nonfinite_steps:
            last = self.ckpt_manager.latest()
            terms = {k: v for k, v in logs.items() if "loss" in k or "grad_norm" in k}
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive non-finite steps, the last at step {self.step + 1}: {terms}. "
                f"Last good checkpoint: {last or 'none'} (resume with resume=latest after fixing the cause)")

    def reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.acc.num_processes == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], device=self.device, dtype=torch.float64)
        t = self.acc.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an all-reduce when there are several): for decisions all must share."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def loader_counters(self) -> dict[str, int]:
        counters = self.loader.counters() if hasattr(self.loader, "counters") else {}
        if self.acc.num_processes > 1 and counters:
            keys = sorted(counters)
            t = torch.tensor([counters[k] for k in keys], device=self.device, dtype=torch.float64)
            counters = dict(zip(keys, self.acc.reduce(t, reduction="sum").long().tolist()))
        return {f"data/{k}": v for k, v in counters.items()}

    # -- state -------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint, unless the weights are no longer finite (then the last good checkpoint stays the latest)."""
        params = [getattr(p, "ds_tensor", p) for p in self.trained_params()]  # ZeRO-3: this rank's slice
        finite = bool(torch.stack([torch.isfinite(n) for n in torch._foreach_norm(params)]).all()) if params else True
        finite = not self.any_rank(not finite)  # all ranks decide together (under ZeRO-3 each sees only its slice)
        if self.nonfinite_in_a_row or not finite:
            self.counters["skipped_checkpoints"] = self.counters.get("skipped_checkpoints", 0) + 1
            self.tracker.print(f"step {self.step}: not checkpointing non-finite weights")
            return
        state = {"step": self.step, "data": self.loader.state_dict(), "method": self.method.meta_state(),
                 "counters": self.counters, "config": self.tracker.config}
        self.ckpt_manager.save(self.step, state, self.method.state_dict())

    def resume(self) -> None:
        path = self.ckpt_manager.find(self.cfg.resume)
        if path is None:
            return
        state, tensors = self.ckpt_manager.load(path)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        self.method.load_meta_state(state["method"])
        self.method.load_state_dict(tensors)
        self.counters.update(state.get("counters", {}))
        for s in self.schedulers:  # LambdaLR state is its step count
            s.last_epoch = self.step
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        self.tracker.print(f"resumed from {path} at step {self.step}")
        changed = config_changes(state.get("config"), self.tracker.config)
        if changed:  # allowed (a finer skip grid for the last steps, a longer run), but said out loud
            self.tracker.print("resumed with changed settings: " + "; ".join(changed)
                               + (" (the LR schedule follows the new trainer.max_steps from this step on)"
                                  if any(c.startswith("trainer.max_steps:") for c in changed) else ""))

    # -- validation and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> None:
        prompts = list(self.cfg.trainer.validation_prompts)
        if not prompts or self.method.input_kind == "pixels":
            self.acc.wait_for_everyone()
            return
        # Under ZeRO-3 a forward gathers the student's weights on every rank at once: all ranks sample, rank 0 saves.
        everywhere = zero3_enabled(self.acc)
        if self.acc.is_main_process or everywhere:
            from distill.evaluate import save_grid

            comps = self.validation_components()
            emb, pooled = encode_prompts(comps, prompts)
            n = len(prompts)
            res = self.cfg.data.resolution
            sdxl = comps.arch == "sdxl"
            ids = torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32) if sdxl else None
            cond = UNetCond(encoder_hidden_states=emb, text_embeds=pooled if sdxl else None, time_ids=ids)
            cond = cond.to(self.device, torch.float32)
            scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
            seeds = [self.cfg.trainer.validation_seed + i for i in range(n)]
            c = self.comps.unet.config.in_channels if self.comps.unet is not None else 4
            noise = seeded_noise(seeds, (n, c, res // scale, res // scale), self.device, torch.float32)
            columns = []
            for steps in self.cfg.trainer.validation_steps:
                lat = self.method.sample(cond, noise, int(steps), seeds)
                if self.acc.is_main_process:
                    columns.append(decode_latents(comps, lat.to(comps.vae.dtype)).float().cpu())
            if self.acc.is_main_process:
                path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
                save_grid(columns, path, row_labels=prompts,
                          col_labels=[f"{s} steps" for s in self.cfg.trainer.validation_steps])
                self.tracker.log_image("val/samples", path, self.step)
        self.acc.wait_for_everyone()

    def validation_components(self):
        need = [p for p in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
                if getattr(self.comps, p) is None and not (self.comps.arch == "sd15" and p.endswith("_2"))]
        if need:  # latent shards: the text encoders and VAE are loaded only here (rank 0; every rank under ZeRO-3)
            with no_zero3_init(self.acc):
                extra = load_components(self.cfg.model.pretrained, vae=self.cfg.model.vae, parts=tuple(need),
                                        dtype=torch.float32, device=self.device)
            for p in need:
                setattr(self.comps, p, getattr(extra, p))
        return self.comps

    def export(self) -> None:
        params = [p for m in self.method.modules.values() for p in m.parameters()]
        # ZeRO-3: every rank gathers the full weights, rank 0 writes them (and loads the teacher's text encoders
        # for the single-file checkpoint whole, not partitioned on one rank alone, which would hang).
        with gathered(params), no_zero3_init(self.acc):
            if self.acc.is_main_process:
                out = self.run_dir / "export"
                self.method.export(out, DTYPES[self.cfg.trainer.export_dtype])
                self.tracker.print(f"exported to {out}")
            self.acc.wait_for_everyone()

    # -- preemption (scale-out, issue 9) -------------------------------------------------------------------
    def install_preempt_handlers(self) -> None:
        self.preempt_signal: int | None = None
        self.previous_handlers: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in PREEMPT_SIGNALS:
                self.previous_handlers[s] = signal.signal(s, self._on_preempt_signal)

    def _on_preempt_signal(self, signum: int, frame) -> None:
        self.preempt_signal = signum

    def restore_signal_handlers(self) -> dict[int, object]:
        previous, self.previous_handlers = self.previous_handlers, {}
        for s, h in previous.items():
            signal.signal(s, h)
        return previous

    def preempt_requested(self) -> bool:
        """Whether any rank got a preemption signal: one all-reduce per step keeps the ranks stopping together."""
        return self.any_rank(self.preempt_signal is not None)

    def stop_preempted(self) -> None:
        """Save, then hand the signal to whoever handled it before (submitit requeues the job), then stop."""
        self.save()
        sig = self.preempt_signal or signal.SIGUSR1
        self.tracker.print(f"preempted ({signal.Signals(sig).name}): saved checkpoint step_{self.step}, stopping")
        previous = self.restore_signal_handlers().get(sig)
        if callable(previous):
            previous(sig, None)
        raise Preempted(0)

    def close(self) -> None:
        self.restore_signal_handlers()
        self.tracker.close()
