"""Plain diffusion training: the epsilon (or v) objective of DDPM (Ho et al. 2020, eq. 14) with caption
dropout so that classifier-free guidance works (Ho & Salimans 2022). Trains the tiny world's teacher."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from distill.diffusion import NoiseSchedule, add_noise, sample_teacher
from distill.methods.base import Batch, Method
from distill.models.adapters import EMA
from distill.models.conditioning import drop_captions


class Diffusion(Method):
    def __init__(self, cfg, comps, device):
        super().__init__(cfg, comps, device)
        m = cfg.method
        unet = comps.unet
        if m.from_scratch:
            torch.manual_seed(cfg.trainer.seed)
            unet = UNet2DConditionModel.from_config(unet.config)
        self.unet = unet.to(device=device, dtype=torch.float32).train().requires_grad_(True)
        self.ema = EMA(copy.deepcopy(self.unet).requires_grad_(False).eval(), m.ema_decay, warmup=True)
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.modules = {"unet": self.unet}

    def param_groups(self):
        return [[{"params": [p for p in self.unet.parameters() if p.requires_grad]}]]

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
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "loss_mse": loss.detach()}

    def after_step(self, step: int) -> None:
        self.ema.update(self.unet, step)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)

    @torch.no_grad()
    def sample(self, cond, noise, num_steps, seeds):
        return sample_teacher(self.ema.model, noise, cond, cond.zeros_like(), self.schedule, num_steps,
                              solver="ddim", guidance_scale=5.0, spacing="trailing")

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        """A complete diffusers pipeline folder with the EMA UNet (the weights to evaluate and ship)."""
        pipe_dir = Path(out_dir) / "pipeline"
        if pipe_dir.exists():
            shutil.rmtree(pipe_dir)
        shutil.copytree(self.comps.path, pipe_dir, ignore=shutil.ignore_patterns("unet"))
        self.ema.model.to(torch.float32).save_pretrained(str(pipe_dir / "unet"), safe_serialization=True)
