"""The small interface every method implements. The trainer knows nothing of LCD or GANs: it asks a method
for its trainable modules and optimizer groups, calls `losses` per phase, and `after_step` once per step."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from distill.diffusion import UNetCond
from distill.models.loader import Components


@dataclass
class Batch:
    """One training batch as methods see it: latents and UNet conditioning (or raw pixels for a VAE)."""

    latents: Tensor | None
    cond: UNetCond | None
    captions: list[str]
    pixels: Tensor | None = None
    extra: dict = field(default_factory=dict)

    seeds: list[int] = field(default_factory=list)  # one per sample: its random draws never depend on batching

    def generators(self, tag: str) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by (sample seed, tag): each draw of a step has its own tag, so
        a sample's noise, timestep and w depend only on the run seed, the step and the sample, not on batch
        size, process count or call order (this is what makes 1 and 2 processes train alike)."""
        return [torch.Generator().manual_seed(_mix(s, tag)) for s in self.seeds]

    def randn(self, tag: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators(tag)]).to(device)

    def rand(self, tag: str, device: torch.device) -> Tensor:
        return torch.stack([torch.rand((), generator=g) for g in self.generators(tag)]).to(device)

    def randint(self, tag: str, low: int, high: int, device: torch.device) -> Tensor:
        return torch.stack([torch.randint(low, high, (), generator=g) for g in self.generators(tag)]).to(device)

    @property
    def size(self) -> int:
        ref = self.latents if self.latents is not None else self.pixels
        return ref.shape[0]


def _mix(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{tag}".encode(), digest_size=8).digest(), "little") >> 1


def sample_seed(run_seed: int, step: int, key: str) -> int:
    """The seed of one sample's random draws at one step: from the sample key alone (not its shard), so the
    same sample read from image shards or from precomputed latent shards gets the same noise."""
    return _mix(run_seed, f"{step}/{key}")


class Method:
    """Base class. Subclasses set `self.modules` (name -> trainable nn.Module, wrapped by Accelerate) and
    implement `param_groups`, `losses`; the rest has sensible defaults."""

    #: what the trainer must provide in a Batch: "latents" (encode images / read latent shards) or "pixels"
    input_kind: str = "latents"
    #: names of the optimizers, in the order of `param_groups`; phases are named after them
    optimizer_names: tuple[str, ...] = ("g",)

    def __init__(self, cfg: DictConfig, comps: Components, device: torch.device):
        self.cfg = cfg
        self.comps = comps
        self.device = device
        self.modules: dict[str, nn.Module] = {}

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def stages(cls, cfg: DictConfig, run_dir: Path) -> list[DictConfig]:
        """The configs of the runs this method is made of, in order. One by default; a progressive method
        returns one per stage (each can point its model at the previous stage's export under run_dir)."""
        return [cfg]

    def param_groups(self) -> list[list[dict]]:
        """One list of torch param groups per optimizer (see `optimizer_names`)."""
        raise NotImplementedError

    def set_prepared(self, modules: dict[str, nn.Module]) -> None:
        """Receive the Accelerate-wrapped modules (DDP / DeepSpeed) to use in `losses`."""
        self.modules.update(modules)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's mixed precision for forwards outside the Accelerate-prepared modules (an EMA target)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.trainer.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # -- training ----------------------------------------------------------------------------------------
    def phases(self, step: int) -> tuple[str, ...]:
        """The optimizers to step this training step, in order (a GAN returns ("d", "g"))."""
        return self.optimizer_names

    def phase_scope(self, phase: str) -> contextlib.AbstractContextManager:
        """Held by the trainer around all of a phase's forwards, backwards and its optimizer step. A GAN freezes
        here the network the phase does not train: frozen through backward too, so a gradient-checkpointed
        recompute sees the same requires_grad flags as its forward (see distill.methods.gan.frozen)."""
        return contextlib.nullcontext()

    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        """Loss terms for `phase`; the trainer back-propagates `out["loss"]`, logs every scalar."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called once after every optimizer step (EMA updates, stage changes)."""

    def is_done(self, step: int) -> bool:
        """A method may end a run before trainer.max_steps (a staged schedule)."""
        return False

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensor state outside the Accelerate-managed modules and optimizers (EMA weights, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def meta_state(self) -> dict:
        """JSON-able state (stage position, counters)."""
        return {}

    def load_meta_state(self, meta: dict) -> None:
        pass

    # -- evaluation and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        """Latents sampled from the model being trained (for validation grids)."""
        raise NotImplementedError

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        raise NotImplementedError
