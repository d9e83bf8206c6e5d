"""In-process training runs for tests: compose the real Hydra config and call distill.run."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import distill
from distill.config import register_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def load_bench(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, CONFIGS.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train(overrides: list[str]) -> Path:
    return distill.run(compose_cfg(overrides))


def weights(run_dir: Path, step: int, name: str = "model.safetensors") -> dict:
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / name))


def install_nan_fault(spec: str) -> None:
    """Test double for fault injection (production code reads no fault variables): STEP[@RANK][/MICRO] makes the
    loss of that step (1-based) NaN on that rank (default 0), in every micro-batch of a phase or only micro-batch
    MICRO (0-based), by wrapping the built method's `losses`."""
    import torch

    from distill.trainer import Trainer

    spec, _, micro = spec.partition("/")
    step, _, rank = spec.partition("@")
    step, rank, micro = int(step), int(rank or 0), int(micro) if micro else None
    build = Trainer.build

    def faulty_build(self):
        build(self)
        losses, calls = self.method.losses, {}

        def faulty(batch, phase, s):
            out = losses(batch, phase, s)
            n = calls[(s, phase)] = calls.get((s, phase), -1) + 1
            if (s + 1, self.acc.process_index) == (step, rank) and micro in (None, n):
                out["loss"] = out["loss"] * torch.tensor(float("nan"))
            return out

        self.method.losses = faulty

    Trainer.build = faulty_build
