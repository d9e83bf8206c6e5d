"""One loader for model components: a hub id or a local diffusers folder (SDXL and SD 1.5 layouts).

Names of the form `distill:NAME` point at models the project ships or builds offline:
`distill:tiny-world` (the embedded default's trained teacher, in distill/assets/tiny/teacher) and
`distill:random-sdxl` / `distill:random-sd15` (randomly initialised tiny pipelines, cached on first use).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CACHE = Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


TINY_VERSION = 2  # bump when distill/models/tiny.py changes what it builds (cache key)
# built-in random tiny pipelines: name -> (arch, preset)
RANDOM = {"random-sdxl": ("sdxl", "test"), "random-sd15": ("sd15", "test"), "random-world": ("sdxl", "world")}


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local diffusers folder nor reachable on the hub."""


@dataclass
class Components:
    """The pieces of a latent diffusion model that training needs. Missing pieces are None."""

    path: str
    arch: str  # "sdxl" | "sd15"
    scheduler_config: dict
    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer: object | None = None
    tokenizer_2: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def vae_scaling_factor(self) -> float:
        if self.vae is not None:
            return float(self.vae.config.scaling_factor)
        return float(self.extra.get("vae_scaling_factor", 0.13025))


def resolve_model_path(name: str, key: str = "model.pretrained") -> str:
    """Map a model value (`model.pretrained`, or a single model such as `model.vae` when `key` says so) to a local
    folder when it is one; hub ids are returned unchanged, but with `HF_HUB_OFFLINE=1` a hub id that is not in the
    local cache fails at once with guidance. Every error names `key`."""
    if name.startswith("distill:"):
        return str(_builtin(name[len("distill:"):]))
    pipeline = key == "model.pretrained"
    p = Path(name).expanduser()
    if p.is_dir():
        if pipeline and not (p / "model_index.json").exists() and not (p / "unet").is_dir():
            raise ModelNotFoundError(f"{key}={name!r} is a folder but not a diffusers model folder "
                                     "(no model_index.json or unet/ inside)")
        if not pipeline and not (p / "config.json").exists():
            raise ModelNotFoundError(f"{key}={name!r} is a folder but not a diffusers model (no config.json inside)")
        return str(p)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"{key}={name!r}: no such folder")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(name, local_files_only=offline,
                                 allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one actionable message
        how = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline else f"downloading failed ({type(e).__name__})")
        raise ModelNotFoundError(
            f"{key}={name!r} is not a local folder and {how}. Point {key} at a local diffusers folder (one "
            "written by save_pretrained, or a hub snapshot copied to this machine), e.g. "
            + (f"{key}=/data/models/stable-diffusion-xl-base-1.0" if pipeline else f"{key}=/data/models/sdxl-vae-fp16-fix")
            + (f", or {key}=null" if not pipeline else "")) from e


def _builtin(name: str) -> Path:
    if name == "tiny-world":
        path = ASSETS / "tiny" / "teacher"
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the tiny-world teacher is missing at {path}; rebuild it with `make tiny-world`")
        return path
    if name in RANDOM:
        from distill.models.tiny import save_tiny_pipeline

        path = CACHE / f"{name}-v{TINY_VERSION}"
        if not (path / "model_index.json").exists():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_tiny_pipeline(tmp, *RANDOM[name])
            try:
                os.replace(tmp, path)
            except OSError:  # another process won the race; theirs is identical
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return path
    raise ModelNotFoundError(f"unknown built-in model 'distill:{name}' (known: tiny-world, {', '.join(RANDOM)})")


def detect_arch(path: str) -> str:
    index = Path(path) / "model_index.json"
    if index.exists() and "text_encoder_2" in json.loads(index.read_text()):
        return "sdxl"
    unet_cfg = Path(path) / "unet" / "config.json"
    if unet_cfg.exists() and json.loads(unet_cfg.read_text()).get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd15"


def load_components(
    pretrained: str,
    *,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    revision: str | None = None,
    variant: str | None = None,
) -> Components:
    """Load the requested parts of a diffusers model (frozen, eval mode, on `device` in `dtype`).
    `vae` overrides the VAE (hub id or folder, e.g. an fp16-fixed SDXL VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model_path(pretrained)
    arch = detect_arch(path)
    sched_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise ModelNotFoundError(f"{pretrained!r} has no scheduler/scheduler_config.json")
    comps = Components(path=path, arch=arch, scheduler_config=json.loads(sched_file.read_text()),
                       extra={"revision": revision, "variant": variant})
    kw = {"revision": revision, "variant": variant}
    load = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
        "vae": lambda: (AutoencoderKL.from_pretrained(resolve_model_path(vae, "model.vae")) if vae
                        else AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
        "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
    }
    for part in parts:
        if arch == "sd15" and part.endswith("_2"):
            continue
        obj = load[part]()
        if isinstance(obj, torch.nn.Module):
            obj.requires_grad_(False).eval().to(device=device, dtype=dtype)
        setattr(comps, part, obj)
    if comps.vae is None:
        vae_cfg = Path(path) / "vae" / "config.json"
        if vae_cfg.exists():
            comps.extra["vae_scaling_factor"] = json.loads(vae_cfg.read_text()).get("scaling_factor", 0.13025)
    return comps


def stored_fp32_state(unet: torch.nn.Module, comps: Components, folder: str | None = None) -> dict | None:
    """The fp32 weights as stored of the base a LoRA was trained on (`folder`: a diffusers UNet folder; None: the
    model's own UNet), or None when `unet`'s base weights are fp32 already (then they are the stored ones)."""
    if all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" not in n):
        return None
    if folder is None:
        return load_fp32_unet(Components(path=comps.path, arch=comps.arch, scheduler_config={},
                                         extra=comps.extra)).state_dict()
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).float().state_dict()


def load_fp32_unet(comps: Components, device: str | torch.device = "cpu"):
    """The teacher's UNet in fp32 as stored, for a full student to start from: a copy of `comps.unet` when it is
    fp32 already, else read again from disk (a student built from the half-precision frozen copy would start
    from rounded weights, and "zero-init reproduces the teacher" would hold only against that copy)."""
    import copy

    from diffusers import UNet2DConditionModel

    if comps.unet is not None and next(comps.unet.parameters()).dtype == torch.float32:
        return copy.deepcopy(comps.unet)
    unet = UNet2DConditionModel.from_pretrained(comps.path, subfolder="unet", revision=comps.extra.get("revision"),
                                                variant=comps.extra.get("variant"))
    return unet.to(device=device, dtype=torch.float32)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(cfg, device: torch.device) -> torch.dtype:
    """Frozen nets (teacher, VAE, text encoders) run in half precision on GPU, fp32 on CPU."""
    if cfg.model.frozen_dtype != "auto":
        return _DTYPES[cfg.model.frozen_dtype]
    if device.type == "cuda" and cfg.trainer.mixed_precision in ("fp16", "bf16"):
        return _DTYPES[cfg.trainer.mixed_precision]
    return torch.float32


def load_unet(path: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A UNet folder (a stage's export/unet) in `dtype` on `device`."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path).to(device=device, dtype=dtype)
