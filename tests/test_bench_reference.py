"""bench/reference.py's distill half runs end to end on a tiny shard copy (2 steps). Not a timed test: nothing here
compares a time against a threshold; the reference half needs the diffusers example script and is not run."""

import json
import tarfile

import pytest
from helpers import load_bench


@pytest.fixture(scope="module")
def ref():
    return load_bench("reference")


def test_shard_copy_carries_the_metadata_the_script_filters_on(ref, tiny_data, tmp_path):
    src = sorted((tiny_data / "tiny_world" / "train").glob("*.tar"))[:1]
    (out,) = ref.neutral_shards(src, tmp_path / "shards", max_samples=3)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        metas = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    assert len({n.split(".")[0] for n in names}) == 3 and len(metas) == 3
    for meta in metas:  # the script keeps width, height >= 700 and pwatermark <= 0.5; distill reads original_*
        assert meta["width"] >= 700 and meta["height"] >= 700 and meta["pwatermark"] <= 0.5
        assert meta["original_width"] == meta["width"] and "caption" in meta


def test_the_distill_half_runs_and_is_timed_from_its_step_stamps(ref, tiny_data, tmp_path):
    out = tmp_path / "ref.json"
    result = ref.main(["--out", str(out), "--variants", "distill_readme", "--rounds", "1", "--steps", "2",
                       "--warmup", "1", "--batch", "2", "--source", str(tiny_data / "tiny_world" / "train"),
                       "--source-shards", "2", "--shard-samples", "8", "--work", str(tmp_path / "work"),
                       "--model", "distill:random-sdxl"])
    (row,) = result["rows"]
    assert row["variant"] == "distill_readme" and row["median_samples_per_s"] > 0
    assert row["torch_threads"] >= 1  # parsed from the trainer's "torch threads per process" line
    assert result["runs"][0]["load_before"] and "distill_readme" in out.with_suffix(".md").read_text()


def test_the_bench_model_has_the_widths_the_script_hard_codes(ref):
    """The script's unconditional branch is torch.zeros(B, 77, 2048) and zeros(B, 1280)."""
    from distill.models import tiny

    tiny.PRESETS.setdefault("bench_reference", ref.BENCH_PRESET)
    unet = tiny.build_unet("sdxl", "bench_reference")
    p = ref.BENCH_PRESET
    assert unet.config.cross_attention_dim == 2048 and p["text_hidden_2"] == 1280
    assert tuple(unet.config.block_out_channels) == (32, 64) and len(p["vae_channels"]) == 2


def test_step_time_excludes_start_up_and_warmup(ref):
    stamps = {1: 10.0, 2: 11.0, 3: 13.0, 4: 15.0}
    assert ref.step_seconds(stamps, steps=4, warmup=2) == pytest.approx(2.0)
    with pytest.raises(RuntimeError, match="missing step stamps"):
        ref.step_seconds({1: 0.0}, steps=4, warmup=2)


def test_profile_step_labels_the_real_trainers_passes(tiny_data, tmp_path):
    ps = load_bench("profile_step")
    shards = str(tiny_data / "tiny_world" / "train" / "{00000..00003}.tar")
    result = ps.main(["--out", str(tmp_path / "p.json"), "--methods", "lcd_lora", "--batch", "2", "--resolution", "32",
                      "--steps", "1", "--warmup", "1", "--alone", "1", "--timed-steps", "2", "--rounds", "2",
                      "--shards", shards])
    (row,) = result["rows"]
    assert {"loader_next", "text_encode", "vae_encode", "distill/teacher", "distill/target", "distill/student",
            "distill/backward", "distill/optimizer"} <= set(row["passes_ms"])  # the methods' own spans
    assert row["step_ms"] > 0 and "distill/teacher" in (tmp_path / "p.md").read_text()
    real = row["real"]  # the same loop body timed without the profiler: spans inside train_step, data outside it
    assert {"teacher", "target", "student", "backward", "optimizer"} <= set(real["spans_ms"])
    assert real["spans_sum_ms"] <= real["train_step_ms"] * real["steps"] and real["to_batch_ms"] > 0
    assert real["train_step_ms"] < real["step_ms"] and "train_step_over_alone_parts" in real
    assert "Real step without the profiler" in (tmp_path / "p.md").read_text()
    # two paired rounds, real and alone alternating: one ratio each, the median of them reported
    assert len(row["rounds"]) == 2 and all(q["alone_sum_parts_ms"] > 0 for q in row["rounds"])
    assert row["median_train_step_over_alone_parts"] == pytest.approx(
        sum(q["ratio"] for q in row["rounds"]) / 2)
    assert "Paired rounds" in (tmp_path / "p.md").read_text()


def test_teacher_pass_bench_times_two_equal_teachers(tmp_path):
    """bench/teacher_pass.py: both teachers give the same output (the script asserts it) and each gets its rounds."""
    result = load_bench("teacher_pass").main(["--out", str(tmp_path / "tp.json"), "--model", str(tmp_path / "model"),
                                              "--batch", "1", "--side", "8", "--rounds", "2", "--reps", "1"])
    assert json.loads((tmp_path / "tp.json").read_text())["batch"] == 2
    assert all(len(v) == 2 and min(v) > 0 for v in result["ms"].values())
    assert set(result["median_ms"]) == {"adapters_disabled", "plain_copy"} and result["plain_over_disabled"] > 0


def test_fused_target_bench_switches_the_key_inside_the_real_step(tiny_data, tmp_path):
    """bench/fused_target.py alternates method.lora.fuse_no_grad in one Trainer: both sides time a target span, and
    the fused side's target runs no lora_A call (the switch reaches the method)."""
    ft = load_bench("fused_target")
    calls = {"fused": 0, "peft": 0}
    real = ft.ps.time_real_steps

    def counting(tr, it, steps):  # count lora_A calls per side while the bench's own loop runs
        side = "fused" if tr.cfg.method.lora.fuse_no_grad else "peft"
        hooks = [m.register_forward_hook(lambda *a, s=side: calls.__setitem__(s, calls[s] + 1))
                 for n, m in tr.method.student.named_modules() if n.endswith("lora_A.default")]
        try:
            return real(tr, it, steps)
        finally:
            for h in hooks:
                h.remove()

    ft.ps.time_real_steps = counting
    try:
        result = ft.main(["--out", str(tmp_path / "ft.json"), "--model", "distill:random-sdxl", "--rounds", "2",
                          "--steps", "1", "--warmup", "1", "--batch", "2", "--resolution", "32",
                          "--shards", str(tiny_data / "tiny_world" / "train" / "{00000..00001}.tar")])
    finally:
        ft.ps.time_real_steps = real
    assert len(result["per_round"]) == 2 and all(q["fused"]["spans_ms"]["target"] > 0 for q in result["per_round"])
    # per step PEFT's side calls lora_A in the target and the student pass, the fused side in the student's only
    assert calls["peft"] > calls["fused"] > 0
    assert "target" in (tmp_path / "ft.md").read_text()
