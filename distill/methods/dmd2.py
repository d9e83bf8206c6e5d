"""Distribution matching distillation, improved (DMD2, Yin et al., arXiv 2405.14867), written from the paper.

Three networks. The generator G (LoRA on the teacher's UNet, or a full fp32 copy) samples in the few steps it is
trained for; the frozen teacher is the REAL score (classifier-free guided, cond and uncond in one 2B forward); a
trainable FAKE score (a copy of the teacher, its own optimizer) tracks the distribution G produces, trained with the
denoising loss on G's detached samples, and carries a GAN classification head on its mid-block features (feature
taps in the same forward, `distill.methods.feature_taps.TapDiscriminator` with the UNet as its backbone).

Two time scales (Sec. 4.1): the fake score and its head step every training step ("fake" phase); G every
`generator_every_n_steps`-th ("g" phase, first in the step). Each optimizer has its own settings and schedule on its
own step count (distill.optim), so the cadence and both schedules continue exactly across a resume.

G's input (Sec. 4.4, backward simulation): the student timesteps t_0 > ... > t_{K-1} (999/749/499/249 at 4 steps,
one conditioning timestep such as 399 at 1 step); draw k in [0, K), one per step for the whole batch (the same on
every rank and at any process count: a ZeRO-3 forward is collective, so ranks must run as many); run G from pure noise at t_0 for k steps without
gradient, re-noising each x0 with fresh noise to the next timestep, and train G at (x_{t_k}, t_k). With
`backward_simulation: false` G's input is instead a data latent noised to t_k (pure noise at T - 1).

Generator loss (eq. 2, 7): x0 = G's sample; x_t = noise(x0, t), t ~ U[t_min, t_max]; with the real score's x0_real
(guided) and the fake score's x0_fake, grad = (x0_fake - x0_real) / mean|x0 - x0_real| (per sample), written as
0.5 ||x0 - sg(x0 - grad)||^2 so its gradient in x0 is grad; plus gan_generator_weight x softplus(-D(noise(x0))).
Fake loss: the denoising loss of the fake score at x_t = noise(sg(x0), t), t ~ U[0, T); plus gan_fake_weight x
[softplus(-D(noise(x_data))) + softplus(D(x_t))], real = data latents, both at the same t (one 2B forward).

1-step warm-up (Sec. 4.5, SDXL's 1-step recipe): with `regression.steps` > 0 the run is two stages. The first
regresses G's one step from each teacher ODE pair's noise onto the teacher's solution from it (data.kind=pairs, shards
from `distill.prepare pairs`, written by the run itself when `regression.pairs.prompts` is set), G alone, no fake
score; the second is DMD2 proper, G starting from the first stage's export. (The paper's distance is LPIPS on decoded
images; here a latent L2 or pseudo-Huber: no decode in the loop.)

A multi-step student with a 1-step mode (`one_step_timestep`, e.g. 399 beside 999/749/499/249): the 1-step mode is
one more slot of backward simulation (pure noise in at its own timestep, never one the chain visits), the sampler
spec names both step counts' timesteps, and the warm-up regresses that mode, optionally (`regression.keep_weight`)
holding G's outputs at the chain's timesteps on the teacher's (`keep_target=init`: on G's own as the warm-up starts,
for a generator whose chain was distilled by an earlier stage) so the chain is not unlearnt.

Gradient isolation: the "fake" phase runs G under no_grad through its raw module; the "g" phase holds the fake
score (UNet and head) frozen through forward and backward (`phase_scope`), and the teacher never trains.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from distill.config import ConfigError, LoraConfig
from distill.diffusion import Denoiser, Fp32Io, NoiseSchedule, UNetCond, add_noise, to_x0_eps
from distill.methods.base import Batch, Method
from distill.methods.discriminator import latent_side
from distill.methods.feature_taps import TapDiscriminator
from distill.methods.gan import d_loss, frozen, g_loss
from distill.methods.pairs import PairRegression, RegressionConfig
from distill.models.adapters import adapters_disabled
from distill.models.loader import load_fp32_unet, stored_fp32_state
from distill.optim import SETTINGS, OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec
from distill.stages import Stage


@dataclass
class OptimOverrides:
    """One optimizer's settings where they differ from `optim.*` (null: optim's)."""

    lr: Optional[float] = None
    betas: Optional[list[float]] = None
    weight_decay: Optional[float] = None
    scheduler: Optional[str] = None
    warmup_steps: Optional[int] = None
    max_grad_norm: Optional[float] = None


def overrides(o) -> dict:
    return {k: (list(v) if k == "betas" else v) for k, v in dict(o).items() if v is not None and k in SETTINGS}


@dataclass
class DMD2Config:
    name: str = "dmd2"
    lora: LoraConfig = field(default_factory=LoraConfig)  # disabled: a full fp32 generator
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])  # [399]: a 1-step student
    # a multi-step student that ALSO samples in one step: pure noise in at this conditioning timestep (one that the
    # multi-step chain never visits, e.g. 399), x0 out; trained as one more slot of backward simulation (null: none)
    one_step_timestep: Optional[int] = None
    backward_simulation: bool = True  # G's inputs from its own earlier steps (false: noised data latents)
    guidance_scale: float = 8.0  # the real score's CFG (standard form: uncond + s (cond - uncond))
    t_min: int = 20  # the distribution-matching loss's timesteps t ~ U[t_min, t_max]
    t_max: int = 980
    generator_every_n_steps: int = 5  # two time scales: the fake score steps every step, G every n-th
    gan_generator_weight: float = 5e-3  # 0 with gan_fake_weight 0: no GAN head
    gan_fake_weight: float = 1e-2
    head_channels: int = 256  # width of the GAN head on the fake score's mid-block features
    fake_loss: str = "eps"  # the fake score's denoising loss: eps (its own output's target) | x0 (DMD's form)
    generator: OptimOverrides = field(default_factory=OptimOverrides)
    fake: OptimOverrides = field(default_factory=OptimOverrides)
    regression: RegressionConfig = field(default_factory=RegressionConfig)


def dm_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD's distribution-matching gradient in x0: (x0_fake - x0_real) / mean|x0 - x0_real| per sample, the
    direction from the fake distribution's score to the real one's (descend it)."""
    p_real, p_fake = x0 - x0_real, x0 - x0_fake
    scale = p_real.abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((p_real - p_fake) / scale)


def dm_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD's distribution-matching loss: its gradient in x0 is `dm_gradient` (divided by x0.numel() from the
    mean)."""
    return 0.5 * F.mse_loss(x0.float(), (x0 - dm_gradient(x0, x0_real, x0_fake)).detach().float())


def denoising_target(x0: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """What a UNet of the schedule's prediction type is trained to output at x_t = alpha x0 + sigma eps."""
    if schedule.prediction_type == "v_prediction":
        return schedule.alpha(t, x0) * eps - schedule.sigma(t, x0) * x0
    if schedule.prediction_type == "sample":
        return x0
    return eps


FAKE_LOSSES = ("eps", "x0")


def fake_score_loss(out: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule,
                    kind: str) -> Tensor:
    """The fake score's denoising loss on G's samples x0 (noised to x_t with eps at t). `eps`: MSE of the UNet's
    output to its own prediction type's target (uniform in eps, so in x0 terms weighted by SNR(t): the high t where a
    sample's colours and layout are decided barely count). `x0`: MSE of the implied x0 to the sample, DMD's
    ||mu_fake(x_t, t) - x0||^2 (arXiv 2311.18828, eq. 6): the eps loss weighted by 1 / SNR(t)."""
    if kind == "x0":
        return F.mse_loss(to_x0_eps(out, x_t, t, schedule)[0], x0)
    return F.mse_loss(out, denoising_target(x0, eps, t, schedule))


class GeneratorIO:
    """Sampling and export of a distribution-matching generator (DMD2, SIM): `self.g_raw` (the unwrapped UNet, a
    LoRA on the teacher's base when `self.lora`) sampled and exported with the method's `sampler()` spec."""

    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        unet = self.g_raw
        was_training = unet.training
        unet.eval()
        try:
            with self.lora_fused(unet):
                return self.sampler().sample(Fp32Io(unet), noise.float(), cond, self.schedule, num_steps, seeds)
        finally:
            unet.train(was_training)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        info = {"method": self.export_name() + ("-lora" if self.lora else ""), "teacher": self.cfg.model.pretrained,
                "arch": self.comps.arch}
        export_student(self.g_raw, Path(out_dir), lora=self.lora, dtype=dtype, info=info, sampler=self.sampler(),
                       base_path=self.comps.path,
                       lora_base=stored_fp32_state(self.g_raw, self.comps) if self.lora else None)


class DMD2(PairRegression, GeneratorIO, Method):
    Config = DMD2Config
    phase = "dmd2"  # the stage after a regression warm-up

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        m = cfg.method
        ts = list(m.student_timesteps)
        if not ts or any(not 0 <= t < 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"method.student_timesteps={ts}: expected descending timesteps in [0, 1000)")
        one = m.one_step_timestep
        if one is not None and (len(ts) < 2 or one in ts or not 0 <= one < 1000):
            raise ConfigError(f"method.one_step_timestep={one}: a multi-step student's extra 1-step mode takes a "
                              f"timestep in [0, 1000) that method.student_timesteps={ts} does not visit (a 1-step "
                              "student sets student_timesteps=[t] instead)")
        if not 0 <= m.t_min <= m.t_max < 1000:
            raise ConfigError(f"method.t_min={m.t_min}, method.t_max={m.t_max}: expected 0 <= t_min <= t_max < 1000")
        if m.fake_loss not in FAKE_LOSSES:
            raise ConfigError(f"method.fake_loss={m.fake_loss!r}: expected one of {', '.join(FAKE_LOSSES)}")
        if m.generator_every_n_steps < 1:
            raise ConfigError(f"method.generator_every_n_steps={m.generator_every_n_steps} must be >= 1")
        if m.gan_generator_weight < 0 or m.gan_fake_weight < 0:
            raise ConfigError("method.gan_generator_weight and method.gan_fake_weight must be >= 0")
        if (m.gan_generator_weight > 0) != (m.gan_fake_weight > 0):
            raise ConfigError("method.gan_generator_weight and method.gan_fake_weight: set both > 0 (GAN on) or "
                              "both 0 (off); a head trained by one side only is not a GAN")
        bad = [s for s in cfg.trainer.validation_steps if not 1 <= s <= len(ts)]
        if bad:
            raise ConfigError(f"trainer.validation_steps has {bad}: a DMD2 student with method.student_timesteps="
                              f"{ts} samples 1 to {len(ts)} steps")
        for side in ("generator", "fake"):
            sched = m[side].scheduler
            if sched is not None and sched not in ("constant", "linear", "cosine"):
                raise ConfigError(f"method.{side}.scheduler={sched!r}: expected constant | linear | cosine")
        cls.check_regression(m, one_step=len(ts) == 1 or one is not None, chain=one is not None)

    @classmethod
    def plan(cls, cfg: DictConfig, run_dir: Path) -> list[Stage]:
        """One stage; two with a regression warm-up (on pair shards, then DMD2 from its export)."""
        return cls.regression_plan(cfg, run_dir) or super().plan(cfg, run_dir)

    def __init__(self, cfg: DictConfig, comps, device: torch.device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.timesteps = torch.tensor(list(m.student_timesteps), dtype=torch.long, device=device)
        self.one_step = m.one_step_timestep  # the extra 1-step mode's conditioning timestep (None: none)
        self.teacher = comps.unet.requires_grad_(False).eval()
        init = self.regression_setup(stage, m.guidance_scale)  # the warm-up stage: G alone, on pairs
        self.gan = m.gan_generator_weight > 0 and not self.regression
        self.fake = fake_unet = None
        if not self.regression:  # the fake score: a trainable fp32 copy of the teacher as stored (before LoRA)
            fake_unet = load_fp32_unet(comps, device).to(device)
            mid = max(1, latent_side(comps, cfg.data.resolution) // 2 ** (len(fake_unet.config.block_out_channels) - 1))
            c_mid = int(fake_unet.config.block_out_channels[-1])
            self.fake = TapDiscriminator(fake_unet, ["mid_block"], [c_mid], [mid], m.head_channels, "copy")
            self.fake.to(device).train()
            if not self.gan:  # the head is computed but never trained: no parameter left without a gradient (DDP)
                self.fake.heads.requires_grad_(False)
        self.build_generator(init, device)  # a LoRA on the teacher's own base (adapters off = the teacher) or full
        r = m.regression
        self.keep_ref = None  # keep_target=init: a frozen copy of G as the warm-up starts (its chain's reference)
        if self.regression and r.keep_weight > 0 and r.keep_target == "init":
            self.keep_ref = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.generator.train()
        if cfg.trainer.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            if fake_unet is not None:
                fake_unet.enable_gradient_checkpointing()
        self.student = self.generator  # the model being distilled, by the name the benches read
        self.modules = {"generator": self.generator}
        if self.fake is not None:
            self.modules["fake"] = self.fake
        self.g_raw, self.fake_raw = self.generator, self.fake  # unwrapped: no-grad and frozen use

    def optimizers(self) -> list[OptimizerSpec]:
        m = self.cfg.method
        if self.regression:  # G alone, every step
            return self.regression_optimizers(overrides(m.generator))
        fake_params = list(self.fake.backbone.parameters()) + (list(self.fake.heads.parameters()) if self.gan else [])
        return [OptimizerSpec("g", [{"params": self.trainable}], overrides=overrides(m.generator),
                              every_n_steps=m.generator_every_n_steps, primary=True),
                OptimizerSpec("fake", [{"params": fake_params}], overrides=overrides(m.fake))]

    def phase_scope(self, phase: str):
        """The g phase holds the fake score (UNet and head) frozen over forwards AND backwards (gan.frozen)."""
        return frozen(self.fake_raw) if phase == "g" and self.fake is not None else contextlib.nullcontext()

    # -- the networks as denoisers ------------------------------------------------------------------------
    def real_score(self) -> Denoiser:
        scope = (lambda: adapters_disabled(self.g_raw)) if self.lora else None
        return Denoiser(self.teacher, self.schedule, scope=scope)

    def _generator_x0(self, unet: nn.Module, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        with self.autocast():
            return Denoiser(unet, self.schedule).x0_eps(x, t, cond)[0]

    def simulated_steps(self, step: int) -> int:
        """k for training step `step`: G's earlier steps before the one trained (uniform in [0, K)); with a
        1-step mode, uniform in [0, K], k = K meaning the 1-step mode (pure noise in at one_step_timestep)."""
        g = torch.Generator().manual_seed(int(self.cfg.trainer.seed) * 1_000_003 + int(step))
        return int(torch.randint(0, len(self.timesteps) + (self.one_step is not None), (1,), generator=g))

    def one_step_timestep(self) -> int:
        """The timestep of G's one step from pure noise (the 1-step sampler's; the regression warm-up's)."""
        return int(self.timesteps[0]) if self.one_step is None else int(self.one_step)

    def generator_input(self, batch: Batch, step: int) -> tuple[Tensor, Tensor]:
        """(x, t): G's training input and its timestep (backward simulation, see the module doc)."""
        x0 = batch.latents
        dev, shape = x0.device, tuple(x0.shape[1:])
        k = self.simulated_steps(step)
        if k == len(self.timesteps):  # the 1-step mode: pure noise in at its own conditioning timestep
            t = torch.full((x0.shape[0],), self.one_step_timestep(), dtype=torch.long, device=dev)
            return batch.randn("z", shape, dev), t
        t = self.timesteps[k].expand(x0.shape[0])
        if not self.cfg.method.backward_simulation:
            return add_noise(x0, batch.randn("eps_in", shape, dev), t, self.schedule, pure_noise_at_T=True), t
        x = batch.randn("z", shape, dev)  # pure noise at t_0, as the sampler starts
        with torch.no_grad(), span("simulate"), self.lora_fused(self.g_raw):
            for j in range(k):
                x_hat = self._generator_x0(self.g_raw, x, self.timesteps[j].expand(x.shape[0]), batch.cond)
                x = add_noise(x_hat.float(), batch.randn(f"sim{j}", shape, dev), self.timesteps[j + 1], self.schedule)
        return x, t

    def _fake_forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: UNetCond) -> tuple[Tensor, Tensor]:
        """(logits, the fake UNet's output in fp32); inputs in the fake score's weight dtype."""
        dt = next(self.fake_raw.backbone.parameters()).dtype
        with self.autocast():
            logits, out = net(x.to(dt), t, cond.to(dtype=dt), with_output=True)
        return logits.float(), out.float()

    # -- losses --------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        if self.regression:
            out = self.regression_losses(batch, self.one_step_timestep(), self._generator_x0)
            w = float(self.cfg.method.regression.keep_weight)
            if w > 0:
                keep = self._keep_chain_loss(batch)
                out = {**out, "loss": out["loss"] + w * keep, "loss_keep": keep.detach()}
            return out
        return self._generator_losses(batch, step) if phase == "g" else self._fake_losses(batch, step)

    def _keep_chain_loss(self, batch: Batch) -> Tensor:
        """The warm-up's second term (regression.keep_weight): MSE between G's and the teacher's UNet outputs at
        the pair latents noised to one of the multi-step chain's timesteps per sample (keep_target=init: G's own
        outputs as the warm-up started, from a frozen copy)."""
        dev, shape = batch.latents.device, tuple(batch.latents.shape[1:])
        t = self.timesteps[batch.randint("k_keep", 0, len(self.timesteps), dev)]
        x_t = add_noise(batch.latents.float(), batch.randn("eps_keep", shape, dev), t, self.schedule)
        ref = self.real_score() if self.keep_ref is None else Denoiser(self.keep_ref, self.schedule)
        with torch.no_grad(), span("teacher"), self.autocast():
            want = ref.output(x_t, t, batch.cond).float()
        with span("student"), self.autocast():
            have = Denoiser(self.modules["generator"], self.schedule).output(x_t, t, batch.cond).float()
        return F.mse_loss(have, want)

    def _generator_losses(self, batch: Batch, step: int) -> dict[str, Tensor]:
        m, cond = self.cfg.method, batch.cond
        dev, shape = batch.latents.device, tuple(batch.latents.shape[1:])
        x_in, t_in = self.generator_input(batch, step)
        with span("student"):
            x0 = self._generator_x0(self.modules["generator"], x_in, t_in, cond).float()
        t = batch.randint("t_dm", m.t_min, m.t_max + 1, dev)
        x_t = add_noise(x0.detach(), batch.randn("eps_dm", shape, dev), t, self.schedule)
        with torch.no_grad():
            with span("teacher"):
                real = self.real_score()
                out = real.guided(x_t, t, cond, cond.zeros_like(), m.guidance_scale, form="standard").float()
                x0_real = real.x0_eps(x_t, t, cond, out)[0]
            with span("target"):
                out = self._fake_forward(self.fake_raw, x_t, t, cond)[1]
                x0_fake = to_x0_eps(out, x_t, t, self.schedule)[0]
        loss_dm = dm_loss(x0, x0_real, x0_fake)
        terms = {"loss_dm": loss_dm.detach()}
        loss = loss_dm
        if self.gan:  # the fake score frozen by phase_scope: gradients reach x0 through its activations only
            s = batch.randint("t_gan_g", 0, self.schedule.num_train_timesteps, dev)
            with span("d"):
                logits = self._fake_forward(self.fake_raw, add_noise(x0, batch.randn("eps_gan_g", shape, dev), s,
                                                                     self.schedule), s, cond)[0]
            loss_gan = g_loss(logits)
            loss = loss + m.gan_generator_weight * loss_gan
            terms["loss_gan"] = loss_gan.detach()
        return {"loss": loss, **terms}

    def _fake_losses(self, batch: Batch, step: int) -> dict[str, Tensor]:
        m, cond = self.cfg.method, batch.cond
        dev, shape = batch.latents.device, tuple(batch.latents.shape[1:])
        with torch.no_grad(), self.lora_fused(self.g_raw):
            x_in, t_in = self.generator_input(batch, step)
            with span("student"):
                x0 = self._generator_x0(self.g_raw, x_in, t_in, cond).float()
        b = x0.shape[0]
        t = batch.randint("t_fake", 0, self.schedule.num_train_timesteps, dev)
        eps = batch.randn("eps_fake", shape, dev)
        x_t = add_noise(x0, eps, t, self.schedule)
        with span("d"):
            if self.gan:  # fake samples and noised data latents through the fake score as ONE batch
                x_real = add_noise(batch.latents.float(), batch.randn("eps_real", shape, dev), t, self.schedule)
                logits, out = self._fake_forward(self.modules["fake"], torch.cat([x_t, x_real]), torch.cat([t, t]),
                                                 cond.cat(cond))
                out = out[:b]
            else:
                logits, out = self._fake_forward(self.modules["fake"], x_t, t, cond)
        loss_dsm = fake_score_loss(out, x_t, x0, eps, t, self.schedule, m.fake_loss)
        terms = {"loss_denoise": loss_dsm.detach()}
        loss = loss_dsm
        if self.gan:
            l_fake, l_real = logits[:b], logits[b:]
            loss_d = d_loss(l_real, l_fake)
            loss = loss + m.gan_fake_weight * loss_d
            terms.update(loss_d=loss_d.detach(), logit_real=l_real.detach().mean(), logit_fake=l_fake.detach().mean())
        return {"loss": loss, **terms}

    # -- sampling and export -------------------------------------------------------------------------------
    def sampler(self) -> SamplerSpec:
        """LCMScheduler at the trained timesteps (999/749/499/249, or the 1-step conditioning timestep; with a
        1-step mode, both step counts at their own), no CFG: at these timesteps LCM's boundary scalings are 1 on
        x0, so each step is G's x0, re-noised to the next."""
        m = self.cfg.method
        ts = tuple(int(t) for t in m.student_timesteps)
        k = len(ts)
        if m.one_step_timestep is None:
            return SamplerSpec("lcm", (k,), 1.0, original_inference_steps=k if 1000 % k == 0 else None,
                               timesteps={k: ts})
        return SamplerSpec("lcm", (1, k), 1.0, original_inference_steps=k if 1000 % k == 0 else None,
                           timesteps={k: ts, 1: (int(m.one_step_timestep),)})

    def export_name(self) -> str:
        return "dmd2"
