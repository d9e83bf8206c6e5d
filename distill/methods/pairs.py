"""What the methods that train on teacher ODE pairs share (DMD2's 1-step regression warm-up, Diffusion2GAN): the
regression distance between a one-step sample and the teacher's solution from the same noise, and the settings of a
pair set that a run writes for itself when it is missing (`distill.prepare.make_pairs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from distill.config import ConfigError

DISTANCES = ("l2", "pseudo_huber")


@dataclass
class PairsConfig:
    """A teacher ODE pair set: where its shards are and, when `prompts` is set, how a run writes it if it is not
    there yet (the same as `python -m distill.prepare pairs`)."""

    shards: Optional[str] = None  # the pair shards' folder (data.kind=pairs)
    prompts: Optional[str] = None  # the prompt list to write them from when missing (null: they must exist)
    num_pairs: Optional[int] = None  # the first N prompts (null: all)
    solver: str = "ddim"  # ddim | euler, trailing timesteps
    solver_steps: int = 25
    guidance_scale: Optional[float] = None  # the solve's CFG; null: the method's guidance_scale
    seed: int = 0  # the set's noise seed (each pair's noise from it and the sample key)
    batch_size: int = 32


def check_pairs(p, key: str) -> None:
    from distill.prepare import PAIR_SOLVERS

    if not p.shards:
        raise ConfigError(f"{key}.shards is not set: a folder of pair shards (python -m distill.prepare pairs)")
    if p.solver not in PAIR_SOLVERS:
        raise ConfigError(f"{key}.solver={p.solver!r}: expected one of {PAIR_SOLVERS}")
    if p.solver_steps < 1 or (p.num_pairs is not None and p.num_pairs < 1) or p.batch_size < 1:
        raise ConfigError(f"{key}.solver_steps, num_pairs and batch_size must be >= 1")


def ensure_pairs(p, cfg, unet, guidance: float) -> None:
    """Write the pair set `p` with the run's teacher when it is not complete (every process takes its share; a
    killed run resumes where it stopped). Without `prompts`, missing pairs are an error naming the key."""
    from pathlib import Path

    from distill.prepare import make_pairs, pairs_complete, pairs_settings

    g = float(p.guidance_scale if p.guidance_scale is not None else guidance)
    res = int(cfg.data.resolution)
    if p.prompts is None:
        if not any(Path(p.shards).glob("*.tar")):
            raise FileNotFoundError(f"method.regression.pairs.shards={p.shards!r} holds no pair shards and "
                                    "method.regression.pairs.prompts is not set: write them with `python -m "
                                    "distill.prepare pairs`, or set prompts to write them here")
        return
    settings = pairs_settings(cfg.model.pretrained, p.prompts, p.solver_steps, g, p.solver, res, p.seed, p.num_pairs)
    if not pairs_complete(p.shards, settings):
        make_pairs(p.prompts, cfg.model.pretrained, p.shards, steps=p.solver_steps, guidance=g, solver=p.solver,
                   resolution=res, batch_size=p.batch_size, seed=p.seed, limit=p.num_pairs, unet=unet)


def regression_distance(x0: Tensor, target: Tensor, distance: str, huber_c: float) -> Tensor:
    """Mean over the batch of a per-sample latent distance: `l2` = mean squared error, `pseudo_huber` =
    sqrt(mean squared error + c^2) - c (the consistency methods' robust distance, per sample)."""
    d = (x0.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if distance == "pseudo_huber":
        d = torch.sqrt(d + huber_c ** 2) - huber_c
    return d.mean()
