"""Layer-level knowledge distillation into a smaller UNet (SSD-1B, Segmind-Vega: arXiv 2401.02677).

The student is the teacher with blocks removed by a plan (`method.student`, distill.models.student), its weights
copied from the teacher by name. One step, on real data (SSD-1B's script, the only public account):
  L = lambda_task ||eps_s - eps||^2 + lambda_out ||eps_s - eps_t||^2 + lambda_feat sum_k ||F_s,k - F_t,k||^2
(v instead of eps for a v-prediction teacher; every norm a mean over elements), with F_k the outputs of the
submodules that exist in both networks, tapped by forward hooks (distill.methods.feature_taps.FeatureTaps): block
outputs by default, every ResNet and attention with `feature_level: layer`. The teacher and the student see the
same x_t, t and conditioning (caption dropout applies to both, so the student also learns the unconditional
prediction that classifier-free guidance needs). Cost: one teacher forward, one student forward and backward.

Not a step-distillation method: the student samples as the teacher does (DDIM with CFG), and composes with every
step method afterwards (its `export/pipeline` is a diffusers folder a later run's `model.pretrained` can name).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from distill.callbacks import EMAUpdate
from distill.config import ConfigError
from distill.diffusion import Fp32Io, NoiseSchedule, add_noise, call_unet
from distill.methods.base import Batch, Method
from distill.methods.feature_taps import FeatureTaps
from distill.models.adapters import EMA
from distill.models.conditioning import drop_captions
from distill.models.student import MID_BLOCKS, PRESETS, StudentPlan, build_student, tap_names
from distill.optim import OptimizerSpec
from distill.profiling import span
from distill.sampler import SamplerSpec
from distill.stages import Stage, stage_folder


@dataclass
class KDStudentConfig:
    """The removal plan (distill.models.student): a preset, and/or explicit counts (null: the teacher's)."""

    preset: Optional[str] = None  # ssd1b | vega (SDXL's published layouts) | null
    down_transformer_layers: Optional[list[Any]] = None  # per down block: int, [per layer], or null
    up_transformer_layers: Optional[list[Any]] = None  # per up block: int, [per layer], or null; 0 drops attention
    mid_block: str = "keep"  # keep | resnet (one ResNet: SSD-1B / Vega) | none
    layers_per_block: Optional[Any] = None  # ResNets per down block, one int for all (up blocks one more); null:
    #   the teacher's. Per-block counts are refused: the single-file checkpoint has no layout for them


@dataclass
class KDStageConfig:
    """One stage of progressive removal: its plan applies to the previous stage's student (counts are clamped to
    it: a stage only removes), the teacher stays the original."""

    name: str = "stage"  # also its folder: stages/<index>_<name>
    student: KDStudentConfig = field(default_factory=KDStudentConfig)
    max_steps: int = 100  # optimizer steps of this stage (capped by trainer.max_stage_steps)


@dataclass
class KDConfig:
    name: str = "kd"
    student: KDStudentConfig = field(default_factory=KDStudentConfig)
    progressive: list[KDStageConfig] = field(default_factory=list)  # empty: one stage with `student`
    lambda_task: float = 1.0  # denoising loss on real latents
    lambda_out: float = 0.5  # MSE to the teacher's prediction
    lambda_feat: float = 0.5  # sum of MSEs between tapped features
    feature_level: str = "block"  # block | layer
    caption_dropout: float = 0.1  # zeroed text for both networks: the student keeps an unconditional branch
    ema_decay: Optional[float] = None  # per step (with warm-up): sample and export an EMA of the student; null: off
    ema_half_life_images: Optional[float] = None  # wins over ema_decay when set
    inference_steps: int = 25  # the student's (the teacher's) DDIM sampler
    guidance_scale: float = 5.0


class KD(Method):
    Config = KDConfig

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        _check_student(m.student, "method.student")
        for i, st in enumerate(m.progressive):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", st.name):
                raise ConfigError(f"method.progressive[{i}].name={st.name!r}: use letters, digits, _ . - (a folder)")
            if st.max_steps < 1:
                raise ConfigError(f"method.progressive[{i}].max_steps={st.max_steps} must be >= 1")
            _check_student(st.student, f"method.progressive[{i}].student")
        if m.feature_level not in ("block", "layer"):
            raise ConfigError(f"method.feature_level={m.feature_level!r}: expected block | layer")
        for key in ("lambda_task", "lambda_out", "lambda_feat"):
            if m[key] < 0:
                raise ConfigError(f"method.{key}={m[key]} must be >= 0")
        if not 0.0 <= m.caption_dropout < 1.0:
            raise ConfigError(f"method.caption_dropout={m.caption_dropout} must lie in [0, 1)")
        if m.inference_steps < 1:
            raise ConfigError(f"method.inference_steps={m.inference_steps} must be >= 1")

    @classmethod
    def plan(cls, cfg, run_dir: Path) -> list[Stage]:
        """One stage per `method.progressive` entry (remove, distil, remove more, distil again), each student built
        from the previous stage's export; a single stage without it."""
        specs = list(cfg.method.progressive)
        if not specs:
            return super().plan(cfg, run_dir)
        dirs = [stage_folder(run_dir, i, s.name) for i, s in enumerate(specs)]
        return [Stage(s.name, i, dirs[i] if len(specs) > 1 else Path(run_dir),
                      info={"student_init": str(dirs[i - 1] / "export" / "unet") if i else None},
                      trainer={"max_steps": s.max_steps}) for i, s in enumerate(specs)]

    def __init__(self, cfg, comps, device, stage=None):
        super().__init__(cfg, comps, device, stage)
        m = cfg.method
        self.schedule = NoiseSchedule.from_config(comps.scheduler_config)
        self.teacher = comps.unet.requires_grad_(False).eval()
        index = stage.index if stage is not None and m.progressive else 0
        init = stage.info.get("student_init") if stage is not None else None
        self.stage_name = m.progressive[index].name if m.progressive else None
        if init:  # a later stage: remove more from the previous stage's student
            from diffusers import UNet2DConditionModel

            src = UNet2DConditionModel.from_pretrained(init).float()
            source_config, state = dict(src.config), src.state_dict()
        else:  # from the fp32 weights as stored, not the frozen half-precision copy
            source_config = dict(self.teacher.config)
            state = (self.teacher.state_dict() if next(self.teacher.parameters()).dtype == torch.float32
                     else _stored_fp32_state(comps))
        self.student_init = init
        self.student_cfg = m.progressive[index].student if m.progressive else m.student
        self.plan = StudentPlan.from_config(self.student_cfg)
        self.student, self.copy_report = build_student(source_config, state, self.plan)
        del state
        self.student.to(device).train().requires_grad_(True)
        if cfg.trainer.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        names = tap_names(self.teacher, self.student, m.feature_level)
        self.teacher_taps, self.student_taps = FeatureTaps(self.teacher, names), FeatureTaps(self.student, names)
        self.ema = None
        if m.ema_decay is not None or m.ema_half_life_images is not None:
            self.ema = EMA(copy.deepcopy(self.student).requires_grad_(False).eval(), m.ema_decay or 0.999,
                           warmup=True)
        self.modules = {"student": self.student}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("g", [{"params": list(self.student.parameters())}])]

    def callbacks(self):
        if self.ema is None:
            return []
        return [EMAUpdate(self.ema, self.student, self.cfg.method.ema_half_life_images, warmup_steps=True)]

    def architecture(self) -> dict:
        """The student's layout against the teacher's: parameter counts and what was removed (export.json, card)."""
        n_s = sum(p.numel() for p in self.student.parameters())
        n_t = sum(p.numel() for p in self.teacher.parameters())
        c = self.student.config
        return {"student_parameters": n_s, "teacher_parameters": n_t, "ratio": round(n_s / n_t, 4),
                "preset": self.student_cfg.preset, "stage": self.stage_name, "student_init": self.student_init,
                "mid_block_type": c.mid_block_type,
                "layers_per_block": c.layers_per_block,
                "transformer_layers_per_block": c.transformer_layers_per_block,
                "reverse_transformer_layers_per_block": c.reverse_transformer_layers_per_block,
                "down_block_types": list(c.down_block_types), "up_block_types": list(c.up_block_types),
                "feature_taps": list(self.student_taps.names), **self.copy_report.summary()}

    # -- the objective ---------------------------------------------------------------------------------------
    def losses(self, batch: Batch, phase: str, step: int):
        m = self.cfg.method
        x0 = batch.latents
        eps = batch.randn("eps", tuple(x0.shape[1:]), x0.device)
        t = batch.randint("t", 0, self.schedule.num_train_timesteps, x0.device)
        x_t = add_noise(x0, eps, t, self.schedule)
        cond = drop_captions(batch.cond, batch.rand("drop", x0.device) < m.caption_dropout)
        with torch.no_grad(), span("teacher"), self.teacher_taps:
            teacher_out = call_unet(self.teacher, x_t, t, cond)
        teacher_feats = [f.float() for f in self.teacher_taps()]
        with span("student"), self.student_taps:
            pred = call_unet(self.modules["student"], x_t, t, cond)
        if self.schedule.prediction_type == "v_prediction":
            target = self.schedule.alpha(t, x0) * eps - self.schedule.sigma(t, x0) * x0
        else:
            target = eps
        task = F.mse_loss(pred, target.float())
        out = F.mse_loss(pred, teacher_out)
        feat = sum((F.mse_loss(s.float(), f) for s, f in zip(self.student_taps(), teacher_feats)),
                   pred.new_zeros(()))
        loss = m.lambda_task * task + m.lambda_out * out + m.lambda_feat * feat
        return {"loss": loss, "loss_task": task.detach(), "loss_out": out.detach(), "loss_feat": feat.detach()}

    def state_dict(self):
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict(state)

    # -- sampling and export -----------------------------------------------------------------------------
    def trained(self) -> torch.nn.Module:
        """The weights to sample and ship: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.student

    def sampler(self) -> SamplerSpec:
        """The teacher's sampler: DDIM on trailing timesteps with classifier-free guidance."""
        m = self.cfg.method
        return SamplerSpec("ddim", (m.inference_steps,), m.guidance_scale)

    @torch.no_grad()
    def sample(self, cond, noise, num_steps, seeds):
        net = self.trained()
        was = net.training
        net.eval()
        try:
            return self.sampler().sample(Fp32Io(net), noise, cond, self.schedule, num_steps, seeds,
                                         uncond=cond.zeros_like())
        finally:
            net.train(was)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        """export_student's files (the diffusers UNet folder, one file, the single-file checkpoint, the card),
        plus `pipeline/`: the teacher's folder with this UNet, for a later run's `model.pretrained`."""
        from distill.export import export_student

        out = Path(out_dir)
        arch = self.architecture()
        info = {"method": "kd", "teacher": self.cfg.model.pretrained, "arch": self.comps.arch,
                "architecture": arch}
        net = self.trained()
        export_student(net, out, lora=False, dtype=dtype, info=info, sampler=self.sampler(),
                       base_path=self.comps.path)
        pipe_dir = out / "pipeline"
        if pipe_dir.exists():
            shutil.rmtree(pipe_dir)
        shutil.copytree(self.comps.path, pipe_dir, ignore=shutil.ignore_patterns("unet", "*.lock", ".cache"))
        shutil.copytree(out / "unet", pipe_dir / "unet")  # the student as exported (the export dtype)
        export = json.loads((out / "export.json").read_text())
        export["files"].append("pipeline/")
        (out / "export.json").write_text(json.dumps(export, indent=1, default=str))


def _check_student(s, key: str) -> None:
    if s.preset is not None and s.preset not in PRESETS:
        raise ConfigError(f"{key}.preset={s.preset!r}: expected one of {sorted(PRESETS)} or null")
    if s.mid_block not in MID_BLOCKS:
        raise ConfigError(f"{key}.mid_block={s.mid_block!r}: expected keep | resnet | none")
    if s.layers_per_block is not None and (not isinstance(s.layers_per_block, int) or s.layers_per_block < 0):
        raise ConfigError(f"{key}.layers_per_block={s.layers_per_block}: one count >= 0 for every block (the original "
                          "single-file layout, export/checkpoint.safetensors, numbers its blocks with one "
                          "layers_per_block, so per-block counts have no single-file form)")


def _stored_fp32_state(comps) -> dict[str, torch.Tensor]:
    from distill.models.loader import load_fp32_unet

    return load_fp32_unet(comps).state_dict()
