"""Training methods on one small interface (distill.methods.base.Method)."""

from __future__ import annotations

import importlib

# name -> "module:Class"; imported lazily so a method's dependencies load only when it is used
_REGISTRY = {
    "lcd": "distill.methods.lcd:LCD",
    "diffusion": "distill.methods.diffusion:Diffusion",
    "vae": "distill.methods.vae:VAETraining",
    "pad": "distill.methods.pad:PAD",
}


class _Classes(dict):
    def __missing__(self, name: str):
        module, cls = _REGISTRY[name].split(":")
        value = getattr(importlib.import_module(module), cls)
        self[name] = value
        return value


METHOD_CLASSES = _Classes()


def build_method(cfg, comps, device):
    return METHOD_CLASSES[cfg.method.name](cfg, comps, device)
