"""Hyper-SD (arXiv 2404.13686) end to end: one chain of methods on the one loop, ending in ONE LoRA that samples at
1 to 8 steps with TCD's eta per step count. Written from the paper; ByteDance released weights only.

The chain (`plan`), each stage initialised from the previous stage's export, the LoRA continued throughout (so the
recipe's merge is the identity here: one adapter is trained by every stage, nothing is left to merge):

  1. TSCD: segmented consistency (distill.methods.pcm) with K = `segment_stages` (8 -> 4 -> 2 -> 1), one stage each;
  2. human-feedback learning (distill.methods.refl, `reward_steps` > 0): the student's own n-step samples scored by
     `reward.model`, the K = 1 consistency loss as the regulariser;
  3. score distillation (distill.methods.dmd2, `score.steps` > 0): DMD2 with the generator at `score.timestep` (999,
     the paper's one step), or over a chain of the unified grid's timesteps (`score.student_timesteps`, backward
     simulation) with a 1-step mode of its own (`score.one_step_timestep`, off the grid, e.g. 399); the real score
     the teacher (the base with the adapter off) at `score.guidance_scale`. With `score.regression.steps` > 0 a
     warm-up stage comes first: DMD2's pair regression of the 1-step mode on the run's own trajectories, its chain
     held on the LoRA as it came out of the reward stage (`keep_target: init`).

`finish` writes the run's export.json and card with the unified sampler: TCDScheduler on the LCM grid of
`num_ddim_timesteps` (original_inference_steps), `inference_steps` with their `inference_etas` (and the 1-step mode's
timestep as the 1-step call's `timesteps`).

A Hyper-SD run has no networks of its own: every stage runs another method (Stage.method names it), checked on that
method's schema when the chain is validated, so a typo in any stage fails before the first one trains.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from distill.config import ConfigError
from distill.methods.base import Method
from distill.methods.dmd2 import OptimOverrides
from distill.methods.pairs import RegressionConfig
from distill.methods.pcm import PCM, PCMConfig
from distill.methods.refl import RewardConfig, check_reward


@dataclass
class ScoreStageConfig:
    """The score-distillation stage (DMD2's settings for it): at one step (the paper's), or over a chain of the
    unified grid's timesteps with a 1-step mode of its own."""

    steps: int = 0  # 0: no score-distillation stage
    batch_size: Optional[int] = None  # data.batch_size of this stage (three UNets in memory; null: the run's)
    timestep: int = 999  # the generator's one conditioning timestep (TCD's first at any grid)
    # a chain instead (null: [timestep]): descending points of the TCD grid of method.num_ddim_timesteps that DMD2's
    # backward simulation trains, e.g. [999, 749, 499, 249] (the unified sampler's 4 steps; 2 steps visit 999, 499)
    student_timesteps: Optional[list[int]] = None
    # with a chain: the LoRA's own 1-step mode (pure noise in at this timestep, off the grid, e.g. 399); the card's
    # 1-step call passes it as the pipeline's timesteps (null: 1 step is the grid's first, 999)
    one_step_timestep: Optional[int] = None
    # a warm-up stage before it (DMD2's pair regression, steps > 0) on the run's own trajectories (pairs: noise and
    # the teacher's solution): the 1-step mode regressed, keep_weight / keep_target=init holding the chain
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    guidance_scale: Optional[float] = None  # the real score's CFG (standard form); null: the TSCD teacher's w + 1
    t_min: int = 20
    t_max: int = 980
    generator_every_n_steps: int = 5
    gan_generator_weight: float = 5e-3
    gan_fake_weight: float = 1e-2
    head_channels: int = 256
    generator: OptimOverrides = field(default_factory=OptimOverrides)
    fake: OptimOverrides = field(default_factory=OptimOverrides)


@dataclass
class HyperSDConfig(PCMConfig):
    name: str = "hyper_sd"
    segment_stages: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    reward: RewardConfig = field(default_factory=RewardConfig)
    reward_steps: int = 0  # steps of the reward stage (0: none)
    reward_lr: Optional[float] = None  # the reward stage's learning rate (null: optim.lr)
    score: ScoreStageConfig = field(default_factory=ScoreStageConfig)
    inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the unified LoRA's step counts
    inference_etas: list[float] = field(default_factory=lambda: [1.0, 0.6, 0.3, 0.3])  # TCD's gamma for each


def score_timesteps(score) -> list[int]:
    """The score stage's generator timesteps: its chain, or the paper's one step at `timestep`."""
    return [int(t) for t in (score.student_timesteps or [score.timestep])]


def tcd_timesteps(grid: int, n: int) -> list[int]:
    """The timesteps TCDScheduler samples `n` steps at on a skip grid of `grid` points (original_inference_steps)."""
    from diffusers import TCDScheduler

    sched = TCDScheduler(num_train_timesteps=1000)
    sched.set_timesteps(n, original_inference_steps=grid)
    return [int(t) for t in sched.timesteps]


PCM_FIELDS = tuple(f.name for f in dataclasses.fields(PCMConfig) if f.name != "name")


def _pcm_settings(m) -> dict:
    return {k: OmegaConf.to_container(m[k], resolve=True) if OmegaConf.is_config(m[k]) else m[k] for k in PCM_FIELDS}


class HyperSD(Method):
    Config = HyperSDConfig

    @classmethod
    def check(cls, cfg) -> None:
        from distill.stages import stage_method_config

        m = cfg.method
        if not m.lora.enabled:
            raise ConfigError("method.lora.enabled=false: Hyper-SD's product is one LoRA for 1 to 8 steps (every "
                              "stage continues it); a full-UNet chain is not built")
        if not m.segment_stages:
            raise ConfigError("method.segment_stages is empty: Hyper-SD starts with TSCD's stages, e.g. [8, 4, 2, 1]")
        PCM.check(cfg)
        if m.reward_steps < 0 or m.score.steps < 0:
            raise ConfigError(f"method.reward_steps={m.reward_steps} and method.score.steps={m.score.steps} must be "
                              ">= 0 (0: no such stage)")
        if m.reward_steps:
            check_reward(m.reward, m.num_ddim_timesteps)
        steps, etas = list(m.inference_steps), list(m.inference_etas)
        if not steps or len(etas) != len(steps):
            raise ConfigError(f"method.inference_etas={etas}: one TCD gamma per method.inference_steps={steps}")
        if any(not 1 <= n <= m.num_ddim_timesteps for n in steps) or any(not 0.0 <= e <= 1.0 for e in etas):
            raise ConfigError(f"method.inference_steps={steps} / method.inference_etas={etas}: steps in [1, "
                              f"method.num_ddim_timesteps={m.num_ddim_timesteps}], etas in [0, 1]")
        if m.score.steps:
            visited = sorted({t for n in steps if n > 1 for t in tcd_timesteps(m.num_ddim_timesteps, n)},
                             reverse=True)  # what the unified sampler's chains evaluate the LoRA at
            ts = score_timesteps(m.score)
            if m.score.student_timesteps is not None and any(t not in visited for t in ts):
                raise ConfigError(f"method.score.student_timesteps={ts}: the unified sampler (TCD on the grid of "
                                  f"method.num_ddim_timesteps={m.num_ddim_timesteps} at method.inference_steps="
                                  f"{steps}) visits only {visited}")
            one = m.score.one_step_timestep
            if one is not None and (one in visited or 1 not in steps):
                raise ConfigError(f"method.score.one_step_timestep={one}: the 1-step mode takes a timestep the "
                                  f"sampler's chains never visit (not one of {visited}), and 1 among "
                                  f"method.inference_steps={steps}")
            r = m.score.regression
            if r.steps and not r.pairs.shards and cfg.data.kind != "pairs":
                raise ConfigError(f"method.score.regression.steps={r.steps} with data.kind={cfg.data.kind}: the "
                                  "warm-up regresses onto teacher pairs; set method.score.regression.pairs.shards "
                                  "(written by the run when method.score.regression.pairs.prompts is set)")
        for stage in cls.plan(cfg, Path("/nonexistent-run")):  # every stage's config, on its method's schema
            probe = copy.deepcopy(cfg)
            for key, value in stage.trainer.items():
                probe.trainer[key] = value
            stage_method_config(probe, stage)

    @classmethod
    def plan(cls, cfg, run_dir):
        from distill.stages import Stage, stage_folder

        m = cfg.method
        pcm = _pcm_settings(m)
        stages: list[Stage] = []

        def add(name: str, method: dict, trainer: dict, optim: dict | None = None, info_key: str = "student_init",
                data: dict | None = None, info: dict | None = None):
            i = len(stages)
            info = {**(info or {}), **({info_key: str(stages[-1].folder / "export")} if stages else {})}
            stages.append(Stage(name, i, stage_folder(run_dir, i, name), info=info, trainer=trainer,
                                optim=optim or {}, method=method, data=data or {}))

        ks = list(m.segment_stages)
        per = list(m.segment_steps) * (len(ks) if len(m.segment_steps) == 1 else 1)
        for j, k in enumerate(ks):
            add(f"tscd_k{k}", {**pcm, "name": "pcm", "num_segments": int(k), "segment_stages": [],
                               "segment_steps": []}, {"max_steps": int(per[j])} if per else {})
        if m.reward_steps:
            reward = OmegaConf.to_container(m.reward, resolve=True)
            add("reward", {**pcm, "name": "refl", "num_segments": int(ks[-1]), "segment_stages": [],
                           "segment_steps": [], "reward": reward}, {"max_steps": int(m.reward_steps)},
                {"lr": float(m.reward_lr)} if m.reward_lr is not None else None)
        if m.score.steps:
            s = OmegaConf.to_container(m.score, resolve=True)
            g = s.pop("guidance_scale")
            s.pop("steps")
            batch = s.pop("batch_size")
            ts = score_timesteps(m.score)
            del s["student_timesteps"], s["timestep"]
            reg = s.pop("regression")
            if reg["steps"]:  # the warm-up reads the run's own pairs (trajectories) unless given others
                reg["pairs"]["shards"] = reg["pairs"]["shards"] or str(cfg.data.shards)
            dmd2 = {"name": "dmd2", "lora": pcm["lora"], "student_timesteps": ts, "regression": reg,
                    "guidance_scale": float(g if g is not None else m.w_min + 1.0), **s}
            data = {"batch_size": int(batch)} if batch else {}
            val = sorted({1, len(ts)})
            if reg["steps"]:
                add("score_warmup", dmd2, {"max_steps": int(reg["steps"]), "validation_steps": val},
                    info_key="generator_init", data={**data, "kind": "pairs", "shards": reg["pairs"]["shards"]},
                    info={"phase": "regression"})
            add("score", dmd2, {"max_steps": int(m.score.steps), "validation_steps": val}, info_key="generator_init",
                data=data or None, info={"phase": "dmd2"} if reg["steps"] else None)
        return stages

    def __init__(self, cfg, comps, device, stage=None):
        raise RuntimeError("hyper_sd is a chain: each of its stages runs another method (see HyperSD.plan)")

    @classmethod
    def finish(cls, cfg, run_dir, stages) -> None:
        """The run's export: the last stage's LoRA with the unified TCD sampler (eta per step count) in export.json
        and the card."""
        from distill.card import model_card
        from distill.sampler import SamplerSpec

        m = cfg.method
        out = Path(run_dir) / "export"
        info = json.loads((out / "export.json").read_text())
        old = SamplerSpec.from_info(info)
        for key in (*old.to_info(), "timesteps", "num_segments"):
            info.pop(key, None)
        steps, etas = [int(n) for n in m.inference_steps], [float(e) for e in m.inference_etas]
        one = m.score.one_step_timestep if m.score.steps else None  # the 1-step mode's own timestep
        spec = SamplerSpec("tcd", tuple(steps), 1.0, eta=etas[steps.index(sorted(steps)[len(steps) // 2])],
                           original_inference_steps=int(m.num_ddim_timesteps), etas=dict(zip(steps, etas)),
                           timesteps={1: (int(one),)} if one is not None else {})
        info.update(spec.to_info())
        info["method"] = "hyper-sd-lora"
        info["num_ddim_timesteps"] = int(m.num_ddim_timesteps)
        info["stages"] = [s.name for s in stages]
        (out / "export.json").write_text(json.dumps(info, indent=1, default=str))
        (out / "README.md").write_text(model_card(info, out.resolve()))
