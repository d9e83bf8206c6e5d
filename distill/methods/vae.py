"""Autoencoder training for the tiny world: the KL-regularised autoencoder of LDM (Rombach et al. 2022,
sec. 3) with L1 + L2 reconstruction and a small KL; no perceptual or GAN loss at this size."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from distill.config import ConfigError
from distill.methods.base import Batch, Method
from distill.optim import OptimizerSpec


@dataclass
class VAEConfig:
    """Autoencoder training (the tiny world's VAE): L1 + L2 reconstruction and a small KL."""

    name: str = "vae"
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    from_scratch: bool = False


class VAETraining(Method):
    Config = VAEConfig
    input_kind = "pixels"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.data.kind == "latents":
            raise ConfigError("data.kind=latents cannot train a VAE: it needs image shards")

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        vae = comps.vae
        if cfg.method.from_scratch:
            torch.manual_seed(cfg.trainer.seed)
            vae = AutoencoderKL.from_config(vae.config)
        self.vae = vae.to(device=device, dtype=torch.float32).train().requires_grad_(True)
        self.modules = {"vae": self.vae}
        self.z_sum, self.z_sq, self.z_n = 0.0, 0.0, 0  # latent statistics -> scaling_factor (LDM: 1/std)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("g", [{"params": list(self.vae.parameters())}])]

    def losses(self, batch: Batch, phase: str, step: int):
        m = self.cfg.method
        vae = self.modules["vae"]
        x = batch.pixels
        net = vae.module if hasattr(vae, "module") else vae  # encode/decode live on the wrapped model
        posterior = net.encode(x).latent_dist
        eps = batch.randn("z", tuple(posterior.mean.shape[1:]), x.device)
        z = posterior.mean + posterior.std * eps
        rec = net.decode(z).sample
        l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = m.l1_weight * l1 + m.l2_weight * l2 + m.kl_weight * kl
        with torch.no_grad():
            zm = posterior.mean.float()
            self.z_sum += float(zm.sum())
            self.z_sq += float((zm * zm).sum())
            self.z_n += zm.numel()
        return {"loss": loss, "loss_l1": l1.detach(), "loss_l2": l2.detach(), "kl": kl.detach()}

    def scaling_factor(self) -> float:
        if self.z_n == 0:
            return float(self.vae.config.scaling_factor)
        mean = self.z_sum / self.z_n
        var = max(self.z_sq / self.z_n - mean * mean, 1e-12)
        return float(var ** -0.5)

    def meta_state(self):
        return {"z_sum": self.z_sum, "z_sq": self.z_sq, "z_n": self.z_n}

    def load_meta_state(self, meta):
        self.z_sum, self.z_sq, self.z_n = meta.get("z_sum", 0.0), meta.get("z_sq", 0.0), meta.get("z_n", 0)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        """A complete pipeline folder with the trained VAE and its measured scaling factor."""
        pipe_dir = Path(out_dir) / "pipeline"
        if pipe_dir.exists():
            shutil.rmtree(pipe_dir)
        shutil.copytree(self.comps.path, pipe_dir, ignore=shutil.ignore_patterns("vae"))
        self.vae.register_to_config(scaling_factor=self.scaling_factor())
        self.vae.to(torch.float32).save_pretrained(str(pipe_dir / "vae"), safe_serialization=True)
