"""The small interface every method implements. The trainer knows nothing of LCD or GANs: it asks a method for its
trainable modules and optimizer specs, calls `losses` per phase, and runs the callbacks the method adds (EMA)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from distill.batch import Batch, sample_seed  # noqa: F401  (re-exported: methods and tests import them here)
from distill.diffusion import UNetCond
from distill.models.loader import Components
from distill.optim import OptimizerSpec
from distill.sampler import SamplerSpec

if TYPE_CHECKING:
    from distill.callbacks import Callback
    from distill.stages import Stage


class Method:
    """Base class. A subclass sets `Config` (its dataclass schema, `method.*`), `self.modules` (name -> trainable
    nn.Module, wrapped by Accelerate) and implements `optimizers` and `losses`; the rest has defaults.

    Registered by name in distill.methods._REGISTRY; its schema is checked by `check`; a progressive method plans
    its stages with `plan` (distill.stages runs them)."""

    #: the method's `method.*` schema (a dataclass); `name` is its registry name
    Config: ClassVar[type | None] = None
    #: what the trainer must provide in a Batch: "latents" (encode images / read latent shards) or "pixels"
    input_kind: ClassVar[str] = "latents"
    #: pretrained parts the method needs beyond what its input kind loads ("vae": a reward on decoded samples)
    extra_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig, comps: Components, device: torch.device, stage: Stage | None = None):
        self.cfg = cfg
        self.comps = comps
        self.device = device
        self.stage_info = stage  # this run's stage (None: a single-stage method)
        self.modules: dict[str, nn.Module] = {}
        self.optimizer_specs: list[OptimizerSpec] = []  # set by the trainer from `optimizers()`

    # -- configuration -----------------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Raise distill.config.ConfigError, naming the key, for settings that cannot run together."""

    @classmethod
    def plan(cls, cfg: DictConfig, run_dir: Path) -> list[Stage]:
        """The stages this method is made of, in order. One by default; a progressive method returns one per stage
        (see distill.stages: folders, skipping finished stages, what a stage hands to the next)."""
        from distill.stages import Stage

        return [Stage(name="", index=0, folder=Path(run_dir))]

    @classmethod
    def finish(cls, cfg: DictConfig, run_dir: Path, stages: list[Stage]) -> None:
        """After the last stage of a staged run, on the main process, with the last stage's export copied to
        `run_dir/export`: a chain's assembly (Hyper-SD's unified sampler card). Nothing by default."""

    # -- construction ------------------------------------------------------------------------------------
    def optimizers(self) -> list[OptimizerSpec]:
        """One spec per optimizer: its parameter groups, its own settings, cadence and schedule length."""
        raise NotImplementedError

    def set_prepared(self, modules: dict[str, nn.Module]) -> None:
        """Receive the Accelerate-wrapped modules (DDP / DeepSpeed) to use in `losses`."""
        self.modules.update(modules)

    def callbacks(self) -> list[Callback]:
        """Callbacks the method adds to the loop (EMA updates, warm-ups), run before the trainer's own."""
        return []

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's mixed precision for forwards outside the Accelerate-prepared modules (an EMA target)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.trainer.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def lora_fused(self, unet: nn.Module) -> contextlib.AbstractContextManager:
        """A pass of `unet` without gradient on merged LoRA weights where `method.lora.fuse_no_grad` allows
        (distill.models.adapters.lora_fused; a module without LoRA layers runs unchanged)."""
        from distill.models.adapters import lora_fused

        m = self.cfg.method
        return lora_fused(unet, "lora" in m and bool(m.lora.fuse_no_grad))

    # -- training ----------------------------------------------------------------------------------------
    def phases(self, step: int) -> tuple[str, ...]:
        """The optimizers to step this training step, in order: by default every spec that is due (its cadence).
        A phase named twice runs twice; its metrics are averaged."""
        return tuple(s.name for s in self.optimizer_specs if s.due(step))

    def phase_scope(self, phase: str) -> contextlib.AbstractContextManager:
        """Held by the trainer around all of a phase's forwards, backwards and its optimizer step. A GAN freezes
        here the network the phase does not train: frozen through backward too, so a gradient-checkpointed
        recompute sees the same requires_grad flags as its forward (see distill.methods.gan.frozen)."""
        return contextlib.nullcontext()

    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        """Loss terms for `phase`; the trainer back-propagates `out["loss"]` (its finiteness decides whether the
        step is taken) and logs every term, averaged over micro-batches and repeats."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensor state outside the Accelerate-managed modules and optimizers (EMA weights, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def meta_state(self) -> dict:
        """JSON-able state (counters)."""
        return {}

    def load_meta_state(self, meta: dict) -> None:
        pass

    # -- evaluation and export ---------------------------------------------------------------------------
    def sampler(self) -> SamplerSpec | None:
        """How the trained model samples (distill.sampler): `sample`, the export's card and export.json, the
        pipeline `load_export` builds and bench/quality.py all follow this one spec. None: no sampler."""
        return None

    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        """Latents sampled from the model being trained (for validation grids)."""
        raise NotImplementedError

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        raise NotImplementedError
