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
    max_steps: int = 1000  # optimizer steps (of a chain's stages, those that set no step count of their own)
    max_stage_steps: Optional[int] = None  # caps every stage's steps, a stage chain's included (debug presets set it
    #   to trainer.max_steps); None: each stage runs the steps it sets (method.stages[i].max_steps, a warm-up's steps)
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
    export_at_end: bool = True
    export_dtype: str = "fp16"  # fp16 | bf16 | fp32
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps
    progress_bar: bool = True
    allow_tf32: bool = True
    num_threads: int = 0  # torch intra-op threads per process; 0: the physical cores this process may use divided
    #   by the processes on the node (Accelerate's --cpu rule); train.py sets OMP_NUM_THREADS to it before torch loads
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
    # the student's passes WITHOUT gradient (a consistency target, backward simulation, the reward stage's first
    # steps, a discriminator's fakes, validation samples) run each adapted layer with the merged weight
    # W + scale B A, one call where PEFT runs three (distill.models.adapters.lora_fused; the base weights are never
    # written); false: PEFT's path
    fuse_no_grad: bool = True


@dataclass
class Config:
    output_dir: Optional[str] = None  # the run folder; None: outputs/<timestamp>, decided once for all ranks
    resume: Optional[str] = None  # latest | a checkpoint folder
    # a staged run's folder: start from its finished leading stages whose settings equal this run's (copied, not
    # retrained), e.g. a Hyper-SD score stage tried again on the TSCD and reward stages of an earlier run
    reuse_stages: Optional[str] = None
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
    from distill.methods import METHOD_CLASSES, known_methods

    if method.name not in known_methods():
        raise ConfigError(f"method.name={method.name!r} is unknown; known: {known_methods()}")
    cls = METHOD_CLASSES[method.name]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), raw)
        typed.method = OmegaConf.merge(OmegaConf.structured(cls.Config), method)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        if method is not None and key and raw.get(key.split(".")[0]) is None and key.split(".")[0] not in raw:
            key = "method." + key
        raise ConfigError(f"invalid config key '{key}': {e.msg if hasattr(e, 'msg') else e}") from None
    _check_combinations(typed)
    cls.check(typed)
    OmegaConf.set_readonly(typed, False)
    return typed


def _check_combinations(cfg: DictConfig) -> None:
    if cfg.trainer.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"trainer.mixed_precision={cfg.trainer.mixed_precision!r}: expected no | fp16 | bf16")
    if cfg.logger.name not in ("none", "wandb", "tensorboard"):
        raise ConfigError(f"logger.name={cfg.logger.name!r}: expected none | wandb | tensorboard")
    if cfg.data.kind not in ("images", "latents", "pairs", "prompts"):
        raise ConfigError(f"data.kind={cfg.data.kind!r}: expected images | latents | pairs | prompts")
    from distill.methods import METHOD_CLASSES

    if cfg.data.kind == "prompts" and METHOD_CLASSES[cfg.method.name].input_kind != "prompts":
        raise ConfigError(f"data.kind=prompts reads captions only, but method {cfg.method.name!r} trains on data "
                          "(images or latents): use data.kind=images | latents, or a data-free method (sim)")
    if cfg.optim.scheduler not in ("constant", "linear", "cosine"):
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler!r}: expected constant | linear | cosine")
    for key in ("max_steps", "checkpoint_every_steps", "log_every_steps", "gradient_accumulation_steps"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]} must be >= 1")
    if cfg.trainer.max_stage_steps is not None and cfg.trainer.max_stage_steps < 1:
        raise ConfigError(f"trainer.max_stage_steps={cfg.trainer.max_stage_steps} must be >= 1 (or null: no cap)")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    m = cfg.method
    if "lora" in m and not m.lora.enabled:
        defaults = LoraConfig()
        for key in ("rank", "alpha", "dropout", "target_modules", "fuse_no_grad"):
            if m.lora[key] != getattr(defaults, key):
                raise ConfigError(f"method.lora.{key} is set but method.lora.enabled=false: this {m.name} run trains "
                                  "the full UNet, not a LoRA (use method=lcd_lora, or method.lora.enabled=true)")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore as `schema/<group>/<name>`; each YAML option extends one
    (`defaults: [/schema/trainer/default@_here_, _self_]`), so every schema key is overridable from the
    command line, and a typo or wrong type fails while Hydra composes, naming the key."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in (("model", ModelConfig), ("optim", OptimConfig), ("trainer", TrainerConfig),
                        ("logger", LoggerConfig), ("data", DataConfig)):
        cs.store(group=f"schema/{group}", name="default", node=node)
    from distill.methods import METHOD_CLASSES, known_methods

    for name in known_methods():  # the one registry: each method's schema lives next to its code
        cs.store(group="schema/method", name=name, node=METHOD_CLASSES[name].Config)
