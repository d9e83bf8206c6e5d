"""Entry point behind train.py: validate the config, start Accelerate, agree on one run folder, train."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list
from omegaconf import DictConfig

from distill.config import validate


def make_accelerator(cfg: DictConfig) -> Accelerator:
    kwargs = [InitProcessGroupKwargs(timeout=timedelta(minutes=30),
                                     backend="gloo" if cfg.trainer.deepspeed_gloo else None)]
    log_with = None if cfg.logger.name == "none" else cfg.logger.name
    acc = Accelerator(gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
                      mixed_precision=cfg.trainer.mixed_precision, log_with=log_with, kwargs_handlers=kwargs,
                      project_config=ProjectConfiguration(project_dir=".", logging_dir="."))
    if cfg.trainer.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc


def shared_run_dir(cfg: DictConfig, acc: Accelerator) -> Path:
    """`output_dir` if given; else outputs/<timestamp> chosen by rank 0 and broadcast, so every rank (started
    a second apart by the launcher) writes into the same folder."""
    chosen = [cfg.output_dir or os.path.join("outputs", time.strftime("%Y-%m-%d_%H-%M-%S"))]
    if acc.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0]).resolve()


def run(cfg: DictConfig) -> Path:
    """Train according to a composed Hydra config; returns the run folder."""
    cfg = validate(cfg)
    acc = make_accelerator(cfg)
    run_dir = shared_run_dir(cfg, acc)
    cfg.output_dir = str(run_dir)
    if cfg.logger.name != "none":
        acc.project_configuration.logging_dir = str(run_dir / "logs")
    from accelerate.utils import set_seed

    from distill.trainer import Trainer

    set_seed(cfg.trainer.seed, device_specific=False)
    trainer = None
    try:
        trainer = Trainer(cfg, acc, run_dir)
        trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        acc.end_training()
    return run_dir
