"""The real-size SDXL benches (bench/realsize.py, bench/sdxl_cpu.py, bench/gpu_check.py, bench/gpu.sh): the LoRA's
modules on the real UNet (meta device), the GPU script's code path on a tiny model on CPU, its no-CUDA exit, and
(slow) LCD-LoRA training steps on the real 2.6B-parameter UNet on CPU. Smoke tests of benches, not timed tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "bench"))

import realsize
from throughput import SDXL_UNET

from distill.config import LoraConfig

SDXL_LORA_LAYERS = 788  # PEFT's name rule on the real SDXL UNet with the LCM-LoRA target list (counted below)


def test_lora_targets_and_kohya_keys_on_the_real_sdxl_unet():
    """The real UNet on the meta device: the layers PEFT adapts are exactly the modules the target list names
    (PEFT's rule), and the kohya export has one key triple per layer, no two layers on one key. Rank 4 (the key set
    does not depend on the rank) so that only the LoRA tensors are materialised."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from distill.export_formats import lora_layers
    from distill.models.adapters import add_lora

    targets = LoraConfig().target_modules
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    names = realsize.peft_target_names(unet, targets)
    with init_empty_weights():
        add_lora(unet, 4, None, 0.0, targets)
    layers = lora_layers(unet)
    assert sorted(layers) == sorted(names) and len(names) == SDXL_LORA_LAYERS
    for layer in layers.values():
        layer.lora_A.to_empty(device="cpu")
        layer.lora_B.to_empty(device="cpu")
    k = realsize.kohya_check(unet)
    assert k["one_to_one"] and k["kohya_modules"] == SDXL_LORA_LAYERS and k["kohya_tensors"] == 3 * SDXL_LORA_LAYERS
    assert k["suffixes"] == [("alpha", "lora_down.weight", "lora_up.weight")]
    # every target of the list adapts something on the real UNet (none is dead configuration)
    assert all(any(n == t or n.endswith("." + t) for n in names) for t in targets)


@pytest.mark.slow  # 2.5 min of five experiments: the matrix runs each of them in `make test` already
def test_gpu_check_runs_on_a_tiny_model_on_cpu(tmp_path):
    """bench/gpu_check.py's whole code path (matmul peak, the bf16-vs-fp32 teacher step, the five experiments'
    steps, JSON, markdown, --results) on the tiny SDXL-architecture UNet at 64 px; PAD without checkpointing."""
    out, results = tmp_path / "gc.json", tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n")
    run_cli([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--steps", "1", "--warmup", "0",
             "--budget-s", "840", "--out", str(out), "--results", str(results)], timeout=900,
            env={"OMP_NUM_THREADS": "1"})  # one thread: beside the other xdist worker, 2 would wait on each other
    r = json.loads(out.read_text())
    assert r["tiny"] and "interrupted" not in r and "precision_error" not in r
    assert [p["t"] for p in r["precision"]] == [999, 499, 19]
    for p in r["precision"]:
        assert all(math.isfinite(p[k]) for k in ("mixed_max", "mixed_mean", "all_bf16_max", "all_bf16_mean"))
        assert p["step_mean_abs"] > 0 and p["mixed_max"] >= p["mixed_mean"] >= 0
    rows = {row["method"]: row for row in r["rows"]}
    assert set(rows) == set(realsize.EXPERIMENTS)
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["losses_finite"] and row["nonfinite_steps"] == 0 and row["trainable_tensors_changed"] > 0
        assert row["frozen_dtype"] == "bfloat16" and row["mixed_precision"] == "bf16" and row["latent"] == 32
        assert row["gradient_checkpointing"] == (not name.startswith("pad"))
        assert row["mfu"] > 0 and row["samples_per_s"] > 0 and row["peak_mem_gib"] > 0
    assert {"train/d_loss", "train/loss"} <= set(rows["pad_adversarial_lora"]["logs"])  # both phases ran
    assert rows["pad_adversarial_lora"]["stage"] == "s8_cond_lora"
    for name in ("dmd2_lora", "dmd2_full"):  # the generator and the fake score both stepped at step 0
        assert {"train/loss_dm", "train/fake_loss_denoise"} <= set(rows[name]["logs"]), name
    # the full variant trains two UNets (generator, fake score) and the head
    assert rows["dmd2_full"]["trained_params"] > 2 * rows["dmd2_full"]["unet_params"]
    assert rows["lcd_full"]["ema_gib"] > 0 and rows["lcd_lora"]["ema_gib"] == 0
    assert rows["lcd_lora"]["lora_layers"] > 0 and rows["lcd_full"]["lora_layers"] == 0
    md = results.read_text()
    assert md.startswith("# Measured results\n") and "## GPU check" in md and "| lcd_full | lcm_sdxl |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: bench/gpu.sh measures for real")
def test_gpu_sh_exits_0_without_cuda():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


@pytest.mark.slow
def test_lcd_lora_steps_on_the_real_sdxl_unet_on_cpu(tmp_path):
    """Two LCD-LoRA steps on the real SDXL UNet (2.6B parameters, bf16 frozen weights, gradient checkpointing) at
    256 px, batch 1: the step runs, its losses are finite, every LoRA B matrix moved, and the trained model's LoRA
    and kohya export are the real ones (9 GB of memory; about 5 minutes on one CPU thread)."""
    out = tmp_path / "sdxl_cpu.json"
    run_cli([sys.executable, str(ROOT / "bench" / "sdxl_cpu.py"), "--out", str(out), "--steps", "2"], timeout=3000)
    r = json.loads(out.read_text())["row"]
    assert r["unet_params"] == 2_567_463_684 and r["frozen_dtype"] == "bfloat16"
    assert r["gradient_checkpointing"] and r["mixed_precision"] == "bf16" and r["latent"] == 32
    assert len(r["step_s_all"]) == 2 and r["losses_finite"] and r["nonfinite_steps"] == 0
    assert r["lora_b"] == SDXL_LORA_LAYERS and r["lora_b_changed"] == r["lora_b"]
    assert r["lora_layers"] == r["lora_target_names"] == SDXL_LORA_LAYERS
    assert r["kohya"]["one_to_one"] and r["kohya"]["kohya_modules"] == SDXL_LORA_LAYERS
    assert r["trained_params"] == 196_751_360  # rank 64: A (64 x in) + B (out x 64) per layer
