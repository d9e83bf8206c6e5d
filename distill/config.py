"""Typed configuration schemas. Hydra composes YAML; `validate` checks every section against these
dataclasses so that an unknown key or a wrong type fails at start and names the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.data.config import DataConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    pretrained: str = "distill:tiny-world"  # hub id, local diffusers folder, or distill:NAME
    vae: Optional[str] = None  # override the VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
    revision: Optional[str] = None
    variant: Optional[str] = None
    frozen_dtype: str = "auto"  # auto | fp32 | fp16 | bf16: dtype of frozen nets (teacher, VAE, text encoders)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    scheduler: str = "constant"  # constant | linear | cosine (each with linear warmup)
    warmup_steps: int = 0  # optimizer steps, independent of the process count
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_steps: int = 500
    checkpoints_keep: int = 3
    validate_every_steps: int = 0  # 0: only at the end
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # sampler step counts in the grid
    validation_seed: int = 0
    gradient_checkpointing: bool = False
    compile: bool = False
    export_at_end: bool = True
    export_dtype: str = "fp16"  # fp16 | bf16 | fp32
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps
    progress_bar: bool = True
    allow_tf32: bool = True
    num_threads: int = 0  # torch intra-op threads per process; 0: the physical cores this process may use divided
    #   by the processes on the node (Accelerate's --cpu rule; `accelerate launch` alone would leave OMP at 1)
    deepspeed_gloo: bool = False  # DeepSpeed on CPU needs the gloo backend


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard
    project: str = "distill"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    mode: Optional[str] = None  # wandb mode: online | offline | disabled (None: wandb's default / WANDB_MODE)
    tags: list[str] = field(default_factory=list)


@dataclass
class LoraConfig:
    enabled: bool = False  # train a LoRA student (LCM-LoRA) instead of the full UNet
    rank: int = 64
    alpha: Optional[float] = None  # None: alpha = rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"])


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
    ema_decay: float = 0.95


@dataclass
class DiffusionConfig:
    """Plain diffusion training (the tiny world's teacher): epsilon objective with caption dropout."""

    name: str = "diffusion"
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: Optional[float] = None
    from_scratch: bool = False  # re-initialise the UNet before training


@dataclass
class VAEConfig:
    """Autoencoder training (the tiny world's VAE): L1 + L2 reconstruction and a small KL."""

    name: str = "vae"
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    from_scratch: bool = False


@dataclass
class PADStage:
    """One stage of progressive adversarial distillation (SDXL-Lightning, arXiv 2402.13929, Sec. 3.6). The stage
    list is configuration; `distill.methods.pad.PAD.stages` resolves what each stage starts from."""

    name: str = "stage"  # also its folder: stages/<index>_<name>
    student_steps: int = 8  # steps the student takes after this stage
    teacher_steps_per_student_step: int = 4  # n: teacher moves per student move; the teacher is the last earlier
    #   stage with student_steps = n * this stage's (the skip-level teacher for 2 and 1 step), else the base model
    objective: str = "adversarial"  # mse | adversarial | x0 (1-step conversion: MSE against the frozen eps model)
    discriminator: str = "conditional"  # conditional (on x_t) | unconditional
    lora: bool = True  # train a LoRA (merged into the next stage's start) or the full UNet
    max_steps: int = 100  # optimizer steps of this stage (capped by trainer.max_steps)
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
    # Set per stage by PAD.stages (leave unset): which stage this run is and what it starts from.
    stage_name: str = ""
    stage_index: int = 0
    student_init: Optional[str] = None  # diffusers UNet folder the student starts from (None: model.pretrained)
    lora_init: Optional[str] = None  # LoRA folder (diffusers format) the LoRA continues from
    teacher: Optional[str] = None  # diffusers UNet folder of the teacher (None: model.pretrained)
    student_prediction_type: Optional[str] = None  # None: the base scheduler's prediction type
    teacher_prediction_type: Optional[str] = None


METHODS: dict[str, type] = {"lcd": LCDConfig, "diffusion": DiffusionConfig, "vae": VAEConfig, "pad": PADConfig}


@dataclass
class Config:
    output_dir: Optional[str] = None  # the run folder; None: outputs/<timestamp>, decided once for all ranks
    resume: Optional[str] = None  # latest | a checkpoint folder
    tags: list[str] = field(default_factory=list)
    optimize_metric: str = "train/loss"  # what train.py returns (Hydra sweepers): its last logged value
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Check a composed config against the schemas; return a typed, resolved copy (hydra node removed)."""
    raw = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    raw.pop("hydra", None)
    method = raw.pop("method", None)
    if method is None or "name" not in method:
        raise ConfigError("method: no method selected (use +experiment=NAME or method=lcd|lcd_lora|pad|diffusion|vae)")
    if method.name not in METHODS:
        raise ConfigError(f"method.name={method.name!r} is unknown; known: {sorted(METHODS)}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), raw)
        typed.method = OmegaConf.merge(OmegaConf.structured(METHODS[method.name]), method)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        if method is not None and key and raw.get(key.split(".")[0]) is None and key.split(".")[0] not in raw:
            key = "method." + key
        raise ConfigError(f"invalid config key '{key}': {e.msg if hasattr(e, 'msg') else e}") from None
    _check_combinations(typed)
    OmegaConf.set_readonly(typed, False)
    return typed


def _check_combinations(cfg: DictConfig) -> None:
    if cfg.trainer.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"trainer.mixed_precision={cfg.trainer.mixed_precision!r}: expected no | fp16 | bf16")
    if cfg.logger.name not in ("none", "wandb", "tensorboard"):
        raise ConfigError(f"logger.name={cfg.logger.name!r}: expected none | wandb | tensorboard")
    if cfg.data.kind not in ("images", "latents"):
        raise ConfigError(f"data.kind={cfg.data.kind!r}: expected images | latents")
    if cfg.optim.scheduler not in ("constant", "linear", "cosine"):
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler!r}: expected constant | linear | cosine")
    for key in ("max_steps", "checkpoint_every_steps", "log_every_steps", "gradient_accumulation_steps"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]} must be >= 1")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    m = cfg.method
    if "lora" in m and not m.lora.enabled:
        defaults = LoraConfig()
        for key in ("rank", "alpha", "dropout", "target_modules"):
            if m.lora[key] != getattr(defaults, key):
                raise ConfigError(f"method.lora.{key} is set but method.lora.enabled=false: this {m.name} run trains "
                                  "the full UNet, not a LoRA (use method=lcd_lora, or method.lora.enabled=true)")
    if m.name == "lcd":
        if m.w_min > m.w_max:
            raise ConfigError(f"method.w_min={m.w_min} > method.w_max={m.w_max}")
        if m.loss not in ("huber", "l2"):
            raise ConfigError(f"method.loss={m.loss!r}: expected huber | l2")
        if m.inference_w is not None and not m.lora.enabled and not m.w_min <= m.inference_w <= m.w_max:
            raise ConfigError(f"method.inference_w={m.inference_w} is outside the trained range "
                              f"[method.w_min, method.w_max] = [{m.w_min}, {m.w_max}]")
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
    if m.name == "pad":
        _check_pad(m)
    if m.name in ("vae",) and cfg.data.kind == "latents":
        raise ConfigError("data.kind=latents cannot train a VAE: it needs image shards")


def _check_pad(m: DictConfig) -> None:
    import re

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


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore as `schema/<group>/<name>`; each YAML option extends one
    (`defaults: [/schema/trainer/default@_here_, _self_]`), so every schema key is overridable from the
    command line, and a typo or wrong type fails while Hydra composes, naming the key."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in (("model", ModelConfig), ("optim", OptimConfig), ("trainer", TrainerConfig),
                        ("logger", LoggerConfig), ("data", DataConfig)):
        cs.store(group=f"schema/{group}", name="default", node=node)
    for name, node in METHODS.items():
        cs.store(group="schema/method", name=name, node=node)
