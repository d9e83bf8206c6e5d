"""One sampler spec: how a student (or teacher) is sampled, read by validation grids, the model card, `load_export`
and `bench/quality.py` alike.

A method says how its student samples with `Method.sampler()`; the export writes the spec into export.json (the
`sampler` entry, plus the flat keys `scheduler`, `steps`, `guidance_scale`, `eta`, `original_inference_steps`,
`prediction_type` that earlier exports carry and the card reads), and everything downstream rebuilds it with
`SamplerSpec.from_info`. Kinds:

  lcm    LCMScheduler: consistency boundary scalings, full re-noising between steps, skip grid of
         `original_inference_steps`
  tcd    TCDScheduler with eta = gamma (0: deterministic), same grid
  euler  EulerDiscreteScheduler on trailing timesteps (SDXL-Lightning); prediction_type "sample" for x0 students
  ddim   DDIMScheduler on trailing timesteps (eta 0): a segmented-consistency student steps edge to edge

`guidance_scale` is the pipeline's: a w-embedding UNet (time_cond_proj_dim set) takes w = guidance_scale - 1 as an
input; any other net runs classifier-free guidance when it is > 1 and an unconditional branch is given (a teacher,
or a student distilled without guidance); 1 means no guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

KINDS = ("lcm", "tcd", "euler", "ddim")
_SCHEDULER = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "euler": "EulerDiscreteScheduler",
              "ddim": "DDIMScheduler"}
CONSISTENCY_KINDS = ("lcm", "tcd")


@dataclass(frozen=True)
class SamplerSpec:
    kind: str
    steps: tuple[int, ...] = (4,)  # the step counts the student was trained for (the card names the middle one)
    guidance_scale: float = 1.0
    eta: float | None = None  # TCD's gamma
    original_inference_steps: int | None = None  # consistency kinds: the skip grid trained on (default 50)
    prediction_type: str | None = None  # None: the teacher's
    timesteps: dict[int, tuple[int, ...]] = field(default_factory=dict)  # explicit timesteps per step count
    etas: dict[int, float] = field(default_factory=dict)  # TCD's gamma per step count (Hyper-SD's unified LoRA);
    #   a step count not named samples with `eta`

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind={self.kind!r}: expected one of {KINDS}")
        if self.kind == "tcd" and not 0.0 <= float(self.eta or 0.0) <= 1.0:
            raise ValueError(f"sampler eta={self.eta}: TCD's gamma lies in [0, 1]")
        if self.kind != "tcd" and (self.eta is not None or self.etas):
            raise ValueError(f"sampler eta={self.eta} / etas={dict(self.etas)} is TCD's gamma; kind {self.kind!r} "
                             "has none")
        if any(not 0.0 <= float(v) <= 1.0 for v in self.etas.values()):
            raise ValueError(f"sampler etas={dict(self.etas)}: TCD's gamma lies in [0, 1]")
        if self.timesteps and self.kind not in CONSISTENCY_KINDS:
            raise ValueError(f"explicit timesteps are a consistency scheduler's argument, not {self.kind!r}'s")
        for n, ts in self.timesteps.items():
            if len(ts) != int(n) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"sampler timesteps for {n} steps must be {n} descending values, got {list(ts)}")
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "timesteps", {int(k): tuple(int(t) for t in v) for k, v in self.timesteps.items()})
        object.__setattr__(self, "etas", {int(k): float(v) for k, v in self.etas.items()})

    def eta_at(self, num_steps: int) -> float | None:
        """TCD's gamma for `num_steps` (None: not a TCD sampler)."""
        if self.kind != "tcd":
            return None
        return float(self.etas.get(int(num_steps), self.eta or 0.0))

    # -- names --------------------------------------------------------------------------------------------------
    @property
    def scheduler_class(self) -> str:
        """The diffusers scheduler class."""
        return _SCHEDULER[self.kind]

    @property
    def consistency(self) -> bool:
        return self.kind in CONSISTENCY_KINDS

    @property
    def predicts_x0(self) -> bool:
        return self.prediction_type == "sample"

    @property
    def grid(self) -> int:
        return int(self.original_inference_steps or 50)

    @property
    def scheduler_name(self) -> str:
        """export.json's `scheduler` (kept as earlier exports wrote it)."""
        if self.kind == "euler":
            return "EulerDiscreteScheduler-trailing" + ("-sample" if self.predicts_x0 else "")
        if self.kind == "ddim":
            return "DDIMScheduler-trailing"
        return self.scheduler_class

    # -- export.json ---------------------------------------------------------------------------------------------
    def to_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"scheduler": self.scheduler_name, "steps": list(self.steps),
                                "guidance_scale": float(self.guidance_scale)}
        if self.consistency:
            info["original_inference_steps"] = self.grid
        if self.eta is not None:
            info["eta"] = float(self.eta)
        if self.prediction_type is not None:
            info["prediction_type"] = self.prediction_type
        spec = asdict(self)
        spec["steps"] = list(self.steps)
        spec["timesteps"] = {str(k): list(v) for k, v in self.timesteps.items()}
        spec["etas"] = {str(k): v for k, v in self.etas.items()}
        if self.etas:
            info["etas"] = spec["etas"]
        info["sampler"] = spec
        return info

    @classmethod
    def from_info(cls, info: dict) -> SamplerSpec:
        """The spec of an export.json (or of a method's info dict): its `sampler` entry, or the flat keys."""
        if "sampler" in info:
            spec = dict(info["sampler"])
            spec["timesteps"] = {int(k): tuple(v) for k, v in (spec.get("timesteps") or {}).items()}
            spec["steps"] = tuple(spec.get("steps", (4,)))
            spec["etas"] = {int(k): float(v) for k, v in (spec.get("etas") or {}).items()}
            return cls(**spec)
        name = str(info.get("scheduler", ""))
        steps = tuple(info.get("steps", (4,)))
        gs = float(info.get("guidance_scale", 1.0))
        if name in ("LCMScheduler", "TCDScheduler"):
            tcd = name == "TCDScheduler"
            return cls("tcd" if tcd else "lcm", steps, gs, eta=float(info.get("eta", 0.0)) if tcd else None,
                       original_inference_steps=int(info.get("original_inference_steps", 50)))
        if name.startswith("EulerDiscreteScheduler-trailing"):
            pred = info.get("prediction_type") or ("sample" if name.endswith("-sample") else None)
            return cls("euler", steps, gs, prediction_type=pred)
        if name == "DDIMScheduler-trailing":
            return cls("ddim", steps, gs, prediction_type=info.get("prediction_type"))
        raise ValueError(f"scheduler={name!r} in the export's info: expected LCMScheduler, TCDScheduler, "
                         "EulerDiscreteScheduler-trailing[-sample] or DDIMScheduler-trailing (or a `sampler` entry)")

    # -- diffusers -----------------------------------------------------------------------------------------------
    def scheduler_kwargs(self) -> dict[str, Any]:
        """from_config overrides of the teacher's scheduler config."""
        if self.consistency:
            return {"original_inference_steps": self.grid}
        kw: dict[str, Any] = {"timestep_spacing": "trailing"}
        if self.kind == "ddim":  # distill never clips x0 (DDIMScheduler's own default clips to [-1, 1])
            kw["clip_sample"] = False
        if self.prediction_type is not None:
            kw["prediction_type"] = self.prediction_type
        return kw

    def scheduler(self, base_config: dict):
        """The diffusers scheduler, built from the teacher's scheduler config."""
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_config(base_config, **self.scheduler_kwargs())

    def pipeline_kwargs(self, num_steps: int) -> dict[str, Any]:
        """What a diffusers pipeline call takes to sample `num_steps` as distill does."""
        kw: dict[str, Any] = {"num_inference_steps": int(num_steps), "guidance_scale": float(self.guidance_scale)}
        if self.kind == "tcd":
            kw["eta"] = self.eta_at(num_steps)
        if int(num_steps) in self.timesteps:
            kw["timesteps"] = list(self.timesteps[int(num_steps)])
        return kw

    # -- distill's own sampler -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, unet, noise: Tensor, cond, schedule, num_steps: int, seeds: list[int], *,
               w_dim: int | None = None, uncond=None) -> Tensor:
        """Latents from `unet` (any callable with UNet2DConditionModel's signature; wrap half-precision nets in
        distill.diffusion.Fp32Io) as the diffusers pipeline with `scheduler()` samples them (the parity tests'
        contract). `w_dim`: the UNet's time_cond_proj_dim (a w-embedding student; None: read from the UNet's
        config, so a w-input student is never sampled without its w); `uncond`: the unconditional branch for
        classifier-free guidance (used when guidance_scale > 1 and there is no w input)."""
        from distill.diffusion import sample_lcm, sample_lightning, sample_teacher
        from distill.models.adapters import guidance_embedding

        w_dim = w_input_dim(unet) if w_dim is None else w_dim
        if w_dim is not None:
            w = torch.full((noise.shape[0],), self.guidance_scale - 1.0, device=noise.device)
            cond = replace(cond, timestep_cond=guidance_embedding(w, w_dim).to(cond.encoder_hidden_states))
            uncond = None
        if self.prediction_type is not None and self.prediction_type != schedule.prediction_type:
            schedule = _with_prediction_type(schedule, self.prediction_type)
        if self.consistency:
            return sample_lcm(unet, noise, cond, schedule, num_steps, seeds, original_inference_steps=self.grid,
                              timesteps=self.timesteps.get(int(num_steps)),
                              gamma=self.eta_at(num_steps))
        if self.kind == "euler" and (uncond is None or self.guidance_scale <= 1):
            return sample_lightning(unet, noise, cond, schedule, num_steps, schedule.prediction_type)
        return sample_teacher(unet, noise, cond, uncond, schedule, num_steps, solver=self.kind,
                              guidance_scale=self.guidance_scale, spacing="trailing")


def w_input_dim(unet) -> int | None:
    """The guidance-embedding width a UNet takes (its time_cond_proj_dim), through the wrappers samplers see
    (Fp32Io's .unet, DDP's .module); None for a UNet without a w input."""
    for _ in range(4):
        cfg = getattr(unet, "config", None)
        if cfg is not None:
            return getattr(cfg, "time_cond_proj_dim", None)
        inner = getattr(unet, "unet", None) or getattr(unet, "module", None)
        if inner is None:
            return None
        unet = inner
    return None


def _with_prediction_type(schedule, prediction_type: str):
    import copy

    out = copy.copy(schedule)
    out.prediction_type = prediction_type
    return out
