"""Training methods on one small interface (distill.methods.base.Method), in ONE registry: a method's class holds
its config schema (`Config`), its checks (`check`) and its stage plan (`plan`)."""

from __future__ import annotations

import importlib

# name -> "module:Class"; imported lazily so a method's dependencies load only when it is used
_REGISTRY = {
    "lcd": "distill.methods.lcd:LCD",
    "diffusion": "distill.methods.diffusion:Diffusion",
    "vae": "distill.methods.vae:VAETraining",
    "pad": "distill.methods.pad:PAD",
    "pcm": "distill.methods.pcm:PCM",
    "dmd2": "distill.methods.dmd2:DMD2",
    "kd": "distill.methods.kd:KD",
    "sim": "distill.methods.sim:SIM",
    "latent_lpips": "distill.methods.latent_lpips:LatentLPIPS",
    "d2gan": "distill.methods.d2gan:D2GAN",
    "refl": "distill.methods.refl:ReFL",
    "hyper_sd": "distill.methods.hyper_sd:HyperSD",
}


def register(name: str, target: str) -> None:
    """Add a method ("module:Class") to the registry, e.g. from a plugin or a test."""
    _REGISTRY[name] = target
    METHOD_CLASSES.pop(name, None)


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


class _Classes(dict):
    def __missing__(self, name: str):
        module, cls = _REGISTRY[name].split(":")
        value = getattr(importlib.import_module(module), cls)
        self[name] = value
        return value


METHOD_CLASSES = _Classes()


def build_method(cfg, comps, device, stage=None):
    return METHOD_CLASSES[cfg.method.name](cfg, comps, device, stage=stage)
