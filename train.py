"""Train a few-step student: `accelerate launch train.py +experiment=lcm_lora_tiny [key=value ...]`."""

import os
import sys

from distill.threads import prime_omp_threads

prime_omp_threads(sys.argv[1:])  # before torch loads: `accelerate launch` alone would leave OpenMP at one thread

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.runner import run_and_score

register_configs()

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Train; return `optimize_metric` (what `-m hydra/sweeper=...` sweeps such as Optuna optimise)."""
    return run_and_score(cfg)


if __name__ == "__main__":
    main()
