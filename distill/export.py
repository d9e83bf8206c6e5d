"""Exports the ecosystem loads, and loading them back.

`export_student` writes, into one folder:
  lora/pytorch_lora_weights.safetensors  diffusers / PEFT LoRA with its adapter metadata (so alpha != rank loads
                                         at the trained strength; without it diffusers assumes alpha = rank)
  lora_kohya.safetensors                 `lora_unet_*` keys (diffusers module names) with the true `.alpha`
  lora_ldm.safetensors                   the same with the original (LDM) module names, as kohya's sd-scripts
                                         writes SDXL LoRAs: the file for ComfyUI and A1111
  unet/, unet.safetensors                the fused UNet: a diffusers folder and one file with diffusers key names
  checkpoint.safetensors                 the original single-file layout (UNet + VAE + text encoders of the
                                         teacher), for ComfyUI / A1111 / `from_single_file`
  README.md, export.json                 the model card (distill/card.py: diffusers, ComfyUI, A1111 settings)
                                         and the same facts as JSON

`load_export` builds a diffusers pipeline from an export with the scheduler its card names (benchmarks use it).
`python -m distill.export --run RUN_DIR` exports a training run's checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distill import export_formats as fmt
from distill.card import LDM_LORA, model_card
from distill.sampler import SamplerSpec

__all__ = ["LDM_LORA", "SamplerSpec", "export_run", "export_student", "load_export", "main", "model_card"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def export_student(unet: nn.Module, out_dir: Path, *, lora: bool, dtype: torch.dtype, info: dict,
                   base_path: str, lora_base: dict[str, torch.Tensor] | None = None,
                   sampler: SamplerSpec | None = None) -> None:
    """Write the student `unet` (a diffusers UNet2DConditionModel; with `lora=True` it carries the PEFT adapter
    "default") in every format above. `unet` is not modified. `sampler` says how the student samples (or `info`
    carries the flat keys of one, see SamplerSpec.from_info); it and `info` (method, teacher, arch, ...) go into
    the card and export.json. `base_path` is the teacher's diffusers folder, whose VAE and text encoders complete
    the single-file checkpoint. `lora_base`: the LoRA's base weights as stored, when the trained copy is half
    precision (see fmt.fused_state_dict)."""
    from distill.models.loader import detect_arch, resolve_model_path

    unet = _unwrap(unet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_path = resolve_model_path(str(base_path))
    info = dict(info)
    info.update((sampler or SamplerSpec.from_info(info)).to_info())
    info.setdefault("arch", detect_arch(base_path))
    files: list[str] = []
    if lora:
        info["lora"] = _export_lora(unet, out, dtype, info["arch"])
        files += ["lora/pytorch_lora_weights.safetensors", "lora_kohya.safetensors", LDM_LORA]
    else:  # re-exporting into a folder that held a LoRA export: no stale LoRA beside the new UNet
        import shutil

        shutil.rmtree(out / "lora", ignore_errors=True)
        for name in ("lora_kohya.safetensors", LDM_LORA):
            (out / name).unlink(missing_ok=True)
    state = _cast(fmt.fused_state_dict(unet, base=lora_base if lora else None), dtype)
    files += _export_fused(unet.config, state, out)
    files += _export_single_file(dict(unet.config), state, out, dtype, info, base_path)
    info["dtype"] = str(dtype).removeprefix("torch.")
    info["files"] = files
    (out / "export.json").write_text(json.dumps(info, indent=1, default=str))
    (out / "README.md").write_text(model_card(info, out.resolve()))


def _export_lora(unet: nn.Module, out: Path, dtype: torch.dtype, arch: str) -> dict:
    config = unet.peft_config["default"]
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    layers = fmt.lora_layers(unet)
    if not layers:
        raise ValueError("lora=True but the UNet carries no LoRA adapter 'default'")
    peft_sd = _cast(fmt.lora_peft_state_dict(unet), dtype)
    _pipeline_class(arch).save_lora_weights(str(out / "lora"), unet_lora_layers=peft_sd,
                                            unet_lora_adapter_metadata=metadata, safe_serialization=True)
    kohya = fmt.lora_kohya_state_dict(unet, dtype=dtype)
    meta = {"format": "pt", "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)}
    save_file(kohya, str(out / "lora_kohya.safetensors"), metadata=meta)
    save_file(fmt.lora_ldm_state_dict(unet, dict(unet.config), dtype=dtype), str(out / LDM_LORA), metadata=meta)
    return {"rank": int(config.r), "alpha": float(config.lora_alpha), "layers": len(layers),
            "target_modules": metadata.get("target_modules")}


def _export_fused(config, state: dict[str, torch.Tensor], out: Path) -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        fused = UNet2DConditionModel.from_config(config)
    fused.load_state_dict(state, strict=True, assign=True)
    fused.save_pretrained(str(out / "unet"), safe_serialization=True)
    save_file(state, str(out / "unet.safetensors"), metadata={"format": "pt"})
    return ["unet/", "unet.safetensors"]


def _export_single_file(config: dict, state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, info: dict,
                        base_path: str) -> list[str]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if "time_embedding.cond_proj.weight" in state:
        # The original layout has no guidance (w) input: bake the card's guidance scale into the time embedding.
        # diffusers pipelines pass w = guidance_scale - 1 (our LCM-form w) through the same sinusoidal embedding.
        from distill.models.adapters import guidance_embedding

        w = float(info["guidance_scale"]) - 1.0
        emb = guidance_embedding(torch.tensor([w]), int(config["time_cond_proj_dim"]))
        state = fmt.bake_guidance_embedding(state, emb)
        info["single_file_baked_w"] = w
    sd = fmt.unet_to_original(state, config)
    vae = AutoencoderKL.from_pretrained(base_path, subfolder="vae")
    sd.update(fmt.vae_to_original(vae.state_dict()))
    te = CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder")
    if info["arch"] == "sdxl":
        sd.update(fmt.clip_to_original(te.state_dict(), fmt.SDXL_CLIP_PREFIX))
        te2 = CLIPTextModelWithProjection.from_pretrained(base_path, subfolder="text_encoder_2")
        sd.update(fmt.openclip_to_original(te2.state_dict(), fmt.SDXL_OPENCLIP_PREFIX))
    else:
        sd.update(fmt.clip_to_original(te.state_dict(), fmt.SD15_CLIP_PREFIX))
    save_file(_cast(sd, dtype), str(out / "checkpoint.safetensors"), metadata={"format": "pt"})
    return ["checkpoint.safetensors"]


# -- loading back ----------------------------------------------------------------------------------------------
def read_export(export_dir: str | Path) -> tuple[dict, SamplerSpec]:
    """An export's export.json and its sampler spec."""
    info = json.loads((Path(export_dir) / "export.json").read_text())
    return info, SamplerSpec.from_info(info)


def load_export(export_dir: str | Path, base_path: str | None = None, *, torch_dtype: torch.dtype | None = None):
    """A diffusers pipeline of the teacher at `base_path` (default: the export's teacher) with the export's
    fused UNet and the scheduler of its sampler spec (sample it with `spec.pipeline_kwargs(steps)`)."""
    from diffusers import UNet2DConditionModel

    from distill.models.loader import resolve_model_path

    export_dir = Path(export_dir)
    info, spec = read_export(export_dir)
    base = resolve_model_path(str(base_path or info["teacher"]))
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    unet = UNet2DConditionModel.from_pretrained(str(export_dir / "unet"), **kw)
    cls = _pipeline_class(info["arch"])
    base_sched = json.loads((Path(base) / "scheduler" / "scheduler_config.json").read_text())
    return cls.from_pretrained(base, unet=unet, scheduler=spec.scheduler(base_sched), **kw)


# -- the CLI ---------------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path:
    from distill.checkpoint import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoints", keep=0, accelerator=None).latest()
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (checkpoints/step_N/trainer_state.json) under {run_dir}")
    return latest


def export_run(run_dir: str | Path, checkpoint: str | None = None, out: str | Path | None = None,
               dtype: str | None = None) -> Path:
    """Rebuild the run's method as training does, load a checkpoint into it and export it. Returns the folder."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, load_model

    from distill.checkpoint import STATE, TENSORS
    from distill.config import validate
    from distill.methods import METHOD_CLASSES, build_method
    from distill.models import load_components

    run = Path(run_dir)
    cfg = validate(OmegaConf.load(run / "config.yaml"))
    ckpt = latest_checkpoint(run) if checkpoint is None else _checkpoint_path(run, checkpoint)
    from distill.batch import needed_parts
    from distill.stages import Stage

    parts = needed_parts(METHOD_CLASSES[cfg.method.name].input_kind, "latents")  # what training, not data, needs
    comps = load_components(cfg.model.pretrained, vae=cfg.model.vae, parts=parts, revision=cfg.model.revision,
                            variant=cfg.model.variant)
    method = build_method(cfg, comps, torch.device("cpu"), stage=Stage.read(run))  # a stage folder: its stage.json
    for i, (name, module) in enumerate(method.modules.items()):
        path = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (module {name!r}); only safetensors checkpoints written "
                                    "by accelerate's save_state can be exported (DeepSpeed: run zero_to_fp32 first)")
        missing, unexpected = load_model(module, str(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit module {name!r}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    if (ckpt / TENSORS).exists():
        method.load_state_dict(load_file(str(ckpt / TENSORS)))
    method.load_meta_state(json.loads((ckpt / STATE).read_text()).get("method", {}))
    target = Path(out) if out else run / "export"
    method.export(target, DTYPES[dtype or cfg.trainer.export_dtype])
    return target


def _checkpoint_path(run: Path, checkpoint: str) -> Path:
    path = Path(checkpoint) if Path(checkpoint).is_dir() else run / "checkpoints" / checkpoint
    from distill.checkpoint import STATE

    if not (path / STATE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE} inside)")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="step_N (or a checkpoint folder); default: the latest complete one")
    p.add_argument("--out", help="output folder; default: RUN/export")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the run's trainer.export_dtype")
    args = p.parse_args(argv)
    out = export_run(args.run, args.checkpoint, args.out, args.dtype)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
