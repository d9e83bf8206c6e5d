"""Progressive adversarial distillation (SDXL-Lightning, arXiv 2402.13929).

A run is a list of stages (configuration, `method.stages`); `PAD.plan` turns it into one distill.stages.Stage per
stage (what it starts from, persisted in its folder's stage.json), run by distill.stages one after another, each in `stages/<i>_<name>/` with its own checkpoints and export:
  - the student starts from the previous stage's fused export (`export/unet`); a LoRA stage that follows a LoRA
    stage continues that LoRA on the same base instead, so a chain of LoRA stages yields LoRAs for the base;
  - the teacher of a stage with n_s student steps and n teacher moves per student move is the last earlier stage
    whose student takes n * n_s steps (so 4 -> 2 with n = 4 learns from the 8-step model: the paper's skip-level
    teacher, Sec. 3.4), else the base model (e.g. the 128-step base teaches the 32-step MSE stage);
  - the discriminator is re-initialised from the base model's encoder at every stage (Sec. 3.2).

Within a stage (Sec. 2-3): the student's start t is a trailing grid point (pure noise at t = T, Sec. 3.3); real =
the teacher's x_{t-ns} after n teacher moves (DDIM `move`) from x_t, fake = the student's one move. Objectives:
  mse          ||x_hat_{t-ns} - x_{t-ns}||^2, the teacher run with CFG (the 128 -> 32 stage, eq. 16)
  adversarial  alternating D and G steps, non-saturating losses in logits (eqs. 17-23):
               L_D = softplus(-l_real) + softplus(l_fake),  L_G = softplus(-l_fake)
  x0           1-step conversion to x0 prediction: ||f_online(x_t) - x0(x_t, f_frozen(x_t))||^2 (Sec. 3.7.3)
The 1-step adversarial stages re-noise both outputs (clean x0) to t* in `renoise_timesteps` (Sec. 3.7.2).

Gradient isolation: the D step runs the student under no_grad through its raw module; the G step runs D through
its raw module with D's parameters frozen for the whole phase (forward, backward and the optimizer step, through
`phase_scope`), so no gradient ever reaches D's .grad, and a checkpointed D recomputes as it ran.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from distill.diffusion import (
    Fp32Io,
    NoiseSchedule,
    UNetCond,
    add_noise,
    call_unet,
    guided_prediction,
    inference_timesteps,
    move,
    to_x0_eps,
    weight_dtype,
)
from distill.config import ConfigError, LoraConfig
from distill.methods.base import Batch, Method
from distill.optim import OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec
from distill.stages import Stage, stage_folder
from distill.methods.discriminator import Discriminator, latent_side
from distill.methods.gan import d_loss, frozen, g_loss
from distill.models.adapters import adapters_disabled, add_lora, load_lora
from distill.models.loader import load_fp32_unet, load_unet, stored_fp32_state


@dataclass
class PADStage:
    """One stage of progressive adversarial distillation (SDXL-Lightning, arXiv 2402.13929, Sec. 3.6). The stage
    list is configuration; `PAD.plan` resolves what each stage starts from."""

    name: str = "stage"  # also its folder: stages/<index>_<name>
    student_steps: int = 8  # steps the student takes after this stage
    teacher_steps_per_student_step: int = 4  # n: teacher moves per student move; the teacher is the last earlier
    #   stage with student_steps = n * this stage's (the skip-level teacher for 2 and 1 step), else the base model
    objective: str = "adversarial"  # mse | adversarial | x0 (1-step conversion: MSE against the frozen eps model)
    discriminator: str = "conditional"  # conditional (on x_t) | unconditional
    lora: bool = True  # train a LoRA (merged into the next stage's start) or the full UNet
    max_steps: int = 100  # optimizer steps of this stage (capped by trainer.max_stage_steps)
    guidance_scale: float = 1.0  # teacher CFG scale (the paper's 128 -> 32 MSE stage uses 6, no other stage)
    renoise_timesteps: list[int] = field(default_factory=list)  # 1-step stage: t* to re-noise both outputs to
    renoise_weights: list[float] = field(default_factory=list)  # relative odds of each t* (empty: equal)
    train_timestep_steps: int = 0  # student start timesteps = trailing grid of this many steps (0: student_steps;
    #   the paper trains 2- and 1-step students on {250, 500, 750, 1000}, i.e. 4)
    prediction_type: Optional[str] = None  # the student's output: None keeps its init's; "sample" = x0 (1 step)
    lr: Optional[float] = None  # student lr (None: optim.lr)
    lr_d: Optional[float] = None  # discriminator lr (None: method.lr_d)
    betas: Optional[list[float]] = None  # student Adam betas (None: method.betas if adversarial, else optim.betas)


@dataclass
class PADConfig:
    name: str = "pad"
    stages: list[PADStage] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))  # settings of every LoRA stage
    lr_d: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])  # Adam betas of D and adversarial students
    d_head_channels: int = 64  # width of the discriminator head's [4x4 conv s2, GroupNorm, SiLU] blocks
    discriminator_init: str = "base"  # base (the paper: pre-trained SDXL encoder) | teacher (the stage's teacher)


def _check_pad(m: DictConfig) -> None:
    if not m.stages:
        raise ConfigError("method.stages is empty: PAD needs at least one stage (see configs/method/pad.yaml)")
    if m.discriminator_init not in ("base", "teacher"):
        raise ConfigError(f"method.discriminator_init={m.discriminator_init!r}: expected base | teacher")
    pred = None
    for i, st in enumerate(m.stages):
        key = f"method.stages[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", st.name):
            raise ConfigError(f"{key}.name={st.name!r}: use letters, digits, _ . - (it names the stage folder)")
        if st.objective not in ("mse", "adversarial", "x0"):
            raise ConfigError(f"{key}.objective={st.objective!r}: expected mse | adversarial | x0")
        if st.discriminator not in ("conditional", "unconditional"):
            raise ConfigError(f"{key}.discriminator={st.discriminator!r}: expected conditional | unconditional")
        if st.prediction_type not in (None, "epsilon", "v_prediction", "sample"):
            raise ConfigError(f"{key}.prediction_type={st.prediction_type!r}: expected epsilon | v_prediction | sample")
        if st.student_steps < 1 or st.teacher_steps_per_student_step < 1 or st.max_steps < 1:
            raise ConfigError(f"{key}: student_steps, teacher_steps_per_student_step and max_steps must be >= 1")
        grid = st.train_timestep_steps or st.student_steps
        if (st.student_steps * st.teacher_steps_per_student_step) % grid:
            raise ConfigError(f"{key}.train_timestep_steps={grid} must divide the teacher's step count "
                              f"{st.student_steps * st.teacher_steps_per_student_step} (its starts lie on that grid)")
        if st.renoise_weights and len(st.renoise_weights) != len(st.renoise_timesteps):
            raise ConfigError(f"{key}.renoise_weights needs one weight per renoise_timesteps entry")
        if any(not 0 <= t < 1000 for t in st.renoise_timesteps):
            raise ConfigError(f"{key}.renoise_timesteps must lie in [0, 1000)")
        if st.objective == "x0":
            if st.prediction_type != "sample" or st.student_steps != 1:
                raise ConfigError(f"{key}: objective=x0 converts a 1-step student to x0 prediction: set "
                                  "student_steps=1 and prediction_type=sample")
        elif st.prediction_type is not None and (st.prediction_type != pred if pred is not None
                                                 else st.prediction_type == "sample"):
            raise ConfigError(f"{key}.prediction_type={st.prediction_type!r} differs from the model it starts from "
                              f"({pred or 'the base'}): only an objective=x0 stage changes the parameterisation")
        pred = st.prediction_type or pred



class PAD(Method):
    Config = PADConfig

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        _check_pad(cfg.method)

    def __init__(self, cfg: DictConfig, comps, device: torch.device, stage: Stage | None = None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        if stage is None:  # built outside a staged run (a test, the bench): the first stage, from the base
            stage = Stage(m.stages[0].name, 0, Path(cfg.output_dir or "."), info={})
        self.stage_info = stage
        self.info = info = {"student_init": None, "lora_init": None, "teacher": None,
                            "student_prediction_type": None, "teacher_prediction_type": None, **stage.info}
        self.stage = st = m.stages[stage.index]
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.student_pred = info["student_prediction_type"] or self.schedule.prediction_type
        self.teacher_pred = info["teacher_prediction_type"] or self.schedule.prediction_type
        self.adversarial = st.objective == "adversarial"
        self._grids(st, device)
        base = comps.unet
        frozen_dt = next(base.parameters()).dtype
        # x0 conversion: the frozen eps copy is the student's own start (the previous stage's model).
        self.teacher = base if info["teacher"] is None else load_unet(info["teacher"], frozen_dt, device)
        self.teacher.requires_grad_(False).eval()
        self.discriminator: Discriminator | None = None
        if self.adversarial:  # before add_lora, which changes the base UNet in place
            src = base if m.discriminator_init == "base" else self.teacher
            if src is base and weight_dtype(base) != torch.float32:
                src = load_fp32_unet(comps)  # D trains in fp32 from the stored weights, not the rounded frozen copy
            self.discriminator = Discriminator(src, latent_side(comps, cfg.data.resolution), m.d_head_channels,
                                               st.discriminator == "conditional").to(device)
        self.shared = st.lora and info["lora_init"] is None and info["student_init"] == info["teacher"]  # adapters off
        if st.lora:
            if self.shared:
                self.student = self.teacher
            else:
                self.student = (base if info["student_init"] is None
                                else load_unet(info["student_init"], frozen_dt, device))
            self.trainable = add_lora(self.student, m.lora.rank, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
            if info["lora_init"]:
                load_lora(self.student, info["lora_init"])
        else:
            self.student = (load_unet(info["student_init"], torch.float32, device) if info["student_init"]
                            else load_fp32_unet(comps, device))  # the stored fp32 weights, not the frozen copy
            self.student.requires_grad_(True)
            self.trainable = list(self.student.parameters())
        self.student.train()
        if cfg.trainer.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            if self.discriminator is not None:
                self.discriminator.backbone.enable_gradient_checkpointing()
        if comps.unet is not self.student and comps.unet is not self.teacher:
            comps.unet = self.teacher  # let the base UNet go (the trainer reads only its config from here on)
        self.modules = {"student": self.student}
        if self.discriminator is not None:
            self.modules["discriminator"] = self.discriminator
        self.student_raw, self.d_raw = self.student, self.discriminator  # unwrapped: no-grad and frozen use

    def _grids(self, st, device: torch.device) -> None:
        """Teacher grid: trailing timesteps of the teacher's n * n_s steps plus -1 (clean). Student starts: the
        trailing grid of `train_timestep_steps` (a subset of the teacher grid; validated in the config)."""
        T = self.schedule.num_train_timesteps
        self.n = st.teacher_steps_per_student_step
        teacher = inference_timesteps(self.n * st.student_steps, "trailing", T).tolist() + [-1]
        starts = inference_timesteps(st.train_timestep_steps or st.student_steps, "trailing", T).tolist()
        self.grid = torch.tensor(teacher, dtype=torch.long, device=device)
        self.start_index = torch.tensor([teacher.index(s) for s in starts], dtype=torch.long, device=device)
        weights = torch.tensor(list(st.renoise_weights) or [1.0] * len(st.renoise_timesteps), dtype=torch.float64)
        self.renoise_t = torch.tensor(list(st.renoise_timesteps), dtype=torch.long, device=device)
        self.renoise_cdf = (weights.cumsum(0) / weights.sum()).float().to(device) if len(weights) else None

    @staticmethod
    def student_settings(cfg: DictConfig, st) -> dict:
        """The student's optimizer settings in a stage: its lr, and Adam betas (0, 0.99) when adversarial."""
        out = {"betas": list(st.betas or (cfg.method.betas if st.objective == "adversarial" else cfg.optim.betas))}
        if st.lr is not None:
            out["lr"] = st.lr
        return out

    def optimizers(self) -> list[OptimizerSpec]:
        """D then G when adversarial (alternating, each with its own lr and betas); G alone otherwise."""
        m, st = self.cfg.method, self.stage
        g = OptimizerSpec("g", [{"params": self.trainable}], overrides=self.student_settings(self.cfg, st),
                          primary=True)
        if not self.adversarial:
            return [g]
        d = OptimizerSpec("d", [{"params": list(self.discriminator.parameters())}],
                          overrides={"lr": st.lr_d if st.lr_d is not None else m.lr_d, "betas": list(m.betas)})
        return [d, g]

    # -- the trajectory ----------------------------------------------------------------------------------
    def _teacher_output(self, x: Tensor, t: Tensor, cond: UNetCond) -> Tensor:
        """The teacher's prediction (CFG with zero embeddings as uncond when guidance_scale != 1)."""
        scale = self.stage.guidance_scale
        ctx = adapters_disabled(self.student_raw) if self.shared else contextlib.nullcontext()
        dt = next(self.teacher.parameters()).dtype
        with ctx:  # only the UNet's inputs in the teacher's dtype; the guidance and the moves stay fp32
            return guided_prediction(self.teacher, x.float(), t, cond, cond.zeros_like() if scale != 1.0 else None,
                                     scale, net_dtype=dt).float()

    @torch.no_grad()
    def teacher_path(self, x_t: Tensor, j: Tensor, cond: UNetCond) -> Tensor:
        """n teacher moves from grid index j (per sample); a sample that reaches the clean end stops there."""
        with span("teacher"):
            return self._teacher_path(x_t, j, cond)

    def _teacher_path(self, x_t: Tensor, j: Tensor, cond: UNetCond) -> Tensor:
        last = len(self.grid) - 1
        x = x_t
        for k in range(self.n):
            a, b = (j + k).clamp(max=last), (j + k + 1).clamp(max=last)
            idx = (a < last).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            ta, tb = self.grid[a[idx]], self.grid[b[idx]]
            out = self._teacher_output(x[idx], ta, cond.index(idx))
            x = x.clone()
            x[idx] = move(x[idx], out, ta, tb, self.schedule, self.teacher_pred).to(x.dtype)
        return x

    def _student_move(self, unet: nn.Module, x_t: Tensor, t: Tensor, t_next: Tensor, cond: UNetCond) -> Tensor:
        with span("student"):
            out = call_unet(unet, x_t, t, cond)
            return move(x_t, out, t, t_next, self.schedule, self.student_pred)

    def _draw(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t, t_next, j): start index on the teacher grid, the student's target point n moves on."""
        x0 = batch.latents
        dev = x0.device
        j = self.start_index[batch.randint("start", 0, len(self.start_index), dev)]
        t, t_next = self.grid[j], self.grid[(j + self.n).clamp(max=len(self.grid) - 1)]
        eps = batch.randn("eps", tuple(x0.shape[1:]), dev)
        return add_noise(x0, eps, t, self.schedule, pure_noise_at_T=True), t, t_next, j  # Sec. 3.3: x_T = eps

    def _for_d(self, batch: Batch, samples: list[Tensor], t_next: Tensor) -> tuple[list[Tensor], Tensor]:
        """What D sees, and at which timestep: the samples at t_next (clean: t = 0), or for the 1-step stage both
        re-noised with the SAME eps* to t* (Sec. 3.7.2)."""
        if self.renoise_cdf is None:
            return samples, t_next.clamp(min=0)
        dev = t_next.device
        pick = torch.searchsorted(self.renoise_cdf, batch.rand("t_star", dev), right=True).clamp(max=len(self.renoise_t) - 1)
        s = self.renoise_t[pick]
        eps = batch.randn("eps_star", tuple(samples[0].shape[1:]), dev)
        return [add_noise(x, eps, s, self.schedule) for x in samples], s

    # -- losses ------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, phase: str, step: int) -> dict[str, Tensor]:
        cond = batch.cond
        x_t, t, t_next, j = self._draw(batch)
        if self.stage.objective == "mse":
            real = self.teacher_path(x_t, j, cond)
            fake = self._student_move(self.modules["student"], x_t, t, t_next, cond)
            return {"loss": F.mse_loss(fake, real)}
        if self.stage.objective == "x0":
            with torch.no_grad(), span("teacher"):
                target, _ = to_x0_eps(self._teacher_output(x_t, t, cond), x_t, t, self.schedule, self.teacher_pred)
            with span("student"):
                pred = call_unet(self.modules["student"], x_t, t, cond)
            return {"loss": F.mse_loss(pred, target)}
        cond_d = (x_t, t) if self.stage.discriminator == "conditional" else (None, None)
        if phase == "d":
            with torch.no_grad():
                real = self.teacher_path(x_t, j, cond)
                with self.lora_fused(self.student_raw):
                    fake = self._student_move(self.student_raw, x_t, t, t_next, cond)
            (real, fake), s = self._for_d(batch, [real, fake], t_next)
            with span("d"):
                logits = self.modules["discriminator"](torch.cat([real, fake]), torch.cat([s, s]), cond, *cond_d)
            l_real, l_fake = logits.chunk(2)
            return {"loss": d_loss(l_real, l_fake), "logit_real": l_real.detach().mean(), "logit_fake": l_fake.detach().mean()}
        fake = self._student_move(self.modules["student"], x_t, t, t_next, cond)
        (fake,), s = self._for_d(batch, [fake], t_next)
        with span("d"):
            l_fake = self.d_raw(fake, s, cond, *cond_d)  # D frozen by phase_scope("g") through backward
        return {"loss": g_loss(l_fake)}

    def phase_scope(self, phase: str):
        """The G phase holds D frozen over its forwards AND backwards (checkpoint recompute: see gan.frozen)."""
        return frozen(self.d_raw) if phase == "g" and self.d_raw is not None else contextlib.nullcontext()

    # -- stages ------------------------------------------------------------------------------------------
    @classmethod
    def plan(cls, cfg: DictConfig, run_dir: Path) -> list[Stage]:
        """One Stage per `method.stages` entry, each pointing at what it starts from (see the module docstring)."""
        specs = list(cfg.method.stages)
        dirs = [stage_folder(run_dir, i, s.name) for i, s in enumerate(specs)]
        lora_base: list[str | None] = []
        preds: list[str | None] = []
        out = []
        for i, st in enumerate(specs):
            prev_export = str(dirs[i - 1] / "export" / "unet") if i else None
            if i and st.lora and specs[i - 1].lora:  # continue the LoRA on the same base
                init, lora_init = lora_base[i - 1], str(dirs[i - 1] / "export" / "lora")
            else:
                init, lora_init = prev_export, None
            lora_base.append(init)
            pred_in = preds[i - 1] if i else None
            preds.append(st.prediction_type or pred_in)
            if st.objective == "x0":
                teacher, teacher_pred = prev_export, pred_in
            else:
                want = st.student_steps * st.teacher_steps_per_student_step
                src = next((k for k in range(i - 1, -1, -1) if specs[k].student_steps == want), None)
                teacher = None if src is None else str(dirs[src] / "export" / "unet")
                teacher_pred = None if src is None else preds[src]
            info = {"student_init": init, "lora_init": lora_init, "teacher": teacher,
                    "student_prediction_type": preds[i], "teacher_prediction_type": teacher_pred}
            out.append(Stage(st.name, i, dirs[i] if len(specs) > 1 else Path(run_dir), info=info,
                             trainer={"max_steps": st.max_steps, "validation_steps": [st.student_steps]}))
        return out

    # -- sampling, export ----------------------------------------------------------------------------------
    def sampler(self) -> SamplerSpec:
        """Euler on trailing timesteps at the stage's step count, no CFG at inference (paper Table 1); an x0
        student (the 1-step stage) predicts `sample`."""
        return SamplerSpec("euler", (self.stage.student_steps,), 1.0, prediction_type=self.student_pred)

    @torch.no_grad()
    def sample(self, cond: UNetCond, noise: Tensor, num_steps: int, seeds: list[int]) -> Tensor:
        unet = self.student_raw
        was_training = unet.training
        unet.eval()
        try:  # the Euler state in fp32 around the student's weight dtype
            with self.lora_fused(unet):
                return self.sampler().sample(Fp32Io(unet), noise.float(), cond, self.schedule, num_steps, seeds)
        finally:
            unet.train(was_training)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from distill.export import export_student

        st, own = self.stage, self.info
        info = {"method": "pad" + ("-lora" if st.lora else ""), "teacher": self.cfg.model.pretrained,
                "stage": st.name, "stage_teacher": own["teacher"] or self.cfg.model.pretrained,
                "lora_base": own["student_init"] or self.cfg.model.pretrained, "arch": self.comps.arch}
        lora_base = stored_fp32_state(self.student_raw, self.comps, own["student_init"]) if st.lora else None
        export_student(self.student_raw, Path(out_dir), lora=st.lora, dtype=dtype, info=info,
                       sampler=self.sampler(), base_path=self.comps.path, lora_base=lora_base)
