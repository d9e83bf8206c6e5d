"""Optimizers as specs. A method says what it trains (`OptimizerSpec`: parameter groups, hyper-parameters that
differ from `optim.*`, a cadence); the trainer builds one optimizer and one LR schedule per spec. Each schedule
counts that optimizer's OWN steps: a generator stepped every 5th step (DMD2) gets its whole decay over the steps it
takes, and its schedule state is checkpointed with the run (never patched back to the outer step on resume)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULES = ("constant", "linear", "cosine")
#: the `optim.*` keys an OptimizerSpec may override
SETTINGS = ("name", "lr", "betas", "eps", "weight_decay", "scheduler", "warmup_steps", "max_grad_norm")


@dataclass
class OptimizerSpec:
    """One optimizer of a method.

    `params`: torch param groups (dicts with "params") or a flat list of tensors. `overrides`: any of `SETTINGS`
    for this optimizer only (PAD's discriminator: its own lr and betas). `every_n_steps`/`offset`: the optimizer
    steps at outer steps s with s % every_n_steps == offset (its phase runs only then). `total_steps`: the length
    of its LR schedule in its own steps (None: the steps it takes in trainer.max_steps). `primary`: its loss terms
    log as `train/<term>`, the others' as `train/<name>_<term>` (a single optimizer is primary)."""

    name: str
    params: list
    overrides: dict[str, Any] = field(default_factory=dict)
    every_n_steps: int = 1
    offset: int = 0
    total_steps: int | None = None
    primary: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.overrides) - set(SETTINGS)
        if unknown:
            raise ValueError(f"optimizer {self.name!r}: unknown settings {sorted(unknown)} (known: {SETTINGS})")
        if self.every_n_steps < 1 or not 0 <= self.offset < self.every_n_steps:
            raise ValueError(f"optimizer {self.name!r}: every_n_steps={self.every_n_steps}, offset={self.offset}")

    def due(self, step: int) -> bool:
        """Whether this optimizer steps at outer step `step` (0-based)."""
        return step % self.every_n_steps == self.offset

    def steps_before(self, step: int) -> int:
        """How many times it has stepped in outer steps [0, step)."""
        return max(0, math.ceil((step - self.offset) / self.every_n_steps))

    def groups(self) -> list[dict]:
        ps = list(self.params)
        return ps if ps and isinstance(ps[0], dict) else [{"params": ps}]

    def settings(self, optim_cfg) -> dict[str, Any]:
        """`optim.*` with this spec's overrides on top."""
        s = {k: optim_cfg[k] for k in SETTINGS}
        s.update(self.overrides)
        return s


def lr_lambda(kind: str, warmup: int, total: int):
    """LR multiplier per step of ONE optimizer: linear warm-up, then constant | linear | cosine decay over `total`
    of its own steps. Stepped once per optimizer step on every rank, so it means the same at any process count (the
    scheduler is deliberately not handed to accelerator.prepare)."""
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler={kind!r}: expected one of {SCHEDULES}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


def build_optimizer(spec: OptimizerSpec, optim_cfg) -> torch.optim.Optimizer:
    s = spec.settings(optim_cfg)
    if s["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r}: name={s['name']!r}, expected one of {sorted(OPTIMIZERS)}")
    kwargs: dict[str, Any] = {"lr": s["lr"], "weight_decay": s["weight_decay"]}
    if s["name"] != "sgd":
        kwargs.update(betas=tuple(s["betas"]), eps=s["eps"])
    return OPTIMIZERS[s["name"]](spec.groups(), **kwargs)


def build_schedule(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int):
    s = spec.settings(optim_cfg)
    total = spec.total_steps if spec.total_steps is not None else spec.steps_before(max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s["scheduler"], s["warmup_steps"], total))


def schedule_state(schedule) -> dict:
    """A LambdaLR's JSON-able state (its step count and last LRs; the lambda is rebuilt from the config)."""
    return {k: v for k, v in schedule.state_dict().items() if k != "lr_lambdas"}


def load_schedule_state(schedule, state: dict) -> None:
    """Continue a schedule from its saved step count. The base LRs stay this run's (a resume with a changed
    `optim.lr` follows the new value from the next step on, as `config_changes` reports)."""
    base = list(schedule.base_lrs)
    schedule.load_state_dict({**state, "lr_lambdas": [None] * len(schedule.lr_lambdas)})
    schedule.base_lrs = base
