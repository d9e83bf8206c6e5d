"""W&B sweeps (launch/sweeps/*.yaml): every parameter set expands, through wandb's own agent macros, into a
train.py command whose dotted keys Hydra accepts; a tiny sweep's trials run offline (logger=wandb) and log the
metric the sweep optimises under exactly its name. Hydra's own Optuna sweeper (configs/hydra/sweeper/) optimises
the value train.py returns."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from helpers import compose_cfg

SWEEPS = sorted((ROOT / "launch" / "sweeps").glob("*.yaml"))
FAST = ["+debug=fast", "trainer.validation_prompts=[]", "trainer.export_at_end=false",
        "trainer.checkpoint_every_steps=1000"]


def parameter_sets(sweep: dict, n: int = 2) -> list[dict]:
    """n corners of the search space: values cycled, distributions at their min then max."""
    sets = []
    for i in range(n):
        chosen = {}
        for key, spec in sweep["parameters"].items():
            if "value" in spec:
                chosen[key] = spec["value"]
            elif "values" in spec:
                chosen[key] = spec["values"][i % len(spec["values"])]
            else:
                chosen[key] = spec["min"] if i % 2 == 0 else spec["max"]
        sets.append(chosen)
    return sets


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command `wandb agent` runs for one trial (wandb_agent.Agent._command_run's macro expansion)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    variables.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command = []
    for chunk in create_sweep_command(sweep["command"]):
        chunk = str(chunk)
        command += variables.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def wandb_records(run_file: Path) -> dict[str, list[dict]]:
    """History rows and config of an offline run's `run-*.wandb` file (a LevelDB-style log of protobuf records:
    32 KiB blocks, 7-byte record headers (crc32, length, type: 1 full, 2 first, 3 middle, 4 last))."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = run_file.read_bytes(), 32768, 7  # after the ':W&B' + magic + version header
    assert data[:4] == b":W&B", run_file
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    out: dict[str, list[dict]] = {"history": [], "config": []}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            out["config"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return out


def overrides_of(command: list[str]) -> list[str]:
    return command[command.index("train.py") + 1:]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_parameter_sets_compose(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["name"].startswith("train/") and sweep["metric"]["goal"] in ("minimize", "maximize")
    assert "${args_no_hyphens}" in sweep["command"] and "logger=wandb" in sweep["command"]
    from distill.config import validate

    for params in parameter_sets(sweep):
        overrides = overrides_of(agent_command(sweep, params))
        assert [f"{k}={v}" for k, v in params.items()] == overrides[-len(params):]
        cfg = validate(compose_cfg(overrides))  # a wrong dotted key fails here, naming it
        for key, value in params.items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, f"{key}: swept {value!r}, config has {node!r}"


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow)])  # ~35 s each on 2 loaded cores
def test_tiny_sweep_trial_logs_the_swept_metric_offline(trial, tiny_data, tmp_path):
    pytest.importorskip("wandb")
    path = ROOT / "launch" / "sweeps" / "lcm_lora_tiny.yaml"
    sweep = yaml.safe_load(path.read_text())
    metric = sweep["metric"]["name"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    params = parameter_sets(sweep)[trial]
    run = tmp_path / "run"
    command = agent_command(sweep, params) + FAST + [f"output_dir={run}"]
    assert command[:3] == ["/usr/bin/env", "accelerate", "launch"]
    run_cli(command, env={**env, "WANDB_RUN_ID": f"trial{trial}"}, timeout=600)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run / 'wandb'}"
    logged = wandb_records(files[0])
    values = [row[metric] for row in logged["history"] if metric in row]
    assert values, f"{metric!r} not logged; keys: {sorted({k for r in logged['history'] for k in r})}"
    assert len(values) == 2 and all(math.isfinite(v) for v in values)  # +debug=fast: 2 steps, logged each
    config = {k: v for c in logged["config"] for k, v in c.items()}
    for key, value in params.items():  # the run's W&B config names the swept keys as the sweep does
        assert config[key] == pytest.approx(value), key
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(params["optim.lr"])
    assert saved["method"]["lora"]["rank"] == params["method.lora.rank"]


# -- Hydra's own sweepers: train.py returns optimize_metric -------------------------------------------------------
def test_optuna_sweep_runs_trials_and_names_the_best(tiny_data, tmp_path):
    """configs/hydra/sweeper/optuna_lcm_lora_tiny.yaml, 2 tiny trials in one multirun: each trial runs in its own
    folder (no output_dir given), returns its last train/loss, and the study's result file names the trial with the
    lowest as best, with the swept keys."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    run_cli([sys.executable, "train.py", "-m", "hydra/sweeper=optuna_lcm_lora_tiny", "+experiment=lcm_lora_tiny",
             *FAST, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], env={"OMP_NUM_THREADS": "1"})
    from distill.runner import final_metric

    losses = {}
    for trial in ("0", "1"):
        saved = yaml.safe_load((sweep / trial / "config.yaml").read_text())
        assert saved["output_dir"] == str(sweep / trial)
        losses[trial] = (final_metric(sweep / trial, "train/loss"), saved)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_loss, best_cfg = min(losses.values(), key=lambda v: v[0])
    assert result["best_value"] == pytest.approx(best_loss)
    assert set(result["best_params"]) == {"optim.lr", "method.lora.rank", "optim.warmup_steps"}
    assert result["best_params"]["method.lora.rank"] == best_cfg["method"]["lora"]["rank"]
    assert result["best_params"]["optim.lr"] == pytest.approx(best_cfg["optim"]["lr"])


def test_final_metric_reads_the_last_window_of_the_last_stage(tmp_path):
    from distill.runner import final_metric

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.0}\n')
    assert final_metric(tmp_path, "train/loss") == 2.0
    with pytest.raises(KeyError, match="optimize_metric='val/fd'"):
        final_metric(tmp_path, "val/fd")
    staged = tmp_path / "pad"
    for i, loss in enumerate((5.0, 4.0)):
        (staged / "stages" / f"0{i}_s").mkdir(parents=True)
        (staged / "stages" / f"0{i}_s" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": loss}))
    assert final_metric(staged, "train/loss") == 4.0
