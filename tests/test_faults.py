"""Faults done for real: kill -9 mid-run and mid-checkpoint, non-finite losses, unwritable folders, secrets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from helpers import train, weights
from distill.trainer import NonFiniteError

FAST = ["+experiment=lcm_lora_tiny", "+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]",
        "data.batch_size=4", "method.lora.rank=4"]


def _start(out: Path, extra: list[str], doubles: list[str] | None = None) -> subprocess.Popen:
    """train.py, or tests/fault_train.py with test doubles (`--slow-checkpoint 30`) when `doubles` are given."""
    entry = ["tests/fault_train.py", *doubles, "--"] if doubles else ["train.py"]
    cmd = [sys.executable, *entry, *FAST, f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {proc.stderr.read()[-3000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow  # the checkpoint-write kill below and the resume tests of every method stay in `make test`
def test_kill_9_mid_training_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    steps = ["trainer.max_steps=6", "trainer.checkpoint_every_steps=2"]
    full = train([*FAST, *steps, f"output_dir={tmp_path}/full"])
    proc = _start(tmp_path / "killed", steps)
    _wait_for(tmp_path / "killed/checkpoints/step_2/trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (tmp_path / "killed/checkpoints").glob("step_*"))
    assert done and "step_6" not in done, done
    train([*FAST, *steps, f"output_dir={tmp_path}/killed", "resume=latest"])
    a, b = weights(full, 6), weights(tmp_path / "killed", 6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path):
    out = tmp_path / "run"
    steps = ["trainer.max_steps=6", "trainer.checkpoint_every_steps=2"]
    first = _start(out, steps + ["trainer.max_steps=2"])
    assert first.wait() == 0, first.stderr.read()[-3000:]
    before = weights(out, 2)
    # resume and die while step_4 is half-written (models saved, trainer state not yet)
    proc = _start(out, steps + ["resume=latest"], doubles=["--slow-checkpoint", "30"])
    _wait_for(out / "checkpoints/.tmp-step_4/model.safetensors", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints/step_4").exists(), "a half-written checkpoint must never look complete"
    after = weights(out, 2)
    for k in before:
        assert torch.equal(before[k], after[k])
    run = train([*FAST, *steps, f"output_dir={out}", "resume=latest"])
    state = json.loads((run / "checkpoints/step_6/trainer_state.json").read_text())
    assert state["step"] == 6
    assert not (out / "checkpoints/.tmp-step_4").exists(), "the next save of step 4 replaced the partial folder"


def test_nonfinite_steps_stop_the_run_naming_step_and_checkpoint(tiny_data, tmp_path):
    common = [*FAST, f"output_dir={tmp_path}/run", "trainer.checkpoint_every_steps=1", "trainer.max_nonfinite_steps=3"]
    train([*common, "trainer.max_steps=2"])
    # Resumed with an absurd learning rate, the first update turns the LoRA weights to inf: every later step is
    # non-finite, no checkpoint of the broken weights is written, and the error names the last good one.
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps, the last at step \d+") as err:
        train([*common, "trainer.max_steps=10", "resume=latest", "optim.lr=1e30", "optim.max_grad_norm=0"])
    named = Path(str(err.value).split("Last good checkpoint: ")[1].split(" ")[0])
    assert named.is_dir() and named.parent == tmp_path / "run/checkpoints"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(named / "model.safetensors")).values())
    last_step = int(str(err.value).split("the last at step ")[1].split(":")[0])
    assert int(named.name.split("_")[1]) < last_step - 2, "no checkpoint is written during the non-finite streak"
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_steps"] >= 2


def test_unwritable_output_dir_fails_before_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    from distill.runner import RunDirError

    t0 = time.time()
    with pytest.raises(RunDirError, match="not writable"):
        train([*FAST, f"output_dir={blocker}/run"])
    assert time.time() - t0 < 60


def test_secrets_never_written(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-secret-123456")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_abcdef")
    run = train([*FAST, f"output_dir={tmp_path}/run", "trainer.max_steps=1"])
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".txt", ".md", ".log"):
            text = path.read_text(errors="ignore")
            assert "sk-secret" not in text and "hf_secret" not in text, path
