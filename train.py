"""Train a few-step student: `accelerate launch train.py +experiment=lcm_lora_tiny [key=value ...]`."""

import os

import hydra
from omegaconf import DictConfig

import distill
from distill.config import register_configs

register_configs()

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    distill.run(cfg)


if __name__ == "__main__":
    main()
