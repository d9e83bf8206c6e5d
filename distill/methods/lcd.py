"""Latent consistency distillation (LCM, arXiv 2310.04378, Algorithm 1; LCM-LoRA, arXiv 2311.05556).

One step costs: one teacher forward of batch 2B (cond + uncond batched), one target forward, one student
forward and backward. Full student: a copy of the teacher with a zero-initialised guidance (w) embedding, and an
EMA target. LoRA student: the teacher's own UNet with adapters; the teacher pass disables them, the target is the
student under stop-grad, and w is fixed (a LoRA student has no w input) unless a range is configured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from distill.callbacks import EMAUpdate
from distill.config import ConfigError, LoraConfig
from distill.optim import OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec

from distill.diffusion import Denoiser, Fp32Io, NoiseSchedule, UNetCond, add_noise, lcm_skip_grid
from distill.methods.base import Batch, Method
from distill.models.adapters import EMA, adapters_disabled, add_lora, guidance_embedding, student_with_w_embedding
from distill.models.loader import load_fp32_unet, stored_fp32_state


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt(d^2 + c^2) - c, averaged (the LCM scripts' huber loss; c = 1e-3)."""
    return (torch.sqrt((a - b) ** 2 + c * c) - c).mean()


@dataclass
class LCDConfig:
    name: str = "lcd"
    lora: LoraConfig = field(default_factory=LoraConfig)  # disabled: full-UNet student, w-embedding, EMA target
    num_ddim_timesteps: int = 50
    w_min: float = 3.0  # LCM-form guidance scale w (standard scale w + 1); fixed when w_min == w_max
    w_max: float = 15.0
    inference_w: Optional[float] = None  # w for validation grids and the export card (full LCD: within
    #   [w_min, w_max]); None: 7.5 (the LCM papers' choice) clamped into [w_min, w_max]
    inference_gamma: Optional[float] = None  # the sampler of validation grids and the export card: None =
    #   LCMScheduler (full re-noising each step); a value in [0, 1] = TCDScheduler with eta = gamma (0: deterministic)
    w_embedding_dim: int = 256
    loss: str = "huber"  # huber | l2
    huber_c: float = 1e-3
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    ema_decay: float = 0.95  # per step; an alias of ema_half_life_images, which wins when set
    ema_half_life_images: Optional[float] = None  # the EMA target's half-life in images (edm): batch-size free


def check_guidance_and_loss(m) -> None:
    """The checks every consistency method with LCD's w range, loss and EMA shares (LCD, PCM)."""
    if m.w_min > m.w_max:
        raise ConfigError(f"method.w_min={m.w_min} > method.w_max={m.w_max}")
    if m.loss not in ("huber", "l2"):
        raise ConfigError(f"method.loss={m.loss!r}: expected huber | l2")
    if m.inference_w is not None and not m.lora.enabled and not m.w_min <= m.inference_w <= m.w_max:
        raise ConfigError(f"method.inference_w={m.inference_w} is outside the trained range "
                          f"[method.w_min, method.w_max] = [{m.w_min}, {m.w_max}]")
    if m.ema_half_life_images is not None and m.ema_half_life_images <= 0:
        raise ConfigError(f"method.ema_half_life_images={m.ema_half_life_images} must be > 0")


class LCD(Method):
    Config = LCDConfig

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        check_guidance_and_loss(m)
        if m.inference_gamma is not None and not 0.0 <= m.inference_gamma <= 1.0:
            raise ConfigError(f"method.inference_gamma={m.inference_gamma}: expected null (LCMScheduler) or a value "
                              "in [0, 1] (TCDScheduler's eta)")
        too_many = [s for s in cfg.trainer.validation_steps if s > m.num_ddim_timesteps]
        if too_many:
            raise ConfigError(f"trainer.validation_steps has {too_many}: an LCD student samples at most "
                              f"method.num_ddim_timesteps={m.num_ddim_timesteps} steps (its skip grid)")
        if m.num_ddim_timesteps < 1 or 1000 % m.num_ddim_timesteps:
            raise ConfigError(f"method.num_ddim_timesteps={m.num_ddim_timesteps} must divide 1000 (the skip grid "
                              "t_i = (i + 1) * 1000 / N - 1 that LCMScheduler's original_inference_steps samples)")

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.grid = lcm_skip_grid(self.schedule.num_train_timesteps, m.num_ddim_timesteps).to(device)
        self.k = self.schedule.num_train_timesteps // m.num_ddim_timesteps
        self.teacher = comps.unet
        self.lora = bool(m.lora.enabled)
        if self.lora:
            self.student = self.teacher  # one UNet in memory: adapters on = student, off = teacher
            self.trainable = add_lora(self.student, m.lora.rank, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
            self.student.train()
            self.ema = None
            self.w_dim = None
        else:
            # from the fp32 weights as stored, not the frozen half-precision teacher
            self.w_dim = m.w_embedding_dim if self.w_input() else None
            unet = load_fp32_unet(comps)
            self.student = (student_with_w_embedding(unet, self.w_dim) if self.w_dim else unet).to(device).train()
            self.student.requires_grad_(True)
            self.trainable = list(self.student.parameters())
            self.ema = EMA(copy.deepcopy(self.student).requires_grad_(False).eval(), m.ema_decay)
        if cfg.trainer.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.modules = {"student": self.student}

    def w_input(self) -> bool:
        """Whether the student takes the guidance w as an input (a full student's zero-initialised w-embedding)."""
        return not self.cfg.method.lora.enabled

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("g", [{"params": self.trainable}])]

    def callbacks(self):
        if self.ema is None:
            return []
        return [EMAUpdate(self.ema, self.student, self.cfg.method.ema_half_life_images)]

    # -- the objective (LCM Algorithm 1) ---------------------------------------------------------------------
    def _w(self, batch: Batch, device) -> Tensor:
        m = self.cfg.method
        return m.w_min + (m.w_max - m.w_min) * batch.rand("w", device)

    def _cond(self, cond: UNetCond, w: Tensor) -> UNetCond:
        if self.w_dim is None:
            return cond
        return replace(cond, timestep_cond=guidance_embedding(w, self.w_dim).to(cond.encoder_hidden_states))

    def _consistency(self, unet, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t): the consistency function with its boundary at t = 0."""
        m = self.cfg.method
        return Denoiser(unet, self.schedule).consistency(x, t, cond, 0, timestep_scaling=m.timestep_scaling,
                                                         sigma_data=m.sigma_data)

    def teacher_denoiser(self) -> Denoiser:
        """The frozen teacher: the UNet with its adapters off (LoRA), else the frozen copy, in its own dtype."""
        if self.lora:
            return Denoiser(self.student, self.schedule, scope=lambda: adapters_disabled(self.student))
        return Denoiser(self.teacher, self.schedule)

    def losses(self, batch: Batch, phase: str, step: int):
        m = self.cfg.method
        x0, cond = batch.latents, batch.cond
        dev = x0.device
        idx = batch.randint("index", 0, m.num_ddim_timesteps, dev)
        t = self.grid[idx]
        s = (t - self.k).clamp(min=0)  # the teacher's target point t_{n}; t_0 - k clamps to 0 as in diffusers
        eps = batch.randn("eps", tuple(x0.shape[1:]), dev)
        x_t = add_noise(x0, eps, t, self.schedule)
        w = self._w(batch, dev)
        student_cond = self._cond(cond, w)
        with torch.no_grad():
            # Teacher: one DDIM step on LCM-form guidance, cond + uncond (all-zero text) in ONE 2B forward; only
            # the UNet's inputs in its dtype: the DDIM step and w stay fp32 (a bf16 x_s moves about one ulp at
            # t = 999, and the huber c is 1e-3)
            with span("teacher"):
                x_s = self.teacher_denoiser().guided_jump(x_t, t, s, cond, cond.zeros_like(), w).float()
            with span("target"):
                if self.lora:
                    with self.lora_fused(self.student):
                        target = self._consistency(self.student, x_s, s, student_cond)
                else:  # the EMA copy is not Accelerate-prepared: autocast it as the student is
                    with self.autocast():
                        target = self._consistency(self.ema.model, x_s, s, student_cond)
        with span("student"):
            pred = self._consistency(self.modules["student"], x_t, t, student_cond)
        if m.loss == "huber":
            loss = pseudo_huber(pred.float(), target.float(), m.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        return {"loss": loss}

    def state_dict(self):
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict(state)

    # -- sampling and export -----------------------------------------------------------------------------
    def inference_w(self) -> float:
        m = self.cfg.method
        return float(m.inference_w) if m.inference_w is not None else min(max(7.5, m.w_min), m.w_max)

    def sampler(self) -> SamplerSpec:
        """LCMScheduler (or TCD at method.inference_gamma) on the skip grid trained on; guidance_scale w + 1 goes
        into a full student's w-embedding (a LoRA student's w is fixed in training: 1)."""
        gamma = self.cfg.method.inference_gamma
        n_grid = len(self.grid)
        return SamplerSpec("lcm" if gamma is None else "tcd", tuple(n for n in (1, 2, 4, 8) if n <= n_grid),
                           1.0 if self.lora else self.inference_w() + 1.0,
                           eta=None if gamma is None else float(gamma), original_inference_steps=n_grid)

    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        was_training = self.student.training
        self.student.eval()
        try:
            with self.lora_fused(self.student):
                return self.sampler().sample(Fp32Io(self.student), noise, cond, self.schedule, num_steps, seeds,
                                             w_dim=self.w_dim, uncond=cond.zeros_like())  # uncond: a CFG sampler's
        finally:
            self.student.train(was_training)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        info = {"method": "lcd" + ("-lora" if self.lora else ""), "teacher": self.cfg.model.pretrained,
                "arch": self.comps.arch}
        export_student(self.student, Path(out_dir), lora=self.lora, dtype=dtype, info=info, sampler=self.sampler(),
                       base_path=self.comps.path,
                       lora_base=stored_fp32_state(self.student, self.comps) if self.lora else None)
