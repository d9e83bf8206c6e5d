"""Latent consistency distillation (LCM, arXiv 2310.04378, Algorithm 1; LCM-LoRA, arXiv 2311.05556).

One step costs: one teacher forward of batch 2B (cond + uncond batched), one target forward, one student
forward and backward. Full student: a copy of the teacher with a zero-initialised guidance (w) embedding, and an
EMA target. LoRA student: the teacher's own UNet with adapters; the teacher pass disables them, the target is the
student under stop-grad, and w is fixed (a LoRA student has no w input) unless a range is configured.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from distill.diffusion import (Fp32Io, NoiseSchedule, UNetCond, add_noise, call_unet, consistency_scalings, guided_ddim_step,
                               lcm_skip_grid, sample_lcm, to_x0_eps, weight_dtype)
from distill.methods.base import Batch, Method
from distill.models.adapters import EMA, adapters_disabled, add_lora, guidance_embedding, student_with_w_embedding
from distill.models.loader import load_fp32_unet, stored_fp32_state


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt(d^2 + c^2) - c, averaged (the LCM scripts' huber loss; c = 1e-3)."""
    return (torch.sqrt((a - b) ** 2 + c * c) - c).mean()


class LCD(Method):
    def __init__(self, cfg, comps, device):
        super().__init__(cfg, comps, device)
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
            self.student = student_with_w_embedding(load_fp32_unet(comps), m.w_embedding_dim).to(device).train()
            self.student.requires_grad_(True)
            self.trainable = list(self.student.parameters())
            self.ema = EMA(copy.deepcopy(self.student).requires_grad_(False).eval(), m.ema_decay)
            self.w_dim = m.w_embedding_dim
        if cfg.trainer.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.modules = {"student": self.student}

    def param_groups(self):
        return [[{"params": self.trainable}]]

    # -- the objective (LCM Algorithm 1) ---------------------------------------------------------------------
    def _w(self, batch: Batch, device) -> Tensor:
        m = self.cfg.method
        return m.w_min + (m.w_max - m.w_min) * batch.rand("w", device)

    def _cond(self, cond: UNetCond, w: Tensor) -> UNetCond:
        if self.w_dim is None:
            return cond
        return replace(cond, timestep_cond=guidance_embedding(w, self.w_dim).to(cond.encoder_hidden_states))

    def _consistency(self, unet, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t): the boundary-conditioned consistency function."""
        m = self.cfg.method
        x0, _ = to_x0_eps(call_unet(unet, x, t, cond), x, t, self.schedule)
        c_skip, c_out = consistency_scalings(t, m.timestep_scaling, m.sigma_data)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.to(x).view(shape) * x + c_out.to(x).view(shape) * x0

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
            # Teacher: one DDIM step on LCM-form guidance, cond + uncond (all-zero text) in ONE 2B forward.
            if self.lora:
                with adapters_disabled(self.student):
                    x_s, _, _ = guided_ddim_step(self.student, x_t, t, s, cond, cond.zeros_like(), w, self.schedule,
                                                 net_dtype=weight_dtype(self.student))
            else:
                # only the UNet's inputs in the teacher's dtype: the DDIM step and w stay fp32 (a bf16 x_s moves
                # about one ulp at t = 999, and the huber c is 1e-3)
                dt = next(self.teacher.parameters()).dtype
                x_s, _, _ = guided_ddim_step(self.teacher, x_t, t, s, cond, cond.zeros_like(), w, self.schedule,
                                             net_dtype=dt)
            x_s = x_s.float()
            if self.lora:
                target = self._consistency(self.student, x_s, s, student_cond)
            else:  # the EMA copy is not Accelerate-prepared: autocast it as the student is
                with self.autocast():
                    target = self._consistency(self.ema.model, x_s, s, student_cond)
        pred = self._consistency(self.modules["student"], x_t, t, student_cond)
        if m.loss == "huber":
            loss = pseudo_huber(pred.float(), target.float(), m.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        return {"loss": loss}

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.student)

    def state_dict(self):
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict(state)

    # -- sampling and export -----------------------------------------------------------------------------
    def inference_w(self) -> float:
        m = self.cfg.method
        return float(m.inference_w) if m.inference_w is not None else min(max(7.5, m.w_min), m.w_max)

    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        w = torch.full((noise.shape[0],), self.inference_w(), device=noise.device)
        was_training = self.student.training
        self.student.eval()
        try:
            return sample_lcm(Fp32Io(self.student), noise, self._cond(cond, w), self.schedule, num_steps, seeds,
                              original_inference_steps=len(self.grid), gamma=self.cfg.method.inference_gamma)
        finally:
            self.student.train(was_training)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        n_grid = len(self.grid)  # the skip grid it was trained on: LCMScheduler(original_inference_steps=N) samples it
        gamma = self.cfg.method.inference_gamma
        info = {"method": "lcd" + ("-lora" if self.lora else ""), "teacher": self.cfg.model.pretrained,
                "scheduler": "LCMScheduler" if gamma is None else "TCDScheduler",
                "steps": [n for n in (1, 2, 4, 8) if n <= n_grid],
                "guidance_scale": 1.0 if self.lora else self.inference_w() + 1.0, "arch": self.comps.arch,
                "original_inference_steps": n_grid}
        if gamma is not None:
            info["eta"] = float(gamma)  # TCDScheduler's gamma, an argument of the pipeline call
        export_student(self.student, Path(out_dir), lora=self.lora, dtype=dtype, info=info,
                       base_path=self.comps.path,
                       lora_base=stored_fp32_state(self.student, self.comps) if self.lora else None)
