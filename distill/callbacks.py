"""Callbacks on the one loop (refiners' training_utils/callback.py): what happens around steps without living in
`Trainer.fit`. Hooks, in the order the trainer calls them:
  on_fit_start(trainer)             after the trainer is built, before the first step (resume lives here)
  on_train_step_end(trainer, step)  inside `train_step`, after every optimizer of a step that was taken (EMA)
  on_step_end(trainer, logs)        after each loop step, `trainer.step` already counts it (log, save, validate)
  on_fit_end(trainer)               after the last step (final save, grid, export)
The method's own callbacks run first, then `default_callbacks`."""

from __future__ import annotations

import signal
import threading
import time

import torch

from distill.parallel import gathered, no_zero3_init, zero3_enabled

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# SLURM's warning signal (USR1 forwarded to every rank by launch/slurm/train.sbatch; USR2 from submitit) only sets a
# flag; all ranks agree at the next step boundary, save a checkpoint and stop, so a requeued job resumes=latest.
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exit status 0 (the job script requeues)."""


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_train_step_end(self, trainer, step: int) -> None: ...
    def on_step_end(self, trainer, logs: dict) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def close(self) -> None: ...


class EMAUpdate(Callback):
    """Update an EMA copy after every step that was taken. `ema_half_life_images` (edm's ema_halflife_kimg): the
    per-step decay is 0.5 ** (images per step / half-life), so the EMA means the same at any batch size or process
    count; without it the EMA's own per-step decay (`ema_decay`, kept as an alias) applies."""

    def __init__(self, ema, source, half_life_images: float | None = None, warmup_steps: bool = False):
        self.ema, self.source, self.half_life, self.warmup_steps = ema, source, half_life_images, warmup_steps

    def on_fit_start(self, trainer) -> None:
        if self.half_life:
            self.ema.decay = 0.5 ** (trainer.images_per_step / self.half_life)

    def on_train_step_end(self, trainer, step: int) -> None:
        self.ema.update(self.source, step if self.warmup_steps else None)


class MetricsLog(Callback):
    """Every trainer.log_every_steps: the window's mean of each logged value (on device until now), averaged over
    ranks, with samples/s and the loader's and the trainer's counters; rank 0 writes it."""

    def __init__(self):
        self.window: dict[str, list] = {}
        self.samples, self.t0 = 0, time.time()

    def on_step_end(self, trainer, logs: dict) -> None:
        for k, v in logs.items():
            self.window.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float64, device=trainer.device))
        self.samples += trainer.last_batch_size * trainer.acc.num_processes
        if trainer.step % trainer.cfg.trainer.log_every_steps and trainer.step != trainer.cfg.trainer.max_steps:
            return
        keys = sorted(self.window)
        metrics = {}
        if keys:
            t = torch.stack([torch.stack(self.window[k]).mean() for k in keys])
            if trainer.acc.num_processes > 1:
                t = trainer.acc.reduce(t, reduction="mean")
            metrics = dict(zip(keys, t.tolist()))
        metrics["samples_per_s"] = self.samples / max(time.time() - self.t0, 1e-9)
        metrics.update(trainer.loader_counters())
        metrics.update({f"train/{k}": v for k, v in trainer.counters.items()})
        trainer.tracker.log(metrics, trainer.step)
        trainer.show({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("train/loss")})
        self.window, self.samples, self.t0 = {}, 0, time.time()


class Preemption(Callback):
    """Checkpoint and stop on SIGUSR1/SIGUSR2 (SLURM, submitit), all ranks at the same step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in PREEMPT_SIGNALS:
                self.previous[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.signal = signum

    def on_step_end(self, trainer, logs: dict) -> None:
        if trainer.step >= trainer.cfg.trainer.max_steps or not trainer.any_rank(self.signal is not None):
            return
        trainer.save()
        sig = self.signal or signal.SIGUSR1
        trainer.tracker.print(f"preempted ({signal.Signals(sig).name}): saved checkpoint step_{trainer.step}, stopping")
        previous = self.close().get(sig)
        if callable(previous):  # hand the signal to whoever handled it before (submitit requeues the job)
            previous(sig, None)
        raise Preempted(0)

    def close(self) -> dict[int, object]:
        previous, self.previous = self.previous, {}
        for s, h in previous.items():
            signal.signal(s, h)
        return previous


class Checkpointing(Callback):
    """Resume at the start; save every trainer.checkpoint_every_steps and at the end."""

    def on_fit_start(self, trainer) -> None:
        trainer.resume()

    def on_step_end(self, trainer, logs: dict) -> None:
        every, max_steps = trainer.cfg.trainer.checkpoint_every_steps, trainer.cfg.trainer.max_steps
        if trainer.step % every == 0 and trainer.step < max_steps:
            trainer.save()

    def on_fit_end(self, trainer) -> None:
        trainer.save()


class Validation(Callback):
    """A grid of the model's samples for trainer.validation_prompts at each trainer.validation_steps count, with
    per-sample seeded noise (the same noise at every validation, batch size and process count)."""

    def on_step_end(self, trainer, logs: dict) -> None:
        every = trainer.cfg.trainer.validate_every_steps
        if every and trainer.step % every == 0:
            self.validate(trainer)

    def on_fit_end(self, trainer) -> None:
        self.validate(trainer)

    @torch.no_grad()
    def validate(self, trainer) -> None:
        from distill.methods.base import Method

        cfg, acc = trainer.cfg, trainer.acc
        prompts = list(cfg.trainer.validation_prompts)
        if not prompts or type(trainer.method).sample is Method.sample:  # nothing to sample (a VAE)
            acc.wait_for_everyone()
            return
        # Under ZeRO-3 a forward gathers the student's weights on every rank at once: all ranks sample, rank 0 saves.
        if acc.is_main_process or zero3_enabled(acc):
            from distill.batch import prompt_cond
            from distill.diffusion import seeded_noise
            from distill.evaluate import save_grid
            from distill.models import decode_latents

            comps = self.components(trainer)
            res, n = cfg.data.resolution, len(prompts)
            cond = prompt_cond(comps, prompts, res, trainer.device)
            scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
            seeds = [cfg.trainer.validation_seed + i for i in range(n)]
            c = comps.unet.config.in_channels if comps.unet is not None else 4
            noise = seeded_noise(seeds, (n, c, res // scale, res // scale), trainer.device, torch.float32)
            columns = []
            for steps in cfg.trainer.validation_steps:
                lat = trainer.method.sample(cond, noise, int(steps), seeds)
                if acc.is_main_process:
                    columns.append(decode_latents(comps, lat.to(comps.vae.dtype)).float().cpu())
            if acc.is_main_process:
                path = trainer.run_dir / "samples" / f"step_{trainer.step:06d}.png"
                save_grid(columns, path, row_labels=prompts,
                          col_labels=[f"{s} steps" for s in cfg.trainer.validation_steps])
                trainer.tracker.log_image("val/samples", path, trainer.step)
        acc.wait_for_everyone()

    @staticmethod
    def components(trainer):
        """Latent shards: the text encoders and VAE are loaded only here (rank 0; every rank under ZeRO-3)."""
        from distill.batch import ENCODERS
        from distill.models import load_components

        comps, cfg = trainer.comps, trainer.cfg
        need = [p for p in ENCODERS if getattr(comps, p) is None and not (comps.arch == "sd15" and p.endswith("_2"))]
        if need:
            with no_zero3_init(trainer.acc):
                extra = load_components(cfg.model.pretrained, vae=cfg.model.vae, parts=tuple(need),
                                        dtype=torch.float32, device=trainer.device)
            for p in need:
                setattr(comps, p, getattr(extra, p))
        return comps


class FinalExport(Callback):
    """trainer.export_at_end: the method's export into <run>/export. Under ZeRO-3 every rank gathers the full
    weights and rank 0 writes them (loading the teacher's text encoders for the single file whole, not partitioned
    on one rank alone, which would hang)."""

    def on_fit_end(self, trainer) -> None:
        if not trainer.cfg.trainer.export_at_end:
            return
        params = [p for m in trainer.method.modules.values() for p in m.parameters()]
        with gathered(params), no_zero3_init(trainer.acc):
            if trainer.acc.is_main_process:
                out = trainer.run_dir / "export"
                trainer.method.export(out, DTYPES[trainer.cfg.trainer.export_dtype])
                trainer.tracker.print(f"exported to {out}")
            trainer.acc.wait_for_everyone()


def default_callbacks() -> list[Callback]:
    """The loop's own callbacks, in order: log, preempt, save, validate, export."""
    return [MetricsLog(), Preemption(), Checkpointing(), Validation(), FinalExport()]
