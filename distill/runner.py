"""Entry point behind train.py: validate the config, start Accelerate, agree on one run folder, train; and the
value train.py returns to Hydra's sweepers."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list
from omegaconf import DictConfig

from distill.config import validate
from distill.threads import auto_threads


def make_accelerator(cfg: DictConfig) -> Accelerator:
    kwargs = [InitProcessGroupKwargs(timeout=timedelta(minutes=30),
                                     backend="gloo" if cfg.trainer.deepspeed_gloo else None)]
    log_with = None if cfg.logger.name == "none" else cfg.logger.name
    acc = Accelerator(gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
                      mixed_precision=cfg.trainer.mixed_precision, log_with=log_with, kwargs_handlers=kwargs,
                      project_config=ProjectConfiguration(project_dir=".", logging_dir="."))
    threads = set_threads(cfg.trainer.num_threads)
    acc.print(f"torch threads per process: {threads}"
              + ("" if cfg.trainer.num_threads else " (trainer.num_threads=0: physical cores / local processes)"))
    if cfg.trainer.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc


def set_threads(num_threads: int) -> int:
    """torch's intra-op threads: `num_threads` if > 0, else auto_threads(). DataLoader workers run one thread each
    (torch sets it in every worker), so workers and the step share the cores without oversubscription."""
    n = num_threads if num_threads > 0 else auto_threads()
    torch.set_num_threads(n)
    return n


def shared_run_dir(cfg: DictConfig, acc: Accelerator) -> Path:
    """`output_dir` if given; else outputs/<timestamp> chosen by rank 0 and broadcast, so every rank (started
    a second apart by the launcher) writes into the same folder."""
    chosen = [cfg.output_dir or os.path.join("outputs", time.strftime("%Y-%m-%d_%H-%M-%S"))]
    if acc.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0]).resolve()


class RunDirError(RuntimeError):
    """The run folder cannot be written: reported before any model is loaded."""


def check_run_dir(run_dir: Path, min_free_mb: float = 64.0) -> None:
    """Fail before compute is spent when the run folder is not writable or its disk is nearly full (the
    checkpoint manager checks the real checkpoint size again once the models are built)."""
    import shutil

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"output_dir={str(run_dir)!r} is not writable: {e.strerror or e}") from None
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < min_free_mb:
        raise RunDirError(f"output_dir={str(run_dir)!r} has only {free_mb:.1f} MiB free")


def run(cfg: DictConfig) -> Path:
    """Train according to a composed Hydra config; returns the run folder."""
    cfg = validate(cfg)
    acc = make_accelerator(cfg)
    run_dir = shared_run_dir(cfg, acc)
    cfg.output_dir = str(run_dir)
    check_run_dir(run_dir)
    if cfg.logger.name != "none":
        acc.project_configuration.logging_dir = str(run_dir / "logs")
    from distill.stages import run_stages

    try:
        run_stages(cfg, acc, run_dir)  # one stage for most methods; a progressive method plans several
    finally:
        acc.end_training()
    return run_dir


def run_and_score(cfg: DictConfig) -> float:
    """train.py's job: train, then return the run's `optimize_metric`, the value Hydra's sweepers (Optuna, Nevergrad,
    ...) optimise. In a multirun a trial without `output_dir` runs in its own job folder (hydra.sweep.dir/N), not
    in outputs/<timestamp to the second>, which two short trials would share."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("output_dir") is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    return final_metric(run(cfg), cfg.get("optimize_metric") or "train/loss")


def final_metric(run_dir: Path, key: str) -> float:
    """The last logged value of `key` in the run's metrics.jsonl (the last stage's for a staged method). train/...
    values are means over their log window (trainer.log_every_steps), so this is the loss of the last window."""
    stages = sorted((run_dir / "stages").glob("*/metrics.jsonl"))
    path = run_dir / "metrics.jsonl" if (run_dir / "metrics.jsonl").exists() or not stages else stages[-1]
    values = [row[key] for row in _rows(path) if key in row]
    if values:
        return float(values[-1])
    if int(os.environ.get("RANK", "0")) != 0:
        return math.nan  # rank 0 writes metrics.jsonl; another rank may read it before the last row lands
    raise KeyError(f"optimize_metric={key!r} was never logged in {path}")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
