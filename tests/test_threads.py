"""CPU threads are decided before torch loads: train.py primes OMP_NUM_THREADS from `trainer.num_threads` (0: the
physical cores this process may use / the processes on the node), which `accelerate launch` alone leaves at 1."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from distill.threads import threads_from_argv


def test_the_last_num_threads_override_wins_and_junk_reads_as_auto():
    assert threads_from_argv(["+experiment=x", "trainer.num_threads=3", "trainer.num_threads=5"]) == 5
    assert threads_from_argv(["++trainer.num_threads=2"]) == 2
    assert threads_from_argv(["trainer.num_threads=1,2"]) == 0  # a sweep: the trainer decides per job
    assert threads_from_argv(["trainer.max_steps=3"]) == 0


def _child(code: str, omp: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": omp}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_priming_before_torch_loads_starts_openmp_at_the_chosen_threads():
    # the child may use every core (an xdist worker is pinned to one); OpenMP caps at the cores it may use
    free = "import os; os.sched_setaffinity(0, range(os.cpu_count())); "
    code = (free + "import sys; from distill.threads import prime_omp_threads; loaded = 'torch' in sys.modules; "
            "prime_omp_threads(['trainer.num_threads={n}']); import torch; print(loaded, torch.get_num_threads())")
    # what `accelerate launch` hands the process (OMP_NUM_THREADS=1) and the other way round; no set_num_threads
    assert _child(code.format(n=2), omp="1") == "False 2"  # distill.threads loads no torch
    assert _child(code.format(n=1), omp="2") == "False 1"


def test_train_py_primes_the_threads_before_anything_imports_torch():
    code = ("import sys, runpy; sys.argv = ['train.py', '--help']\n"
            "import distill.threads as t\n"
            "real = t.prime_omp_threads\n"
            "def spy(argv):\n"
            "    print('primed', 'torch' in sys.modules, flush=True)\n"
            "    return real(argv)\n"
            "t.prime_omp_threads = spy\n"
            "try:\n"
            "    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n")
    assert _child(code, omp="1").splitlines()[0] == "primed False"
