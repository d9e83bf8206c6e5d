"""Checkpoints: complete or absent. Every rank writes into `checkpoints/.tmp-step_N` (Accelerate's save_state
covers models, optimizers, scalers and RNG; DeepSpeed needs every rank), the main process adds the trainer state
and the method's extra tensors, then renames the folder to `step_N` in one atomic rename. A folder without
`trainer_state.json` is never resumed from."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE = "trainer_state.json"
TENSORS = "method_state.safetensors"


class CheckpointError(RuntimeError):
    pass


class CheckpointManager:
    def __init__(self, root: Path, keep: int, accelerator: Accelerator):
        self.root, self.keep, self.acc = Path(root), keep, accelerator

    def before_commit(self, tmp: Path) -> None:
        """Called on every rank once the models are in `tmp` and before the trainer state marks it complete.
        A no-op; the fault tests' double (tests/fault_train.py) holds a checkpoint half-written here."""

    def check_writable(self, min_free_bytes: int = 0) -> None:
        """Fail before compute is spent when the run folder cannot take a checkpoint."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.root}: {e}") from None
        free = shutil.disk_usage(self.root).free
        if free < min_free_bytes:
            raise CheckpointError(f"only {free / 2**20:.0f} MiB free under {self.root}; a checkpoint needs about "
                                  f"{min_free_bytes / 2**20:.0f} MiB")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = re.fullmatch(r"step_(\d+)", p.name)
            if m and (p / STATE).exists():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def find(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        if resume == "latest":
            return self.latest()  # a fresh run with resume=latest simply starts (preempted-before-first-save)
        path = Path(resume)
        if not (path / STATE).exists():
            raise CheckpointError(f"resume={resume!r} is not a complete checkpoint (no {STATE} inside)")
        return path

    def save(self, step: int, state: dict, tensors: dict[str, Tensor]) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))  # all ranks: DeepSpeed shards are written by each
        self._save_deepspeed_weights(tmp)  # scale-out (issue 9)
        self.acc.wait_for_everyone()
        self.before_commit(tmp)
        if self.acc.is_main_process:
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
            (tmp / STATE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _save_deepspeed_weights(self, folder: Path) -> None:
        """scale-out (issue 9): under DeepSpeed, save_state writes engine shards (pytorch_model/) instead of
        model.safetensors; add the consolidated weights under the names a plain save_state uses, so that
        `python -m distill.export` reads any checkpoint alike (no zero_to_fp32 step). Every rank calls
        get_state_dict: ZeRO-3 gathers the shards (needs stage3_gather_16bit_weights_on_model_save)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return
        for i, model in enumerate(self.acc._models):
            state = self.acc.get_state_dict(model)
            if self.acc.is_main_process:
                name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / name),
                          metadata={"format": "pt"})

    def load(self, path: Path) -> tuple[dict, dict[str, Tensor]]:
        self.acc.load_state(str(path))
        state = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS)) if (path / TENSORS).exists() else {}
        return state, tensors
