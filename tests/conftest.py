"""Shared fixtures: no network, tiny models built locally, tiny-world shards written by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are dominated by per-op overhead: one thread per test process is as fast, and with two pytest
# workers (make test runs -n 2) more threads only oversubscribe the cores (measured: up to 70x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # an idle OpenMP thread sleeps instead of spinning on a shared core


def _pin_xdist_worker() -> None:
    """Under `pytest -n K` each worker (and every process it starts: `accelerate launch`, the notebook, DDP pairs)
    keeps to its own share of the cores. Subprocess runs choose their threads from the cores they may use
    (trainer.num_threads=0), so without this a 2-thread run spins on the core of the other worker's test: measured
    9x slower for the Lightning matrix case (82 s alone, 758 s in the suite)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])


_pin_xdist_worker()

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json, the keys the schedulers read
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small tiny-world dataset in the layout configs/data/tiny_world.yaml expects (20 train shards)."""
    from distill.data.synthetic import write_prompts, write_split

    root = tmp_path_factory.mktemp("data")
    write_split(root / "tiny_world" / "train", "train", n=160, seed=0, samples_per_shard=8)
    write_split(root / "tiny_world" / "heldout", "heldout", n=32, seed=0, samples_per_shard=16)
    write_prompts(root / "tiny_world" / "train_prompts.txt", sorted((root / "tiny_world" / "train").glob("*.tar")))
    os.environ["DISTILL_DATA"] = str(root)
    return root


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command with the test environment; fail with its output on a non-zero exit."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


PY = sys.executable


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts with no Accelerate state: in-process runs with different mixed precision (the experiment
    matrix's bf16, a plain fp32 run) otherwise meet a singleton that refuses to change, or silently keep bf16."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
