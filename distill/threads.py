"""CPU threads per process, decided before torch loads (this module imports no torch).

`accelerate launch` without `--cpu` puts OMP_NUM_THREADS=1 into every process's environment when it is unset, and
OpenMP reads that variable once, when torch loads: `torch.set_num_threads` afterwards does not give back the same
speed (bench/RESULTS.md, "Threads"). train.py therefore sets OMP_NUM_THREADS to what `trainer.num_threads` will choose
before anything imports torch, and the trainer sets torch's threads to the same figure once the config is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def auto_threads() -> int:
    """Physical cores this process may use (its CPU affinity: a SLURM allocation, taskset) divided by the processes
    on this node, as Accelerate computes for `--cpu` launches."""
    import psutil

    logical = psutil.cpu_count() or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = max(1, physical * min(allowed, logical) // logical)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local))


def threads_from_argv(argv: Sequence[str]) -> int:
    """`trainer.num_threads=N` from Hydra command-line overrides (the last one wins); 0 when absent or not an int
    (the config check reports a malformed value later, naming the key)."""
    n = 0
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "trainer.num_threads":
            try:
                n = int(value)
            except ValueError:
                n = 0
    return n


def prime_omp_threads(argv: Sequence[str]) -> int:
    """Before torch loads: OMP_NUM_THREADS = `trainer.num_threads` from argv if > 0, else auto_threads(). Returns it.
    A value set in an experiment file (not on the command line) still reaches torch through the trainer."""
    n = threads_from_argv(argv)
    n = n if n > 0 else auto_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
