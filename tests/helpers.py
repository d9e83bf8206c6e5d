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
