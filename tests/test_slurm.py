"""Against a real SLURM started by the test setup (../shared/slurm/local-cluster.sh, 2 emulated nodes on this host):
launch/slurm/train.sbatch trains to its export; a USR1 mid-run checkpoints, requeues and finishes from the
checkpoint; a 2-node job trains with 2 ranks; a Hydra `-m` sweep through the submitit launcher runs an array job.
All slow; the SLURM ones skip with the reason when SLURM cannot be started (not root, no apt, no script). The
first test needs no SLURM: USR1 on ONE of 2 ranks stops both at the same step with a complete checkpoint, and resume=latest
finishes the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

CLUSTER_SCRIPT = Path(os.environ.get("DISTILL_SLURM_SETUP", ROOT.parent / "shared" / "slurm" / "local-cluster.sh"))
SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")
TINY = ["+experiment=lcm_lora_tiny", "+debug=fast", "trainer.validation_prompts=[]"]


@pytest.fixture(scope="session")
def slurm() -> None:
    """Start (idempotently) a 2-node SLURM cluster on this host, or skip saying why it cannot be started."""
    if not CLUSTER_SCRIPT.exists():
        pytest.skip(f"SLURM setup script {CLUSTER_SCRIPT} not found (set DISTILL_SLURM_SETUP)")
    if os.geteuid() != 0:
        pytest.skip("starting the local SLURM cluster needs root (apt, munged, slurmd)")
    if not shutil.which("apt-get") and not shutil.which("sbatch"):
        pytest.skip("no apt-get to install SLURM (the setup script targets Debian 12)")
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT)], env={**os.environ, "NUM_NODES": "2"},
                              capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM setup did not finish within 10 minutes")
    if proc.returncode != 0:
        pytest.skip(f"SLURM could not be started: {(proc.stdout + proc.stderr)[-1500:]}")


@pytest.fixture
def job_env(tiny_data) -> dict:
    """What a job inherits (sbatch exports the submitting environment): this venv, one thread, offline."""
    return {"DISTILL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def sbatch(args: list[str], env: dict, log: Path, wait: bool = False, timeout: int = 600) -> int:
    cmd = ["sbatch", "--parsable", f"--output={log}", *(["--wait"] if wait else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
                          check=False)
    job = re.match(r"(\d+)", proc.stdout.strip())
    assert job, f"sbatch failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    if wait:
        assert proc.returncode == 0, f"job {job.group(1)} failed:\n{log.read_text()[-5000:] if log.exists() else ''}"
    return int(job.group(1))


def job_state(job: int) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job), "-o", "State"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def wait_for(predicate, timeout: float, what: str, log: Path | None = None, poll: float = 1.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


@pytest.mark.slow  # ~95 s: two 2-process CPU runs
def test_usr1_on_one_rank_checkpoints_all_and_resumes(tiny_data, tmp_path):
    run, steps = tmp_path / "run", 10
    args = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(29600 + os.getpid() % 300), "train.py", *TINY, f"output_dir={run}",
            f"trainer.max_steps={steps}", "trainer.checkpoint_every_steps=1000", "data.batch_size=1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(metric_steps(run)) >= 3 or launcher.poll() is not None, 300, "3 logged steps")
        ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True, check=False).stdout.split()
        rank1 = [p for p in ranks if _environ(int(p)).get("RANK") == "1"]
        assert len(ranks) == 2 and len(rank1) == 1, (ranks, rank1)
        os.kill(int(rank1[0]), signal.SIGUSR1)
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    saved = re.search(r"saved checkpoint step_(\d+), stopping", out)
    assert saved, out[-4000:]
    at = int(saved.group(1))
    assert 3 <= at < steps and metric_steps(run)[-1] == at  # rank 0 (not signalled) stopped at the same step
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{at}"]
    assert (run / "checkpoints" / f"step_{at}" / "random_states_1.pkl").exists()
    args[args.index("--main_process_port") + 1] = str(29600 + (os.getpid() + 1) % 300)
    resumed = run_cli([*args, "resume=latest"], env={"ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert f"at step {at}" in resumed.stdout + resumed.stderr
    assert metric_steps(run) == list(range(1, steps + 1))


@pytest.mark.slow
def test_sbatch_trains_to_export(slurm, job_env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    sbatch([SBATCH, *TINY, f"output_dir={run}"], job_env, log, wait=True)
    assert (run / "export" / "lora" / "pytorch_lora_weights.safetensors").exists(), log.read_text()[-3000:]
    assert (run / "checkpoints" / "step_2" / "trainer_state.json").exists()
    assert "training finished with exit code 0" in log.read_text()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_finishes(slurm, job_env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    job = sbatch([SBATCH, *TINY, f"output_dir={run}", f"trainer.max_steps={steps}",
                  "trainer.checkpoint_every_steps=1000"], job_env, log)
    wait_for(lambda: len(metric_steps(run)) >= 3, 300, "3 logged steps", log)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    restarted = wait_for(lambda: "restart_count=1" in (log.read_text() if log.exists() else ""), 180,
                         "the requeued job to start", log, poll=0.5)
    t_restart = time.time()
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED") and job_state(job), 600,
             "the requeued job to finish", log)
    text = log.read_text()
    assert restarted and job_state(job) == "COMPLETED", text[-4000:]
    saved = re.search(r"saved checkpoint step_(\d+), stopping", text)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert saved and resumed, text[-4000:]
    at = int(resumed.group(2))
    assert int(saved.group(1)) == at and 3 <= at < steps, f"preempted at {saved.group(1)}, resumed at {at}"
    assert text.index("USR1: checkpointing before requeue") < text.index("restart_count=1")
    assert metric_steps(run) == list(range(1, steps + 1)), "the restart should continue exactly after the checkpoint"
    assert (run / "export" / "export.json").exists()
    print(f"USR1 -> restarted job visible in the log after {t_restart - t_signal:.1f} s; resumed at step {at}")


@pytest.mark.slow
def test_two_node_job_trains_with_two_ranks(slurm, job_env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = {**job_env, "ACCELERATE_USE_CPU": "1", "PROCS_PER_NODE": "1"}
    job = sbatch(["--nodes=2", SBATCH, *TINY, f"output_dir={run}", "trainer.export_at_end=false",
                  "data.batch_size=1"], env, log, wait=True)
    assert "nodes=2" in log.read_text()
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job), "-o", "NodeList"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert nodes == "n[1-2]", nodes
    ckpt = run / "checkpoints" / "step_2"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


@pytest.mark.slow
def test_hydra_multirun_through_submitit_is_an_array_job(slurm, job_env, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {**job_env, "DISTILL_PYTHON": ""}
    proc = run_cli([sys.executable, "train.py", "-m", "hydra/launcher=slurm_cpu", *TINY, "optim.lr=1e-4,3e-4",
                    f"hydra.sweep.dir={sweep}", "output_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}",
                    "resume=latest"], env=env, timeout=900)
    runs = [sweep / "0", sweep / "1"]
    for r, lr in zip(runs, ("0.0001", "0.0003")):
        assert (r / "export" / "export.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"lr: {lr}" in (r / "config.yaml").read_text()
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].endswith("_0") and tasks[1].endswith("_1"), tasks
    assert len({t.split("_")[0] for t in tasks}) == 1, f"expected one array job, got {tasks}"
