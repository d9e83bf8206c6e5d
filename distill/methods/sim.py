"""Score implicit matching (SIM, Luo et al., arXiv 2410.16794) and its L2 case SiD (Zhou et al.): a one-step
generator distilled from prompts alone, written from the papers' derivation.

Networks (DMD2's machinery, `distill.methods.dmd2`): the generator G (LoRA on the teacher's own UNet, or a full
fp32 copy) maps pure noise at one conditioning timestep (`method.timestep`) to x0 in one step; the frozen teacher
is the real score (classifier-free guided, cond and uncond in one 2B forward); a trainable fp32 copy of the teacher
is the FAKE score, trained with the denoising loss on G's detached samples (the "fake" phase, every step).

The divergence, in x0 units at each t (a per-t weighting of the score divergence, sigma_t^2 / alpha_t on scores):
    D(theta) = E_t E_{x_t ~ q_t^theta} d(Delta(x_t)),   Delta = x0_real(x_t) - x0_q(x_t)
with q_t^theta the generator's noised distribution. Its gradient (the score-gradient identity: Stein's identity and
the denoising score identity move the derivative of the unknown score x0_q onto the samples) is the gradient, with
the fake score standing in for x0_q and its PARAMETERS held fixed, of
    L(theta) = E[ 2 (1 - alpha) d(Delta(x_t)) + grad d(Delta(x_t)) . (x0_fake(x_t) - x0) ],  x_t = noise(G(z), t)
where gradients flow into G through x0 AND through x_t into both score networks' inputs. alpha = 0.5 is the exact
gradient of D (tests/test_sim.py checks it on a Gaussian with closed-form scores); SiD's alpha (1.2 in SiD-LSG) is
the same family.
- `distance: pseudo_huber` (SIM): d(D) = sqrt(mean(D^2) + c^2) - c per sample.
- `distance: l2` (SiD): d(D) = mean(D^2), the loss divided per sample by sg(mean|x0 - x0_real|) as SiD-LSG does:
  2 [(x0_real - x0_fake) . ((x0_real - x0) - alpha (x0_real - x0_fake))] / w, SiD's published per-pixel form.

Cost of a generator step: G forward and backward, the teacher's guided 2B forward and backward (to its input), the
fake score's forward and backward (to its input): `bench/sim_step.py` times it against the passes alone.

Gradient isolation: the "fake" phase runs G under no_grad through its raw module; the "g" phase holds the fake
score frozen through forward and backward (`phase_scope`); the teacher never trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from distill.config import ConfigError, LoraConfig
from distill.diffusion import Denoiser, NoiseSchedule, UNetCond, add_noise
from distill.methods.base import Batch, Method
from distill.methods.discriminator import latent_side
from distill.methods.dmd2 import GeneratorIO, OptimOverrides, denoising_target, overrides
from distill.methods.gan import frozen
from distill.methods.pairs import PairRegression, RegressionConfig
from distill.models.adapters import adapters_disabled
from distill.models.loader import load_fp32_unet
from distill.optim import OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec

DISTANCES = ("pseudo_huber", "l2")


@dataclass
class SIMConfig:
    name: str = "sim"
    lora: LoraConfig = field(default_factory=LoraConfig)  # disabled: a full fp32 generator
    # G's conditioning timestep: pure noise in, x0 out, in one step. From the teacher, 999 (where it already reads pure
    # noise); after a regression warm-up, 399 (bench/RESULTS.md, "One step: the conditioning timestep")
    timestep: int = 999
    distance: str = "pseudo_huber"  # pseudo_huber (SIM) | l2 (SiD)
    huber_c: float = 0.03  # pseudo-Huber c, on the per-element RMS of Delta (x0 units)
    alpha: float = 0.5  # 2 (1 - alpha) weights d(Delta): 0.5 = the divergence's exact gradient; SiD-LSG uses 1.2
    guidance_scale: float = 4.5  # the real score's CFG (standard form: uncond + s (cond - uncond))
    t_min: int = 20  # the divergence's timesteps t ~ U[t_min, t_max]
    t_max: int = 980
    generator_every_n_steps: int = 1  # the fake score steps every step, G every n-th (1: SiD's 1:1)
    generator: OptimOverrides = field(default_factory=OptimOverrides)
    fake: OptimOverrides = field(default_factory=OptimOverrides)
    # a first stage regressing G on teacher ODE pairs (from prompts too: still no training image), then SIM
    regression: RegressionConfig = field(default_factory=RegressionConfig)


def sim_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor, distance: str = "pseudo_huber", c: float = 0.03,
             alpha: float = 0.5) -> Tensor:
    """The generator loss (module doc), mean over the batch: x0 = G's sample, x0_real / x0_fake the two score
    networks' x0 predictions at x_t = noise(x0, t), all carrying their graphs to G."""
    dims = tuple(range(1, x0.ndim))
    delta, v = x0_real - x0_fake, x0_fake - x0
    if distance == "pseudo_huber":
        s = (delta.pow(2).mean(dims) + c * c).sqrt()
        per = 2 * (1 - alpha) * (s - c) + (delta * v).mean(dims) / s
    elif distance == "l2":
        w = (x0 - x0_real).abs().mean(dims).detach().clamp(min=1e-8)
        per = (2 * (1 - alpha) * delta.pow(2).mean(dims) + 2 * (delta * v).mean(dims)) / w
    else:
        raise ValueError(f"distance={distance!r}: expected one of {DISTANCES}")
    return per.mean()


@contextlib.contextmanager
def _teacher_pass(unet: nn.Module):
    ckpt = bool(getattr(unet, "is_gradient_checkpointing", False))
    if ckpt:
        unet.disable_gradient_checkpointing()
    try:
        with adapters_disabled(unet):
            yield
    finally:
        if ckpt:
            unet.enable_gradient_checkpointing()


class SIM(PairRegression, GeneratorIO, Method):
    Config = SIMConfig
    phase = "sim"  # the stage after a regression warm-up
    input_kind = "prompts"  # data-free: UNet conditioning from captions; no image or data latent is used

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if not 0 <= m.timestep < 1000:
            raise ConfigError(f"method.timestep={m.timestep}: expected a timestep in [0, 1000)")
        if m.distance not in DISTANCES:
            raise ConfigError(f"method.distance={m.distance!r}: expected pseudo_huber | l2")
        if m.huber_c <= 0:
            raise ConfigError(f"method.huber_c={m.huber_c} must be > 0")
        if not 0 <= m.t_min <= m.t_max < 1000:
            raise ConfigError(f"method.t_min={m.t_min}, method.t_max={m.t_max}: expected 0 <= t_min <= t_max < 1000")
        if m.generator_every_n_steps < 1:
            raise ConfigError(f"method.generator_every_n_steps={m.generator_every_n_steps} must be >= 1")
        bad = [s for s in cfg.trainer.validation_steps if s != 1]
        if bad:
            raise ConfigError(f"trainer.validation_steps has {bad}: a SIM student samples in 1 step")
        for side in ("generator", "fake"):
            sched = m[side].scheduler
            if sched is not None and sched not in ("constant", "linear", "cosine"):
                raise ConfigError(f"method.{side}.scheduler={sched!r}: expected constant | linear | cosine")
        cls.check_regression(m, one_step=True)

    @classmethod
    def plan(cls, cfg: DictConfig, run_dir):
        """One stage; two with a regression warm-up on teacher ODE pairs (then SIM from its export)."""
        return cls.regression_plan(cfg, run_dir) or super().plan(cfg, run_dir)

    def __init__(self, cfg: DictConfig, comps, device: torch.device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.teacher = comps.unet.requires_grad_(False).eval()
        side = latent_side(comps, cfg.data.resolution)
        self.latent_shape = (int(self.teacher.config.in_channels), side, side)
        init = self.regression_setup(stage, m.guidance_scale)  # the warm-up stage: G alone, on pairs
        self.fake = None if self.regression else load_fp32_unet(comps, device).to(device).requires_grad_(True).train()
        self.build_generator(init, device)  # a LoRA on the teacher's own base (adapters off = the teacher) or full
        self.generator.train()
        if cfg.trainer.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            if self.fake is not None:
                self.fake.enable_gradient_checkpointing()
        self.student = self.generator  # the model being distilled, by the name the benches read
        self.modules = {"generator": self.generator}
        if self.fake is not None:
            self.modules["fake"] = self.fake
        self.g_raw, self.fake_raw = self.generator, self.fake

    def optimizers(self) -> list[OptimizerSpec]:
        m = self.cfg.method
        if self.regression:
            return self.regression_optimizers(overrides(m.generator))
        return [OptimizerSpec("g", [{"params": self.trainable}], overrides=overrides(m.generator),
                              every_n_steps=m.generator_every_n_steps, primary=True),
                OptimizerSpec("fake", [{"params": list(self.fake.parameters())}], overrides=overrides(m.fake))]

    def phase_scope(self, phase: str):
        return frozen(self.fake_raw) if phase == "g" and self.fake is not None else contextlib.nullcontext()

    # -- the networks ---------------------------------------------------------------------------------------
    def real_score(self) -> Denoiser:
        """The teacher. With a LoRA generator it is G's own base with the adapters off, and its backward (to x_t)
        runs after that scope has closed: a gradient-checkpointed recompute would then see the adapters on, so
        that pass keeps its activations instead (checkpointing off for its forward)."""
        scope = (lambda: _teacher_pass(self.g_raw)) if self.lora else None
        return Denoiser(self.teacher, self.schedule, scope=scope)

    def generate(self, unet: nn.Module, batch: Batch) -> Tensor:
        """G's one step: pure noise at `method.timestep` -> x0 (fp32)."""
        dev = batch.cond.encoder_hidden_states.device
        z = batch.randn("z", self.latent_shape, dev)
        t = torch.full((z.shape[0],), int(self.cfg.method.timestep), dtype=torch.long, device=dev)
        with self.autocast():
            return Denoiser(unet, self.schedule).x0_eps(z, t, batch.cond)[0].float()

    def _x0(self, net: nn.Module, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        with self.autocast():
            return Denoiser(net, self.schedule).x0_eps(x, t, cond)[0].float()

    # -- losses -------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        if self.regression:
            return self.regression_losses(batch, int(self.cfg.method.timestep), self._x0)
        return self._generator_losses(batch) if phase == "g" else self._fake_losses(batch)

    def _generator_losses(self, batch: Batch) -> dict[str, Tensor]:
        m, cond = self.cfg.method, batch.cond
        dev = cond.encoder_hidden_states.device
        with span("student"):
            x0 = self.generate(self.modules["generator"], batch)
        t = batch.randint("t_sim", m.t_min, m.t_max + 1, dev)
        x_t = add_noise(x0, batch.randn("eps_sim", self.latent_shape, dev), t, self.schedule)  # keeps G's graph
        with span("teacher"):
            real = self.real_score()
            out = real.guided(x_t, t, cond, cond.zeros_like(), m.guidance_scale, form="standard").float()
            x0_real = real.x0_eps(x_t, t, cond, out)[0].float()
        with span("target"):  # the fake score's parameters frozen by phase_scope; its input carries the graph
            x0_fake = self._x0(self.fake_raw, x_t, t, cond)
        loss = sim_loss(x0, x0_real, x0_fake, m.distance, m.huber_c, m.alpha)
        with torch.no_grad():
            gap = (x0_real - x0_fake).pow(2).mean().sqrt()
        return {"loss": loss, "score_gap": gap}

    def _fake_losses(self, batch: Batch) -> dict[str, Tensor]:
        cond = batch.cond
        dev = cond.encoder_hidden_states.device
        with torch.no_grad(), span("student"), self.lora_fused(self.g_raw):
            x0 = self.generate(self.g_raw, batch)
        t = batch.randint("t_fake", 0, self.schedule.num_train_timesteps, dev)
        eps = batch.randn("eps_fake", self.latent_shape, dev)
        with span("d"), self.autocast():
            out = Denoiser(self.modules["fake"], self.schedule).output(add_noise(x0, eps, t, self.schedule), t, cond)
        loss = F.mse_loss(out, denoising_target(x0, eps, t, self.schedule))
        return {"loss": loss, "loss_denoise": loss.detach()}

    # -- sampling and export ------------------------------------------------------------------------------
    def sampler(self) -> SamplerSpec:
        """LCMScheduler at the one conditioning timestep, no CFG: pure noise in, G's x0 out."""
        return SamplerSpec("lcm", (1,), 1.0, original_inference_steps=1,
                           timesteps={1: (int(self.cfg.method.timestep),)})

    def export_name(self) -> str:
        return "sim" if self.cfg.method.distance == "pseudo_huber" else "sid"
