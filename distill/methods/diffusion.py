"""Plain diffusion training: the epsilon (or v) objective of DDPM (Ho et al. 2020, eq. 14) with caption
dropout so that classifier-free guidance works (Ho & Salimans 2022). Trains the tiny world's teacher."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from distill.callbacks import EMAUpdate
from distill.config import ConfigError
from distill.diffusion import NoiseSchedule, add_noise
from distill.methods.base import Batch, Method
from distill.models.adapters import EMA
from distill.models.conditioning import drop_captions
from distill.optim import OptimizerSpec
from distill.sampler import SamplerSpec


@dataclass
class DiffusionConfig:
    """Plain diffusion training (the tiny world's teacher): epsilon objective with caption dropout."""

    name: str = "diffusion"
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # per step (with warm-up); an alias of ema_half_life_images, which wins when set
    ema_half_life_images: Optional[float] = None
    snr_gamma: Optional[float] = None  # Min-SNR-gamma loss weighting (arXiv 2303.09556; 5 in the paper); None: off
    from_scratch: bool = False  # re-initialise the UNet before training


class Diffusion(Method):
    Config = DiffusionConfig

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.method.snr_gamma is not None and cfg.method.snr_gamma <= 0:
            raise ConfigError(f"method.snr_gamma={cfg.method.snr_gamma} must be > 0 (or null: no weighting)")

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        unet = comps.unet
        if m.from_scratch:
            torch.manual_seed(cfg.trainer.seed)
            unet = UNet2DConditionModel.from_config(unet.config)
        self.unet = unet.to(device=device, dtype=torch.float32).train().requires_grad_(True)
        self.ema = EMA(copy.deepcopy(self.unet).requires_grad_(False).eval(), m.ema_decay, warmup=True)
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.modules = {"unet": self.unet}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("g", [{"params": [p for p in self.unet.parameters() if p.requires_grad]}])]

    def callbacks(self):
        return [EMAUpdate(self.ema, self.unet, self.cfg.method.ema_half_life_images, warmup_steps=True)]

    def losses(self, batch: Batch, phase: str, step: int):
        x0 = batch.latents
        eps = batch.randn("eps", tuple(x0.shape[1:]), x0.device)
        t = batch.randint("t", 0, self.schedule.num_train_timesteps, x0.device)
        x_t = add_noise(x0, eps, t, self.schedule)
        drop = batch.rand("drop", x0.device) < self.cfg.method.caption_dropout
        cond = drop_captions(batch.cond, drop)
        pred = self.modules["unet"](x_t, t, **cond.kwargs()).sample
        if self.schedule.prediction_type == "v_prediction":
            a, s = self.schedule.alpha(t, x0), self.schedule.sigma(t, x0)
            target = a * eps - s * x0
        else:
            target = eps
        gamma = self.cfg.method.snr_gamma
        if gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:  # Min-SNR-gamma (Hang et al. 2023, eq. 9): weight min(SNR, gamma) / SNR for eps, / (SNR + 1) for v
            snr = (self.schedule.alpha(t, x0) / self.schedule.sigma(t, x0)).float().flatten() ** 2
            weight = torch.clamp(snr, max=gamma) / (snr + 1 if self.schedule.prediction_type == "v_prediction" else snr)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
            loss = (weight * per_sample).mean()
        return {"loss": loss, "loss_mse": loss.detach()}

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)

    def sampler(self) -> SamplerSpec:
        """The grids' sampler: DDIM on trailing timesteps with CFG 5 (the bench's teacher rows)."""
        return SamplerSpec("ddim", (50,), 5.0)

    @torch.no_grad()
    def sample(self, cond, noise, num_steps, seeds):
        return self.sampler().sample(self.ema.model, noise, cond, self.schedule, num_steps, seeds,
                                     uncond=cond.zeros_like())

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        """A complete diffusers pipeline folder with the EMA UNet (the weights to evaluate and ship)."""
        pipe_dir = Path(out_dir) / "pipeline"
        if pipe_dir.exists():
            shutil.rmtree(pipe_dir)
        shutil.copytree(self.comps.path, pipe_dir, ignore=shutil.ignore_patterns("unet"))
        self.ema.model.to(torch.float32).save_pretrained(str(pipe_dir / "unet"), safe_serialization=True)
