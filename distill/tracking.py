"""Run logging: metrics.jsonl (rank 0, always), the chosen tracker (W&B or TensorBoard through Accelerate),
images to every tracker, and secrets kept out of everything written."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.I)


def redact(obj):
    """Drop values under secret-looking keys (W&B keys, hub tokens) before anything is written."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def written_config(cfg: DictConfig) -> dict:
    """A run's config as its config.yaml holds it: resolved, secrets redacted."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


class Tracker:
    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator: Accelerator):
        self.acc, self.run_dir, self.t0 = accelerator, run_dir, time.time()
        self.main = accelerator.is_main_process
        self.name = cfg.logger.name
        container = written_config(cfg)
        self.config = container  # the resolved, redacted run config (config.yaml; checkpoints keep a copy)
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if self.name != "none":
            init = {}
            if self.name == "wandb":
                init["wandb"] = {k: v for k, v in dict(name=cfg.logger.run_name, entity=cfg.logger.entity,
                                 tags=list(cfg.logger.tags) + list(cfg.tags), dir=str(run_dir),
                                 mode=cfg.logger.mode).items() if v}
            accelerator.init_trackers(cfg.logger.project, config=flat_config(container), init_kwargs=init)

    def log(self, metrics: dict, step: int) -> None:
        if self.main:
            row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
            self.jsonl.write(json.dumps(row) + "\n")
        if self.name != "none":
            self.acc.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Send an image to EVERY tracker (the public scripts sent it to the first only)."""
        if self.name == "none" or not self.main:
            return
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.acc.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({key: wandb.Image(img)}, step=step)
            elif tracker.name == "tensorboard":
                tracker.writer.add_image(key, img, step, dataformats="HWC")

    def print(self, msg: str) -> None:
        if self.main:
            print(f"[distill] {msg}", flush=True)

    def close(self) -> None:
        if self.main and hasattr(self, "jsonl"):
            self.jsonl.close()
        if self.name != "none":
            self.acc.end_training()


def flat_config(d: dict, prefix: str = "") -> dict:
    """Nested config -> {'a.b': leaf}; non-scalar leaves as strings (what trackers take)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def config_changes(old: dict | None, new: dict, ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """'key: old -> new' for every leaf setting that differs between a checkpoint's config and this run's."""
    if not old:
        return []
    a, b = flat_config(old), flat_config(new)
    return [f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k, "<unset>") != b.get(k, "<unset>")]


class Terms:
    """Logged values of one step, summed on device and averaged over micro-batches and repeated phases."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, key: str, value) -> None:
        value = value.detach().float() if torch.is_tensor(value) else value
        s = self.sums.setdefault(key, [0.0, 0])
        s[0], s[1] = s[0] + value, s[1] + 1

    def means(self) -> dict:
        return {k: s / n for k, (s, n) in self.sums.items()}
