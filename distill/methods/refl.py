"""Reward fine-tuning of a few-step student (Hyper-SD's human-feedback stage, arXiv 2404.13686; ReFL, ImageReward
arXiv 2304.05977), written from the papers, on the segmented consistency objective as its regulariser.

Each training step draws one step count n from `method.reward.sample_steps` (the same on every rank: a function of
the run seed and the step, as DMD2's simulated steps). The student samples from pure noise as its exported TCD
sampler does (n points of the LCM grid of `num_ddim_timesteps`, TCD's gamma `method.reward.eta` between them): the
first n - 1 steps without gradient, the last step's x0 with it. That x0 is decoded by the VAE (differentiably,
unclamped) and scored by the reward model (distill.models.reward) against the batch's captions; the loss is

    regularizer_weight x (the segmented consistency loss of PCM on the same batch) - weight x mean reward

so the student moves towards what the reward model prefers while the consistency term keeps it on the teacher's
trajectories. The reward model is frozen and never prepared; only the student (the LoRA, or the full UNet with its
EMA target) trains. `method.reward.batch_size` limits how many of a micro-batch's samples go through the decode and
reward (the VAE decoder's activations dominate the memory at SDXL size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from distill.config import ConfigError
from distill.diffusion import Denoiser, lcm_inference_timesteps, tcd_step
from distill.methods.base import Batch
from distill.methods.pcm import PCM, PCMConfig
from distill.profiling import span


@dataclass
class RewardConfig:
    model: str = "distill:tiny-reward"  # a reward model folder (distill.models.reward) or distill:tiny-reward
    weight: float = 0.05  # the reward term's weight: loss -= weight x mean reward
    regularizer_weight: float = 1.0  # the segmented consistency loss's weight on the same batch
    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # the student's step counts, one per step
    eta: float = 0.3  # TCD's gamma between the sampled steps (the exported sampler's)
    batch_size: Optional[int] = None  # samples per micro-batch through decode and reward (null: all)


@dataclass
class ReFLConfig(PCMConfig):
    name: str = "refl"
    num_segments: int = 1  # the student maps every x_t to x0 (TSCD's last stage)
    reward: RewardConfig = field(default_factory=RewardConfig)


def check_reward(r, num_ddim_timesteps: int, key: str = "method.reward") -> None:
    from distill.models.reward import resolve_reward

    steps = list(r.sample_steps)
    if not steps or any(not 1 <= n <= num_ddim_timesteps for n in steps):
        raise ConfigError(f"{key}.sample_steps={steps}: expected step counts in [1, method.num_ddim_timesteps="
                          f"{num_ddim_timesteps}] (the student samples points of its skip grid)")
    if not 0.0 <= r.eta <= 1.0:
        raise ConfigError(f"{key}.eta={r.eta}: TCD's gamma lies in [0, 1]")
    if r.weight < 0 or r.regularizer_weight < 0:
        raise ConfigError(f"{key}.weight={r.weight} and {key}.regularizer_weight={r.regularizer_weight} must be >= 0")
    if r.batch_size is not None and r.batch_size < 1:
        raise ConfigError(f"{key}.batch_size={r.batch_size} must be >= 1 (null: the whole micro-batch)")
    try:  # a built-in's name is checked here; a folder when the stage loads it (FileNotFoundError naming the key)
        resolve_reward(str(r.model), f"{key}.model")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


class ReFL(PCM):
    """PCM's networks and objective (the regulariser) plus the reward of the student's own n-step samples."""

    Config = ReFLConfig
    extra_parts = ("vae",)  # the reward scores decoded images, also when the data are latents or pairs

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_reward(cfg.method.reward, cfg.method.num_ddim_timesteps)

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        from distill.models.reward import load_reward

        self.reward_model = load_reward(cfg.method.reward.model, device, key="method.reward.model")

    def sample_steps_at(self, step: int) -> int:
        """n for training step `step`: uniform over reward.sample_steps, the same on every rank and process count."""
        steps = list(self.cfg.method.reward.sample_steps)
        g = torch.Generator().manual_seed(int(self.cfg.trainer.seed) * 1_000_003 + 7919 + int(step))
        return int(steps[int(torch.randint(0, len(steps), (1,), generator=g))])

    def sample_with_last_grad(self, batch: Batch, n: int, rows: int) -> Tensor:
        """The student's n-step TCD sample of the first `rows` samples from pure noise: n - 1 steps without
        gradient (the raw module), the last x0 with it (the prepared module)."""
        m, r = self.cfg.method, self.cfg.method.reward
        cond = self._cond(batch.cond, torch.full((batch.size,), self.inference_w(), device=self.device))
        cond = cond._map(lambda v: v[:rows]) if rows < batch.size else cond
        shape = tuple(batch.latents.shape[1:])  # latents or pairs data: the input kind is latents
        ts = lcm_inference_timesteps(n, m.num_ddim_timesteps, self.schedule.num_train_timesteps).tolist()
        x = batch.randn("reward_z", shape, self.device)[:rows]
        with torch.no_grad(), span("simulate"), self.lora_fused(self.student):
            for i, t in enumerate(ts[:-1]):
                with self.autocast():
                    x0, eps = Denoiser(self.student, self.schedule).x0_eps(x, t, cond)
                x = tcd_step(x0.float(), eps.float(), int(ts[i + 1]), r.eta, self.schedule,
                             lambda i=i: batch.randn(f"reward_noise{i}", shape, self.device)[:rows])
        with span("student"):
            x0 = Denoiser(self.modules["student"], self.schedule).x0_eps(x, ts[-1], cond)[0]
        return x0.float()

    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        from distill.models.conditioning import vae_decode

        r = self.cfg.method.reward
        reg = super().losses(batch, phase, step)["loss"]
        n = self.sample_steps_at(step)
        rows = min(batch.size, r.batch_size or batch.size)
        x0 = self.sample_with_last_grad(batch, n, rows)
        with span("reward"):
            images = vae_decode(self.comps, x0).float()
            score = self.reward_model(images, list(batch.captions[:rows]))
        reward = score.mean()
        loss = r.regularizer_weight * reg - r.weight * reward
        return {"loss": loss, "loss_consistency": reg.detach(), "reward": reward.detach(),
                f"reward_{n}step": reward.detach()}

    def export_name(self) -> str:
        return "refl"
