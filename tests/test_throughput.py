"""bench/throughput.py's machinery on a tiny model. A smoke test of the benchmark, not a timed test: nothing
here compares a time against a threshold."""

import json
import math

import pytest
import torch
from helpers import load_bench


@pytest.fixture(scope="module")
def tp():
    return load_bench("throughput")


TINY = ["--steps", "1", "--warmup", "0", "--batch", "2", "--set", "model.pretrained=distill:random-sdxl"]


def test_a_sim_row_times_both_sides_of_its_step(tp, tmp_path):
    out = tmp_path / "tp.json"
    tp.main(["--out", str(out), *TINY, "--methods", "sim"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["method"] == "sim" and row["nonfinite_steps"] == 0 and row["samples_per_s"] > 0
    assert set(row["parts_ms"]) == {"student", "teacher", "target", "d", "backward", "clip", "optimizer", "callbacks"}
    assert row["sum_parts_ms"] == pytest.approx(sum(row["parts_ms"].values()))


@pytest.mark.slow  # every method (five builds); the SIM row above runs in `make test`
def test_every_method_gets_a_consistent_row(tp, tmp_path):
    out = tmp_path / "tp.json"
    tp.main(["--out", str(out), *TINY])
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(tp.METHODS)
    for r in rows.values():
        assert r["batch"] == 2 and r["latent"] == 16  # distill:random-sdxl: 32 px, 2-level VAE
        assert r["nonfinite_steps"] == 0
        assert all(v > 0 and math.isfinite(v) for v in [r["step_ms"], *r["parts_ms"].values()])
        assert r["sum_parts_ms"] == pytest.approx(sum(r["parts_ms"].values()))
        assert r["overhead_pct"] == pytest.approx(100 * (r["step_ms"] / r["sum_parts_ms"] - 1))
        assert r["samples_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        assert r["peak_mem_mib"] > 0 and r["gflop_per_step"] > 0 and 0 < r["mfu"]
    # the passes are the spans of the real step (distill.profiling), named inside the methods and the loop
    loop = {"backward", "clip", "optimizer", "callbacks"}
    assert set(rows["lcd_full"]["parts_ms"]) == {"teacher", "target", "student"} | loop
    assert set(rows["lcd_lora"]["parts_ms"]) == {"teacher", "target", "student"} | loop
    assert rows["lcd_lora"]["trainable_params"] < rows["lcd_full"]["trainable_params"]
    assert set(rows["pad_adversarial"]["parts_ms"]) == {"teacher", "student", "d"} | loop
    assert rows["pad_adversarial"]["stage"] == "s8_cond_lora"
    # one adversarial step runs the teacher n = 4 times, D and G: more FLOPs than an LCD step
    assert rows["pad_adversarial"]["gflop_per_step"] > rows["lcd_lora"]["gflop_per_step"]
    # SIM: every step trains both sides (generator through the teacher and the fake score, then the fake score)
    assert set(rows["sim"]["parts_ms"]) == {"student", "teacher", "target", "d"} | loop
    assert "d" in rows["dmd2"]["parts_ms"]  # the fake score steps every step
    assert set(rows["d2gan"]["parts_ms"]) == {"student", "target", "d"} | loop  # no teacher in the loop
    md = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in md for name in tp.METHODS) and "| lcd_full | teacher |" in md


def test_the_timed_step_is_the_trainers_and_it_trains(tp, tmp_path):
    cfg = tp.method_config("lcd_full", "tiny", 2, ["model.pretrained=distill:random-sdxl"])
    acc = tp.make_accelerator(cfg)
    comps = tp.load_components(cfg.model.pretrained, parts=("unet",))
    tr = tp.BenchTrainer(cfg, acc, tmp_path / "run", comps)
    try:
        data = tp.synthetic_batch(comps.unet.config, 2, comps.unet.config.sample_size, 32, acc.device)
        before = {n: p.detach().clone() for n, p in tr.method.student.named_parameters()}
        ema_before = [p.detach().clone() for p in tr.method.ema.model.parameters()]
        logs = tr.train_step([data])
        assert math.isfinite(logs["train/loss"]) and "train/grad_norm_g" in logs
        assert any(not torch.equal(p, before[n]) for n, p in tr.method.student.named_parameters())
        assert any(not torch.equal(a, b) for a, b in zip(ema_before, tr.method.ema.model.parameters()))
    finally:
        tr.close()


def test_spans_time_top_level_passes_only():
    from distill.profiling import SpanTimer, span

    with span("outside"):  # no timer installed: a profiler range only
        pass
    timer = SpanTimer()
    with timer.installed():
        with span("a"):
            with span("nested"):  # inside another span: not counted twice
                pass
        with span("a"):
            pass
        with span("b"):
            pass
    assert set(timer.seconds) == {"a", "b"} and all(v >= 0 for v in timer.seconds.values())
    with span("after"):
        pass
    assert "after" not in timer.seconds and "outside" not in timer.seconds


def test_median_times_takes_turns_and_skips_warmup(tp):
    calls = []
    times = tp.median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            torch.device("cpu"), steps=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_flops_are_counted_for_matmul_and_cpu_attention(tp):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert tp.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = torch.randn(1, 2, 8, 4)
    assert tp.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) > 0


def test_sdxl_size_is_skipped_without_cuda(tp, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: --size sdxl runs for real")
    out = tmp_path / "sdxl.json"
    tp.main(["--out", str(out), "--size", "sdxl"])
    result = json.loads(out.read_text())
    assert result["rows"] == [] and "CUDA" in result["skipped"]
    assert "Skipped" in out.with_suffix(".md").read_text()


def test_sdxl_unet_config_is_the_real_sdxl(tp):
    """Built on the meta device (no memory): the parameter count of SDXL base 1.0's UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tp.SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    cfg = tp.method_config("pad_adversarial", "sdxl", 4, [])
    assert cfg.data.resolution // 8 == tp.SDXL_UNET["sample_size"] and cfg.trainer.mixed_precision == "bf16"
    assert [s.name for s in cfg.method.stages] == ["s8_cond_lora"]  # one stage, built from the base model
