"""distill: few-step distillation of latent diffusion models (LCM, LCM-LoRA, SDXL-Lightning)."""

__version__ = "0.1.0"


def run(cfg):
    """Train from a composed Hydra config (see train.py); returns the run folder."""
    from distill.runner import run as _run

    return _run(cfg)
