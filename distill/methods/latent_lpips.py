"""Train the latent perceptual distance (distill/models/latent_perceptual.py) on a model's own VAE latents.

Pairs (a, b): a = the VAE latent of a training image; b = one of the errors a one-step generator makes, drawn per
sample: the teacher's unconditional x0 prediction from a noised to a random t (the blur and drift of a denoiser),
latent Gaussian noise, another sample, a blend of the two, or a small translation. The target is a distance between
the DECODED images (mean |x - y| over a 1x / 2x / 4x average-pooled pyramid, so that it tolerates what the eye does:
small shifts more than colour changes), never the metric the bench reports. Loss: squared log-ratio of the net's
distance to the target. At training time of a generator the net reads latents only: no decode in that loop.

Export: the net's folder (`config.json`, `model.safetensors`) in <run>/export; `method.perceptual` of `d2gan` points
at it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import ConfigError
from distill.diffusion import Denoiser, NoiseSchedule, UNetCond, add_noise
from distill.methods.base import Batch, Method
from distill.models.latent_perceptual import LatentPerceptual, LatentPerceptualConfig
from distill.optim import OptimizerSpec

KINDS = ("denoiser", "noise", "other", "blend", "shift")


@dataclass
class LatentLPIPSConfig:
    name: str = "latent_lpips"
    widths: list[int] = field(default_factory=lambda: [32, 64, 96])
    convs_per_level: int = 2
    l1_weight: float = 0.1
    # how often each kind of distortion is drawn (KINDS order: denoiser, noise, other, blend, shift)
    mix: list[float] = field(default_factory=lambda: [0.35, 0.25, 0.15, 0.15, 0.10])
    pyramid: list[int] = field(default_factory=lambda: [1, 2, 4])  # average-pool factors of the decoded target
    # + this weight x (1 - SSIM) over the same pyramid: structure and contrast, which an L1 target barely sees in a
    # blurred image (the error a one-step regression makes); 0 = the L1 pyramid alone
    ssim_weight: float = 0.0


def _levels(x: Tensor, y: Tensor, pyramid: list[int]):
    """(x, y) average-pooled by each factor of the pyramid."""
    for k in pyramid:
        yield (F.avg_pool2d(x, k), F.avg_pool2d(y, k)) if k > 1 else (x, y)


def pixel_distance(x: Tensor, y: Tensor, pyramid: list[int]) -> Tensor:
    """The target (B,): mean |x - y| of decoded images over an average-pooled pyramid."""
    return sum((px - py).abs().mean(dim=(1, 2, 3)) for px, py in _levels(x, y, pyramid)) / len(pyramid)


def _gauss_window(channels: int, size: int = 7, sigma: float = 1.5, device=None) -> Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM (B,) of images in [-1, 1] (Wang et al. 2004: 7x7 Gaussian window, sigma 1.5, per channel)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    c = x.shape[1]
    w = _gauss_window(c, min(7, x.shape[-1], x.shape[-2]) // 2 * 2 + 1, device=x.device)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, w, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def image_distance(x: Tensor, y: Tensor, pyramid: list[int], ssim_weight: float = 0.0) -> Tensor:
    """The target (B,): the L1 pyramid, plus ssim_weight x (1 - SSIM) averaged over the same pyramid."""
    d = pixel_distance(x, y, pyramid)
    if ssim_weight:
        d = d + ssim_weight * sum(1 - ssim(px, py) for px, py in _levels(x, y, pyramid)) / len(pyramid)
    return d


def null_cond(unet, n: int, resolution: int, device: torch.device) -> UNetCond:
    """The unconditional branch (zero text embeddings, square micro-conditioning) without text encoders."""
    c = unet.config
    emb = torch.zeros(n, 77, int(c.cross_attention_dim), device=device)
    if c.addition_embed_type == "text_time":
        pooled = int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32)
        return UNetCond(emb, torch.zeros(n, pooled, device=device), ids.to(device))
    return UNetCond(emb, None, None)


class LatentLPIPS(Method):
    Config = LatentLPIPSConfig
    input_kind = "pixels"

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        if cfg.data.kind != "images":
            raise ConfigError(f"data.kind={cfg.data.kind}: the latent perceptual net trains on images (its target "
                              "compares decoded images); use data.kind=images")
        if len(m.mix) != len(KINDS) or any(p < 0 for p in m.mix) or sum(m.mix) <= 0:
            raise ConfigError(f"method.mix={list(m.mix)}: one non-negative weight per kind {KINDS}")
        if not m.widths or any(w < 1 for w in m.widths) or m.convs_per_level < 1:
            raise ConfigError("method.widths and method.convs_per_level must be positive")
        if any(k < 1 for k in m.pyramid):
            raise ConfigError(f"method.pyramid={list(m.pyramid)}: pooling factors >= 1")
        if m.ssim_weight < 0:
            raise ConfigError(f"method.ssim_weight={m.ssim_weight}: must be >= 0")

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.vae = comps.vae.requires_grad_(False).eval()
        self.teacher = comps.unet.requires_grad_(False).eval()
        torch.manual_seed(int(cfg.trainer.seed))
        target = f"decoded-image L1 pyramid {list(m.pyramid)}"
        if m.ssim_weight:
            target += f" + {float(m.ssim_weight):g} x (1 - SSIM) over it"
        info = {"model": str(cfg.model.pretrained), "scaling_factor": comps.vae_scaling_factor, "target": target,
                "distortions": dict(zip(KINDS, m.mix))}
        self.net = LatentPerceptual(LatentPerceptualConfig(int(self.teacher.config.in_channels), list(m.widths),
                                                           int(m.convs_per_level), float(m.l1_weight), info))
        self.net.to(device).train()
        self.modules = {"net": self.net}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("g", [{"params": list(self.net.parameters())}])]

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        lat = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return lat.float() * self.comps.vae_scaling_factor

    @torch.no_grad()
    def decode(self, lat: Tensor) -> Tensor:
        return self.vae.decode((lat / self.comps.vae_scaling_factor).to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def distort(self, a: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(b, kind index) per sample, drawn from the sample's own seed."""
        m, n, dev = self.cfg.method, a.shape[0], a.device
        shape = tuple(a.shape[1:])
        probs = torch.tensor(list(m.mix), dtype=torch.float32)
        edges = torch.cumsum(probs / probs.sum(), 0).to(dev)
        kind = torch.searchsorted(edges, batch.rand("kind", dev).clamp(max=1 - 1e-6), right=True)
        u = batch.rand("amount", dev).view(-1, 1, 1, 1)
        t = batch.randint("t", 50, self.schedule.num_train_timesteps, dev)
        x_t = add_noise(a, batch.randn("eps", shape, dev), t, self.schedule)
        denoised = Denoiser(self.teacher, self.schedule).x0_eps(x_t, t, null_cond(self.teacher, n,
                                                                                 self.cfg.data.resolution, dev))[0]
        noisy = a + (0.02 + 0.78 * u) * a.std() * batch.randn("noise", shape, dev)
        other = a.roll(1, dims=0)
        blend = a + (0.1 + 0.8 * u) * (other - a)
        shift = torch.stack([a[i].roll((int(s) % 2 + 1) * (1 if s < 2 else -1), dims=-1 - int(s) % 2)
                             for i, s in enumerate(batch.randint("shift", 0, 4, dev).tolist())])
        options = torch.stack([denoised.float(), noisy, other, blend, shift])  # (K, B, C, h, w)
        return options[kind, torch.arange(n, device=dev)], kind

    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        a = self.encode(batch.pixels)
        b, kind = self.distort(a, batch)
        with torch.no_grad():
            target = image_distance(self.decode(a), self.decode(b), list(self.cfg.method.pyramid),
                                    float(self.cfg.method.ssim_weight))
        d = self.modules["net"](a, b)
        err = torch.log(d + 1e-3) - torch.log(target + 1e-3)
        loss = err.pow(2).mean()
        with torch.no_grad():  # how well the net orders pairs: the share of concordant pairs in the batch
            dd, dt = d[:, None] - d[None, :], target[:, None] - target[None, :]
            off = ~torch.eye(len(d), dtype=torch.bool, device=d.device)
            concordant = ((dd * dt) > 0)[off].float().mean()
        return {"loss": loss, "log_ratio_abs": err.abs().mean().detach(), "rank_agreement": concordant}

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        self.net.save_pretrained(out_dir)
