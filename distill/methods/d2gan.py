"""Diffusion2GAN (Kang et al., arXiv 2405.05967), written from the paper: distillation as paired noise-to-latent
translation. Data: teacher ODE pairs (data.kind=pairs: seeded noise z, prompt c, the teacher's deterministic CFG
solve x from z; `distill.prepare pairs`, or written by the run itself when `method.pairs.prompts` is set).

Generator G (LoRA on the teacher's UNet, or a full fp32 copy): one step from z at `timestep` (pure noise in, x0 out).
Its loss: a latent perceptual regression d(G(z, c), x) (the latent perceptual net of distill/models/
latent_perceptual.py, frozen, through one random augmentation of both per sample: the ensemble; or plain latent
`l2` / `pseudo_huber`, the baseline) + `gan_weight` x the non-saturating GAN loss. No VAE decode in the loop.

Discriminator: a trainable copy of the teacher UNet (text-conditioned through its cross-attention) with a head on
the output of every up block (`d_taps`: several decoder resolutions), `TapDiscriminator(..., "copy")`. Real = the
pair's teacher latent with its prompt; fake = G's sample; text alignment: the real latent with another sample's prompt
is one more fake (`mismatch_weight`). Inputs clean (t = 0), or re-noised to t ~ U[0, d_t_max] when that is set. D and
G alternate every step ("g" then "d"); the "g" phase holds D frozen through forward and backward (phase_scope)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from distill.config import ConfigError, LoraConfig
from distill.diffusion import Denoiser, NoiseSchedule, UNetCond, add_noise, call_unet
from distill.methods.base import Batch, Method
from distill.methods.dmd2 import GeneratorIO, OptimOverrides, overrides
from distill.methods.feature_taps import FeatureTaps, TapDiscriminator
from distill.methods.gan import d_loss, frozen, g_loss
from distill.methods.pairs import (PairsConfig, check_pairs, ensure_pairs, one_step_generator, regression_distance,
                                   shards_key, with_shards)
from distill.models.loader import load_fp32_unet
from distill.optim import OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec

DISTANCES = ("perceptual", "l2", "pseudo_huber")


@dataclass
class D2GANConfig:
    name: str = "d2gan"
    lora: LoraConfig = field(default_factory=LoraConfig)  # disabled: a full fp32 generator
    # G's conditioning timestep; its input is pure noise. 399 (DMD2's one-step SDXL choice): x0 = (z - sigma eps) /
    # alpha carries the net's eps error times sigma/alpha, 14.6 at t = 999 and 1.2 at 399 (bench/RESULTS.md, "One step")
    timestep: int = 399
    distance: str = "perceptual"  # perceptual (the latent perceptual net) | l2 | pseudo_huber (on latents)
    perceptual: Optional[str] = "distill:tiny-latent-lpips"  # the net's folder (train one: latent_lpips)
    ensemble: bool = True  # one random augmentation of both inputs per sample at every call
    latent_l2_weight: float = 0.0  # distance=perceptual: plus this x the latent mean squared error
    # > 0: the perceptual term's weight falls linearly from 1 to 0 over the first N steps, then the regression is
    # latent L2 alone (latent_l2_weight > 0): the perceptual distance for the fast start, L2 for the end
    perceptual_decay_steps: int = 0
    huber_c: float = 0.03
    gan_weight: float = 0.1  # lambda of the GAN generator loss (0: regression only, no discriminator)
    mismatch_weight: float = 0.5  # text alignment: real latents with another sample's prompt as fakes
    d_taps: Optional[list[str]] = None  # null: the output of every up block
    head_channels: int = 64
    d_t_max: int = 0  # > 0: D sees real and fake re-noised to t ~ U[0, d_t_max]
    pairs: PairsConfig = field(default_factory=PairsConfig)  # shards null: data.shards
    generator: OptimOverrides = field(default_factory=OptimOverrides)
    discriminator: OptimOverrides = field(default_factory=OptimOverrides)


class D2GAN(GeneratorIO, Method):
    Config = D2GANConfig

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if cfg.data.kind != "pairs":
            raise ConfigError(f"data.kind={cfg.data.kind}: Diffusion2GAN trains on teacher ODE pairs (data.kind=pairs, "
                              "shards from `python -m distill.prepare pairs`)")
        if not 0 <= m.timestep < 1000:
            raise ConfigError(f"method.timestep={m.timestep} must lie in [0, 1000)")
        if m.distance not in DISTANCES:
            raise ConfigError(f"method.distance={m.distance!r}: expected one of {DISTANCES}")
        if m.distance == "perceptual" and not m.perceptual:
            raise ConfigError("method.distance=perceptual needs method.perceptual (a latent perceptual net folder)")
        if m.perceptual_decay_steps < 0:
            raise ConfigError(f"method.perceptual_decay_steps={m.perceptual_decay_steps} must be >= 0 (0: no decay)")
        if m.perceptual_decay_steps and (m.distance != "perceptual" or m.latent_l2_weight <= 0):
            raise ConfigError(f"method.perceptual_decay_steps={m.perceptual_decay_steps} hands the regression over to "
                              "latent L2: it needs method.distance=perceptual and method.latent_l2_weight > 0 (now "
                              f"{m.distance!r}, {m.latent_l2_weight})")
        if m.gan_weight < 0 or m.mismatch_weight < 0 or m.d_t_max < 0 or m.latent_l2_weight < 0:
            raise ConfigError("method.gan_weight, method.mismatch_weight, method.d_t_max and method.latent_l2_weight "
                              "must be >= 0")
        if list(cfg.trainer.validation_steps) not in ([], [1]):
            raise ConfigError(f"trainer.validation_steps={list(cfg.trainer.validation_steps)}: a Diffusion2GAN "
                              "generator samples in 1 step")
        if m.pairs.prompts is not None:
            check_pairs(with_shards(m.pairs, cfg), "method.pairs")
            if m.pairs.guidance_scale is None:
                raise ConfigError("method.pairs.guidance_scale is not set: the teacher's CFG scale for the pairs' "
                                  "solve (e.g. 8 for SDXL, 5 for the tiny world)")

    def __init__(self, cfg: DictConfig, comps, device: torch.device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.teacher = comps.unet.requires_grad_(False).eval()
        if m.pairs.prompts is not None:
            ensure_pairs(with_shards(m.pairs, cfg), cfg, self.teacher, m.pairs.guidance_scale, shards_key(m.pairs))
        self.gan = m.gan_weight > 0
        self.discriminator = None
        if self.gan:  # before LoRA changes the base in place: D starts from the teacher as stored, in fp32
            backbone = load_fp32_unet(comps, device).to(device)
            taps = list(m.d_taps) if m.d_taps else [f"up_blocks.{i}" for i in range(len(backbone.up_blocks))]
            channels, sizes = _tap_shapes(backbone, taps, cfg.data.resolution, comps, device)
            self.discriminator = TapDiscriminator(backbone, taps, channels, sizes, m.head_channels, "copy").to(device)
            self.discriminator.train()
        self.lora, self.generator, self.trainable = one_step_generator(cfg, self.teacher, comps, None, device)
        self.generator.train()
        if cfg.trainer.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            if self.discriminator is not None:
                self.discriminator.backbone.enable_gradient_checkpointing()
        self.perceptual = None
        if m.distance == "perceptual":
            from distill.models.latent_perceptual import LatentPerceptual

            self.perceptual = LatentPerceptual.from_pretrained(m.perceptual).to(device).eval().requires_grad_(False)
        self.student = self.generator
        self.modules = {"generator": self.generator}
        if self.discriminator is not None:
            self.modules["discriminator"] = self.discriminator
        self.g_raw, self.d_raw = self.generator, self.discriminator

    def optimizers(self) -> list[OptimizerSpec]:
        m = self.cfg.method
        specs = [OptimizerSpec("g", [{"params": self.trainable}], overrides=overrides(m.generator), primary=True)]
        if self.gan:
            specs.append(OptimizerSpec("d", [{"params": list(self.discriminator.parameters())}],
                                       overrides=overrides(m.discriminator)))
        return specs

    def phase_scope(self, phase: str):
        return frozen(self.d_raw) if phase == "g" and self.gan else contextlib.nullcontext()

    # -- the pieces ----------------------------------------------------------------------------------------
    def _generate(self, unet, batch: Batch) -> Tensor:
        if batch.noise is None:
            raise ValueError("Diffusion2GAN trains on teacher ODE pairs: its batches need the pairs' noise "
                             "(data.kind=pairs)")
        t = torch.full((batch.noise.shape[0],), int(self.cfg.method.timestep), device=batch.noise.device)
        with self.autocast():
            return Denoiser(unet, self.schedule).x0_eps(batch.noise, t, batch.cond)[0].float()

    def perceptual_weight(self, step: int) -> float:
        n = self.cfg.method.perceptual_decay_steps
        return max(0.0, 1.0 - step / n) if n else 1.0

    def distance(self, x0: Tensor, target: Tensor, batch: Batch, step: int = 0) -> Tensor:
        m = self.cfg.method
        if self.perceptual is None:
            return regression_distance(x0, target, m.distance, m.huber_c)
        l2 = m.latent_l2_weight * regression_distance(x0, target, "l2", m.huber_c) if m.latent_l2_weight else 0.0
        w = self.perceptual_weight(step)
        if w == 0.0:  # handed over to L2: the net is not run
            return l2
        d = self.perceptual(x0, target, ensemble=m.ensemble,
                            generators=batch.generators("ensemble") if m.ensemble else None).mean()
        return w * d + l2

    def _d_forward(self, net, x: Tensor, cond: UNetCond, batch: Batch, tag: str) -> Tensor:
        m, n = self.cfg.method, x.shape[0]
        if m.d_t_max > 0:
            reps = n // batch.size
            t = torch.cat([batch.randint(f"{tag}{i}", 0, m.d_t_max + 1, x.device) for i in range(reps)])
            x = add_noise(x, torch.cat([batch.randn(f"{tag}eps{i}", tuple(x.shape[1:]), x.device)
                                        for i in range(reps)]), t, self.schedule)
        else:
            t = torch.zeros(n, dtype=torch.long, device=x.device)
        dt = next(self.d_raw.backbone.parameters()).dtype
        with self.autocast():
            return net(x.to(dt), t, cond.to(dtype=dt)).float()

    # -- losses --------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        m, cond = self.cfg.method, batch.cond
        if phase == "g":
            with span("student"):
                x0 = self._generate(self.modules["generator"], batch)
            with span("target"):
                reg = self.distance(x0, batch.latents, batch, step)
            out = {"loss": reg, "loss_regression": reg.detach()}
            if self.gan:  # D frozen by phase_scope: gradients reach x0 through its activations
                with span("d"):
                    gan = g_loss(self._d_forward(self.d_raw, x0, cond, batch, "t_g"))
                out["loss"] = reg + m.gan_weight * gan
                out["loss_gan"] = gan.detach()
            return out
        with torch.no_grad(), span("student"), self.lora_fused(self.g_raw):
            x0 = self._generate(self.g_raw, batch)
        real, b = batch.latents, batch.size
        mismatched = cond._map(lambda v: v.roll(1, dims=0))  # each latent with its neighbour's prompt
        with span("d"):  # real, fake and real-with-another-prompt as ONE forward
            logits = self._d_forward(self.modules["discriminator"], torch.cat([real, x0, real]),
                                     cond.cat(cond).cat(mismatched), batch, "t_d")
        l_real, l_fake, l_mis = logits[:b], logits[b:2 * b], logits[2 * b:]
        loss_d = d_loss(l_real, l_fake)
        loss = loss_d + m.mismatch_weight * torch.nn.functional.softplus(l_mis).mean()
        return {"loss": loss, "loss_d": loss_d.detach(), "logit_real": l_real.detach().mean(),
                "logit_fake": l_fake.detach().mean(), "logit_mismatch": l_mis.detach().mean()}

    # -- sampling and export -------------------------------------------------------------------------------
    def sampler(self) -> SamplerSpec:
        """One step: LCMScheduler at `timestep` from pure noise; the x0 the generator predicts is the sample."""
        t = int(self.cfg.method.timestep)
        return SamplerSpec("lcm", (1,), 1.0, original_inference_steps=1, timesteps={1: (t,)})

    def export_name(self) -> str:
        return "d2gan"


@torch.no_grad()
def _tap_shapes(unet, taps: list[str], resolution: int, comps, device) -> tuple[list[int], list[int]]:
    """Channels and spatial sides of the tapped outputs at the training resolution (one dry forward)."""
    from distill.methods.discriminator import latent_side
    from distill.methods.latent_lpips import null_cond

    side = latent_side(comps, resolution)
    x = torch.zeros(1, int(unet.config.in_channels), side, side, device=device)
    taps_ = FeatureTaps(unet, taps)
    with taps_:
        call_unet(unet, x, torch.zeros(1, dtype=torch.long, device=device), null_cond(unet, 1, resolution, device))
    feats = taps_()
    taps_.remove()
    return [int(f.shape[1]) for f in feats], [int(f.shape[-1]) for f in feats]
