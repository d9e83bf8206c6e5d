"""What the methods that train on teacher ODE pairs share (DMD2's 1-step regression warm-up, Diffusion2GAN): the
regression distance between a one-step sample and the teacher's solution from the same noise, and the settings of a
pair set that a run writes for itself when it is missing (`distill.prepare.make_pairs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from distill.config import ConfigError
from distill.prepare import PairSettingsError

DISTANCES = ("l2", "pseudo_huber")
KEEP_TARGETS = ("teacher", "init")


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
    states: bool = False  # also store the DDIM path (trajectory-state data)


def with_shards(p, cfg):
    """The pairs settings with their folder: `shards`, or data.shards when that is unset (the run's own data)."""
    from omegaconf import DictConfig

    return DictConfig({**dict(p), "shards": p.shards or cfg.data.shards})


def shards_key(p) -> str:
    """The config key of `with_shards`'s folder for method.pairs `p`."""
    return "method.pairs.shards" if p.shards else "data.shards"


def one_step_generator(cfg, teacher, comps, init: str | None, device):
    """(lora, generator, trainable): a LoRA on the teacher's own UNet (one base for G and the real score) or a full
    fp32 copy of the teacher as stored; from the export `init` (a warm-up stage's) when given."""
    from pathlib import Path

    from distill.models.adapters import add_lora, load_lora
    from distill.models.loader import load_fp32_unet, load_unet

    m = cfg.method
    if m.lora.enabled:
        trainable = add_lora(teacher, m.lora.rank, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        if init:
            load_lora(teacher, str(Path(init) / "lora"))
        return True, teacher, trainable
    g = (load_unet(str(Path(init) / "unet"), torch.float32, device) if init
         else load_fp32_unet(comps, device).to(device)).requires_grad_(True)
    return False, g, list(g.parameters())


def check_pairs(p, key: str) -> None:
    from distill.prepare import PAIR_SOLVERS

    if not p.shards:
        raise ConfigError(f"{key}.shards is not set: a folder of pair shards (python -m distill.prepare pairs)")
    if p.solver not in PAIR_SOLVERS:
        raise ConfigError(f"{key}.solver={p.solver!r}: expected one of {PAIR_SOLVERS}")
    if p.solver_steps < 1 or (p.num_pairs is not None and p.num_pairs < 1) or p.batch_size < 1:
        raise ConfigError(f"{key}.solver_steps, num_pairs and batch_size must be >= 1")


def ensure_pairs(p, cfg, unet, guidance: float, key: str = "method.regression.pairs.shards") -> None:
    """Write the pair set `p` with the run's teacher when it is not complete (every process takes its share; a
    killed run resumes where it stopped). Without `prompts`, missing pairs are an error naming the key; a folder
    of pairs made with other settings (another model, solve or seed) is an error naming `key`, the config key of
    the folder."""
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
    settings = pairs_settings(cfg.model.pretrained, p.prompts, p.solver_steps, g, p.solver, res, p.seed, p.num_pairs,
                              p.states)
    if not pairs_complete(p.shards, settings):
        try:
            make_pairs(p.prompts, cfg.model.pretrained, p.shards, steps=p.solver_steps, guidance=g, solver=p.solver,
                       resolution=res, batch_size=p.batch_size, seed=p.seed, limit=p.num_pairs, unet=unet,
                       states=p.states)
        except PairSettingsError as e:  # the writer's message names its --output; a run's user sets a key
            raise PairSettingsError(f"{key}={p.shards!r}: {e.detail}: set {key} to a folder of its own (a "
                                    "`+debug=fast` run swaps in a random model: give it one), or the same settings "
                                    "to resume") from None


def regression_distance(x0: Tensor, target: Tensor, distance: str, huber_c: float) -> Tensor:
    """Mean over the batch of a per-sample latent distance: `l2` = mean squared error, `pseudo_huber` =
    sqrt(mean squared error + c^2) - c (the consistency methods' robust distance, per sample)."""
    d = (x0.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if distance == "pseudo_huber":
        d = torch.sqrt(d + huber_c ** 2) - huber_c
    return d.mean()


@dataclass
class RegressionConfig:
    """A one-step generator's warm-up on teacher ODE pairs (DMD2's 1-step recipe): a first stage of `steps` steps
    regressing G's one step from each pair's noise onto the teacher's solution from it; steps 0: none."""

    steps: int = 0  # the warm-up stage's own steps (the method's stage runs trainer.max_steps)
    lr: Optional[float] = None  # null: the generator's
    scheduler: Optional[str] = None  # null: the generator's (e.g. cosine: decay over the warm-up's own steps)
    warmup_steps: Optional[int] = None  # null: the generator's
    distance: str = "l2"  # l2 | pseudo_huber, on latents
    huber_c: float = 0.03
    # a multi-step student with a 1-step mode (DMD2's method.one_step_timestep): weight of a second term that keeps
    # G's outputs at the multi-step chain's timesteps on the teacher's (MSE of the UNet outputs at a pair latent
    # noised to one of them), so that the warm-up teaches the 1-step mode without unlearning the chain; 0: none
    keep_weight: float = 0.0
    # what the keep term holds G's chain outputs on: teacher (the frozen teacher, adapters off) | init (G itself as
    # the warm-up starts, a frozen copy: a student whose chain was distilled before, e.g. Hyper-SD's TSCD LoRA)
    keep_target: str = "teacher"
    pairs: PairsConfig = field(default_factory=PairsConfig)


class PairRegression:
    """What a one-step generator method (DMD2, SIM) needs for the regression warm-up stage: the two-stage plan,
    the pairs (written when missing), the generator built from the warm-up's export, its optimizer and its loss.
    The method's `method.regression` is a RegressionConfig; `phase` names its second stage."""

    phase = "main"

    @classmethod
    def check_regression(cls, m, one_step: bool, chain: bool = False) -> None:
        """`one_step`: the student samples in one step (a warm-up is allowed); `chain`: it also samples a
        multi-step chain (regression.keep_weight is allowed)."""
        r = m.regression
        if r.steps < 0:
            raise ConfigError(f"method.regression.steps={r.steps} must be >= 0 (0: no warm-up)")
        if not r.steps:  # no warm-up: its settings are inert
            return
        if r.keep_weight < 0 or (r.keep_weight > 0 and not chain):
            raise ConfigError(f"method.regression.keep_weight={r.keep_weight}: a weight >= 0 that only a multi-step "
                              "student with a 1-step mode (DMD2's method.one_step_timestep) takes")
        if r.keep_target not in KEEP_TARGETS:
            raise ConfigError(f"method.regression.keep_target={r.keep_target!r}: expected one of {KEEP_TARGETS}")
        if not one_step:
            raise ConfigError(f"method.regression.steps={r.steps}: the pair regression is a 1-step student's "
                              f"warm-up, but method.student_timesteps={list(m.student_timesteps)} has "
                              f"{len(m.student_timesteps)} steps")
        if r.distance not in DISTANCES:
            raise ConfigError(f"method.regression.distance={r.distance!r}: expected one of {DISTANCES}")
        from distill.optim import SCHEDULES

        if r.scheduler is not None and r.scheduler not in SCHEDULES:
            raise ConfigError(f"method.regression.scheduler={r.scheduler!r}: expected one of {SCHEDULES} (or null: "
                              "the generator's)")
        check_pairs(r.pairs, "method.regression.pairs")

    @classmethod
    def regression_plan(cls, cfg, run_dir):
        """None without a warm-up; else [regression on the pair shards, the method from its export]."""
        from distill.stages import Stage, stage_folder

        r = cfg.method.regression
        if not r.steps:
            return None
        first, second = stage_folder(run_dir, 0, "regression"), stage_folder(run_dir, 1, cls.phase)
        return [Stage("regression", 0, first, info={"phase": "regression"}, trainer={"max_steps": int(r.steps)},
                      data={"kind": "pairs", "shards": r.pairs.shards}),
                Stage(cls.phase, 1, second, info={"phase": cls.phase, "generator_init": str(first / "export")})]

    def regression_setup(self, stage, guidance: float) -> str | None:
        """Sets `self.regression` (this is the warm-up stage: pairs written if missing); returns the export the
        generator starts from (the warm-up's, in the stage after it) or None."""
        info = stage.info if stage is not None else {}
        self.regression = info.get("phase") == "regression"
        if self.regression:
            ensure_pairs(self.cfg.method.regression.pairs, self.cfg, self.teacher, guidance)
        return info.get("generator_init")

    def build_generator(self, init: str | None, device) -> None:
        """G (`one_step_generator`), from the warm-up's export `init` when given. Sets self.lora, self.generator,
        self.trainable."""
        self.lora, self.generator, self.trainable = one_step_generator(self.cfg, self.teacher, self.comps, init, device)
        self.generator_init = init

    def regression_optimizers(self, generator_overrides: dict):
        from distill.optim import OptimizerSpec

        r = self.cfg.method.regression
        own = {k: r[k] for k in ("lr", "scheduler", "warmup_steps") if r[k] is not None}
        return [OptimizerSpec("g", [{"params": self.trainable}], overrides={**generator_overrides, **own},
                              primary=True)]

    def regression_losses(self, batch, timestep: int, x0_of) -> dict:
        """G's one step from each pair's noise (pure noise at `timestep`, as it samples) against the teacher's
        solution; `x0_of(unet, x, t, cond)` is the method's own generator call."""
        from distill.profiling import span

        if batch.noise is None:
            raise ValueError("the regression stage trains on teacher ODE pairs: its batches need the pairs' noise "
                             "(data.kind=pairs, shards from `python -m distill.prepare pairs`)")
        r = self.cfg.method.regression
        t = torch.full((batch.noise.shape[0],), int(timestep), dtype=torch.long, device=batch.noise.device)
        with span("student"):
            x0 = x0_of(self.modules["generator"], batch.noise, t, batch.cond).float()
        loss = regression_distance(x0, batch.latents, r.distance, r.huber_c)
        return {"loss": loss, "loss_regression": loss.detach()}
