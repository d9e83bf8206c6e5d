"""Multi-process training on CPU: 2 processes x B/2 train like 1 process x B, ranks never share a sample, and
DeepSpeed ZeRO-2 and ZeRO-3 runs (gloo) train like DDP, checkpoint, resume and export.

The runs go through `accelerate launch` of this very file (see `_probe` at the bottom): it composes the real Hydra
config and calls `distill.run`, recording which samples each rank's trainer received at each step.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SELF = str(Path(__file__).resolve())
# 8 samples in 4 shards of 2, no shuffle buffer, one loader worker: with a global batch of 4 every epoch is 2 steps,
# and rank r of 2 reads shards order[r::2], so step s of a 2 x 2 run sees exactly the samples of step s of a 1 x 4
# run (the shard order is a function of (seed, epoch) only). Per-sample seeds make the noise, t and w per sample.
COMMON = ["+experiment=lcm_lora_tiny", "+debug=fast", "trainer.validation_prompts=[]", "trainer.export_at_end=false",
          "data.shuffle_buffer=0", "data.num_workers=0", "trainer.checkpoint_every_steps=100",
          "optim.scheduler=constant"]  # runs stopped by max_steps and resumed: a cosine LR would depend on max_steps
STEPS = 4  # two epochs


@pytest.fixture(scope="module")
def eq_shards(tmp_path_factory) -> str:
    from distill.data.synthetic import write_split

    root = tmp_path_factory.mktemp("eqdata")
    write_split(root, "train", n=8, seed=0, samples_per_shard=2)
    return str(root / "{00000..00003}.tar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, overrides: list[str], procs: int, extra: list[str] | None = None,
           env: dict | None = None) -> str:
    """Train through `accelerate launch` (procs > 1: 2 CPU processes over gloo) and record the samples seen."""
    env = {"DISTILL_PROBE_OUT": str(run_dir / "seen"), "OMP_NUM_THREADS": "1", **(env or {})}
    if procs > 1 and not extra:
        env["ACCELERATE_USE_CPU"] = "1"
    head = [ACCELERATE, "launch", "--num_processes", str(procs), "--num_machines", "1",
            "--main_process_port", str(free_port()), *(extra or [])]
    if procs > 1 and not extra:
        head.insert(2, "--multi_gpu")  # with ACCELERATE_USE_CPU=1: DDP over gloo (`--cpu` would run one process)
    proc = run_cli([*head, SELF, f"output_dir={run_dir}", *overrides], env=env, timeout=900)
    return proc.stdout + proc.stderr


def seen(run_dir: Path) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: [url#key, ...]}} as recorded by the probe."""
    out: dict[int, dict[int, list[str]]] = {}
    for f in sorted((run_dir / "seen").glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(rank, {})[row["step"]] = row["samples"]
    return out


def lora_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    sd = load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))
    return {k: v.float() for k, v in sd.items() if "lora" in k}


def deepspeed_resumed_and_ddp(tmp_path: Path, base: list[str], zero: int) -> tuple[Path, Path]:
    """A DeepSpeed ZeRO-`zero` run (gloo, 2 ranks) of 2 steps resumed to 3 with export and a validation grid, and a
    DDP run of the same 3 steps: (DeepSpeed run folder, DDP run folder)."""
    ds = ["--config_file", str(ROOT / f"launch/accelerate/deepspeed_zero{zero}.yaml"), "--num_processes", "2"]
    env = {"ACCELERATE_USE_CPU": "false"}
    run, ddp = tmp_path / f"zero{zero}", tmp_path / "ddp"
    launch(run, [*base, "trainer.deepspeed_gloo=true", "trainer.max_steps=2"], procs=2, extra=ds, env=env)
    log = launch(run, [*base, "trainer.deepspeed_gloo=true", "trainer.max_steps=3", "resume=latest",
                       "trainer.export_at_end=true", "trainer.validation_prompts=[a red circle on a black background]"],
                 procs=2, extra=ds, env=env)
    assert "at step 2" in log, log[-3000:]
    launch(ddp, [*base, "trainer.max_steps=3"], procs=2)
    return run, ddp


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one_and_never_share_samples(eq_shards, tmp_path):
    # Adam normalises each element's step: an element whose gradient is rounding noise (|g| ~ 1e-9, sign set by the
    # all-reduce order) still moves a full +-lr at eps=1e-8. Measured at eps=1e-8: gradients agree to 5.5e-5
    # (relative L2) yet single LoRA-B elements differ by 2 lr after one step. eps=1e-3 makes small-gradient steps
    # proportional to the gradient, so the weights compare like the gradients do.
    data = [f"data.shards='{eq_shards}'", f"trainer.max_steps={STEPS}", "optim.eps=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(one, [*COMMON, *data, "data.batch_size=4"], procs=1)
    launch(two, [*COMMON, *data, "data.batch_size=2"], procs=2)

    s1, s2 = seen(one), seen(two)
    assert sorted(s2) == [0, 1], "expected two ranks"
    assert sorted(s1[0]) == sorted(s2[0]) == sorted(s2[1]) == list(range(STEPS))
    for epoch_steps in ([0, 1], [2, 3]):
        per_rank = [[x for s in epoch_steps for x in s2[r][s]] for r in (0, 1)]
        assert not set(per_rank[0]) & set(per_rank[1]), f"a sample was read by both ranks in steps {epoch_steps}"
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything)) == 8, "an epoch should read each of the 8 samples once"
    for s in range(STEPS):  # the premise of the weight comparison: the same global batch at every step
        assert sorted(s2[0][s] + s2[1][s]) == sorted(s1[0][s])

    w1, w2 = lora_weights(one, STEPS), lora_weights(two, STEPS)
    diff = max_diff(w1, w2)
    moved = max(v.abs().max().item() for k, v in w1.items() if "lora_B" in k)  # LoRA B starts at zero
    # Measured (4 AdamW steps, lr 3e-4, eps 1e-3): max |w_1proc - w_2proc| = 7.5e-7 while LoRA-B moved 1.1e-3.
    assert diff < 2e-5, f"1 vs 2 processes differ by {diff:.3g} (LoRA-B moved {moved:.3g})"
    assert moved > 50 * diff


@pytest.mark.slow
def test_deepspeed_zero2_trains_checkpoints_resumes_and_exports(eq_shards, tmp_path):
    pytest.importorskip("deepspeed")
    ds = ["--config_file", str(ROOT / "launch/accelerate/deepspeed_zero2.yaml"), "--num_processes", "2"]
    base = [*COMMON, f"data.shards='{eq_shards}'", "data.batch_size=2", "trainer.deepspeed_gloo=true",
            "trainer.checkpoint_every_steps=1"]
    run = tmp_path / "ds"
    # DeepSpeed on CPU: gloo backend (trainer.deepspeed_gloo), and no ACCELERATE_USE_CPU (it would bypass DeepSpeed)
    env = {"ACCELERATE_USE_CPU": "false"}
    launch(run, [*base, "trainer.max_steps=2"], procs=2, extra=ds, env=env)
    step2 = run / "checkpoints" / "step_2"
    assert (step2 / "pytorch_model").is_dir(), "DeepSpeed engine shards missing"
    assert (step2 / "model.safetensors").exists(), "consolidated weights missing (checkpoint.py writes them)"

    log = launch(run, [*base, "trainer.max_steps=3", "resume=latest"], procs=2, extra=ds, env=env)
    assert "at step 2" in log, log[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]

    # The resumed DeepSpeed run equals an uninterrupted DDP run of the same 3 steps.
    ddp = tmp_path / "ddp"
    launch(ddp, [*COMMON, f"data.shards='{eq_shards}'", "data.batch_size=2", "trainer.max_steps=3"], procs=2)
    diff = max_diff(lora_weights(run, 3), lora_weights(ddp, 3))
    assert diff < 1e-5, f"DeepSpeed (resumed) vs DDP after 3 steps: {diff:.3g}"  # measured: 0.0

    out = tmp_path / "export"
    run_cli([sys.executable, "-m", "distill.export", "--run", str(run), "--out", str(out)])
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(torch.isfinite(v.float()).all() for v in lora.values())
    assert json.loads((out / "export.json").read_text())


@pytest.mark.slow
def test_deepspeed_zero3_full_lcd_and_lora_train_like_ddp_resume_and_export(eq_shards, tmp_path):
    """ZeRO-3 partitions what trains; the frozen teacher, VAE and text encoders load whole on every rank; the EMA,
    the validation grid and the export read the gathered weights. Full LCD (student + EMA) and LCD-LoRA."""
    pytest.importorskip("deepspeed")
    ds = ["--config_file", str(ROOT / "launch/accelerate/deepspeed_zero3.yaml"), "--num_processes", "2"]
    env = {"ACCELERATE_USE_CPU": "false"}
    full = [c if c != "+experiment=lcm_lora_tiny" else "+experiment=lcm_tiny" for c in COMMON]
    base = [*full, f"data.shards='{eq_shards}'", "data.batch_size=2", "optim.eps=1e-3"]
    z3, ddp = deepspeed_resumed_and_ddp(tmp_path, [*base, "trainer.checkpoint_every_steps=1"], zero=3)
    assert (z3 / "checkpoints/step_2/pytorch_model").is_dir(), "ZeRO-3 engine shards missing"

    def state(run: Path, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints/step_3" / name))

    a, b = state(z3, "model.safetensors"), state(ddp, "model.safetensors")
    assert a.keys() == b.keys() and all(v.numel() > 0 for v in a.values()), "gathered weights must be whole"
    assert max_diff(a, b) < 1e-5, f"ZeRO-3 (resumed) vs DDP student after 3 steps: {max_diff(a, b):.3g}"
    ea, eb = state(z3, "method_state.safetensors"), state(ddp, "method_state.safetensors")
    w = "ema.time_embedding.cond_proj.weight"  # zero at init: the EMA moved it from the gathered student
    assert ea[w].abs().max() > 0
    assert max_diff(ea, eb) < 1e-5, f"ZeRO-3 vs DDP EMA: {max_diff(ea, eb):.3g}"
    assert (z3 / "samples/step_000003.png").exists()
    fused = load_file(str(z3 / "export/unet.safetensors"))
    same = [k for k in fused if k in a]  # the export dtype (fp16) of the gathered student, exactly
    assert same and all(torch.equal(fused[k], a[k].to(fused[k].dtype)) for k in same)

    lora = tmp_path / "z3_lora"  # LoRA: the partitioned UNet is also the teacher (adapters disabled)
    lbase = [*COMMON, f"data.shards='{eq_shards}'", "data.batch_size=2", "optim.eps=1e-3", "trainer.max_steps=2"]
    launch(lora, [*lbase, "trainer.deepspeed_gloo=true", "trainer.export_at_end=true"], procs=2, extra=ds, env=env)
    lddp = tmp_path / "ddp_lora"
    launch(lddp, lbase, procs=2)
    diff = max_diff(lora_weights(lora, 2), lora_weights(lddp, 2))
    assert diff < 1e-5, f"ZeRO-3 vs DDP LoRA after 2 steps: {diff:.3g}"
    assert load_file(str(lora / "export/lora/pytorch_lora_weights.safetensors"))



@pytest.mark.slow
def test_deepspeed_skips_a_step_whose_loss_is_nan_on_one_rank_like_ddp(eq_shards, tmp_path):
    """Under DeepSpeed the engine steps inside backward, so the loss's finiteness is agreed by all ranks first: a NaN
    loss on rank 1 alone at step 2 skips that step on both ranks (nothing reaches the weights), as under DDP."""
    pytest.importorskip("deepspeed")
    ds = ["--config_file", str(ROOT / "launch/accelerate/deepspeed_zero2.yaml"), "--num_processes", "2"]
    base = [*COMMON, f"data.shards='{eq_shards}'", "data.batch_size=2", "trainer.max_steps=3"]
    fault = {"DISTILL_FAULT_NAN_LOSS": "2@1"}
    z2, ddp, clean = tmp_path / "z2", tmp_path / "ddp", tmp_path / "clean"
    launch(z2, [*base, "trainer.deepspeed_gloo=true"], procs=2, extra=ds, env={"ACCELERATE_USE_CPU": "false", **fault})
    launch(ddp, base, procs=2, env=fault)
    launch(clean, base, procs=2)
    rows = [json.loads(x) for x in (z2 / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_steps"] == 1 and rows[-1]["train/nonfinite_microbatches"] == 1
    a, b, c = lora_weights(z2, 3), lora_weights(ddp, 3), lora_weights(clean, 3)
    assert all(torch.isfinite(v).all() for v in a.values())
    assert max_diff(a, b) < 1e-7, f"DeepSpeed vs DDP with the same NaN step: {max_diff(a, b):.3g}"
    assert max_diff(b, c) > 1e-6, "the NaN step was skipped: two updates, not three"
    # With accumulation, a NaN in the last micro-batch of a step after a finite one: that micro-batch is dropped and
    # the engine steps on the gradient it already holds (counted; the step is not skipped).
    acc = tmp_path / "accum"
    launch(acc, [*base, "trainer.deepspeed_gloo=true", "trainer.gradient_accumulation_steps=2", "data.batch_size=1"],
           procs=2, extra=ds, env={"ACCELERATE_USE_CPU": "false", "DISTILL_FAULT_NAN_LOSS": "2@1/1"})
    last = json.loads((acc / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/nonfinite_microbatches"] == 1 and last["train/nonfinite_steps"] == 0
    d = lora_weights(acc, 3)
    assert all(torch.isfinite(v).all() for v in d.values()) and max_diff(d, c) > 1e-6

def _stage(**kw) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_pad_student_and_discriminator_train_like_ddp_resume_and_export(zero, eq_shards, tmp_path):
    """PAD under DeepSpeed: two engines (student with its optimizer, discriminator with its own), each stepped by
    the trainer; both models and both optimizers are checkpointed, a run resumes mid-stage, the export is written.
    ZeRO-2: a conditional LoRA stage (the partitioned UNet is also the teacher, adapters off); ZeRO-3: an
    unconditional full-UNet stage (the discriminator partitioned too, run frozen in the generator step).

    Tolerance: ZeRO-2 reduces almost in DDP's order (weights within 1e-7). ZeRO-3 reorders float sums, and Adam at
    eps=1e-8 turns round-off in small gradients into full +-lr steps; with eps at 1e-3 (updates proportional to
    gradients) the weights must match DDP's within 1e-5 and the discriminator head's update within 5%."""
    pytest.importorskip("deepspeed")
    stage = (_stage(name="s2", student_steps=2, teacher_steps_per_student_step=2, discriminator="conditional",
                    lora="true", max_steps=3, lr=1e-3) if zero == 2 else
             _stage(name="s2", student_steps=2, teacher_steps_per_student_step=2, discriminator="unconditional",
                    lora="false", max_steps=3))
    base = ["+experiment=lightning_tiny", "+debug=fast", "trainer.validation_prompts=[]", "trainer.export_at_end=false",
            "data.shuffle_buffer=0", "data.num_workers=0", "optim.scheduler=constant", "optim.eps=1e-3",
            "method.d_head_channels=8", f"data.shards='{eq_shards}'", "data.batch_size=2", f"method.stages=[{stage}]"]
    z, ddp = deepspeed_resumed_and_ddp(tmp_path, base, zero)

    def update(run: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights at step 3, their change from step 1), trained tensors only."""
        w1, w3 = (load_file(str(run / f"checkpoints/step_{s}" / name)) for s in (1, 3))
        keep = [k for k in w3 if zero == 3 or name != "model.safetensors" or "lora" in k]
        return {k: w3[k].float() for k in keep}, {k: w3[k].float() - w1[k].float() for k in keep}

    for name in ("model.safetensors", "model_1.safetensors"):  # student, discriminator
        (a, ua), (b, ub) = update(z, name), update(ddp, name)
        assert all(v.numel() > 0 and torch.isfinite(v).all() for v in a.values()), "gathered weights: whole, finite"
        assert max(v.abs().max() for v in ua.values()) > 0 and max(v.abs().max() for v in ub.values()) > 0, \
            f"{name} did not train"
        diff = max_diff(a, b)
        assert diff < (1e-7 if zero == 2 else 1e-5), f"ZeRO-{zero} (resumed) vs DDP {name} after 3 steps: {diff:.3g}"
        if name == "model_1.safetensors":
            head = [k for k in ua if k.startswith("head.")]
            err = sum(((ua[k] - ub[k]) ** 2).sum() for k in head).sqrt() / sum((ub[k] ** 2).sum() for k in head).sqrt()
            assert err < (1e-4 if zero == 2 else 0.05), f"discriminator head update vs DDP: relative error {err:.3g}"
    assert (z / "samples/step_000003.png").exists()
    info = json.loads((z / "export/export.json").read_text())
    assert info["method"] == ("pad-lora" if zero == 2 else "pad") and info["steps"] == [2]


@pytest.mark.slow
def test_deepspeed_zero3_dmd2_three_unets_train_like_ddp_resume_and_export(eq_shards, tmp_path):
    """DMD2 under ZeRO-3 with all three UNets: the full generator and the fake score (with its GAN head) are two
    engines, each partitioned, each run through its raw module in the other's phase (no-grad generator samples;
    the frozen fake score in the generator step); the teacher stays whole. The generator steps at outer steps 0 and
    2 (every 2nd), the fake score at every step; a resume at step 2 and the export, against DDP. Tolerances as
    PAD's ZeRO-3 test (eps 1e-3)."""
    pytest.importorskip("deepspeed")
    base = ["+experiment=dmd2_tiny", "+debug=fast", "trainer.validation_prompts=[]", "trainer.export_at_end=false",
            "data.shuffle_buffer=0", "data.num_workers=0", "optim.scheduler=constant", "optim.eps=1e-3",
            "method.head_channels=8", "method.generator_every_n_steps=2", "method.regression.steps=0",
            f"data.shards='{eq_shards}'",
            "data.batch_size=2", "trainer.validation_steps=[4]"]
    z, ddp = deepspeed_resumed_and_ddp(tmp_path, base, 3)
    for name in ("model.safetensors", "model_1.safetensors"):  # generator, fake score + head
        w1, w3 = (load_file(str(z / f"checkpoints/step_{s}" / name)) for s in (1, 3))
        ref = load_file(str(ddp / "checkpoints/step_3" / name))
        assert w3.keys() == ref.keys() and all(v.numel() > 0 and torch.isfinite(v).all() for v in w3.values())
        assert max((w3[k].float() - w1[k].float()).abs().max() for k in w3) > 0, f"{name} did not train"
        diff = max_diff({k: v.float() for k, v in w3.items()}, {k: v.float() for k, v in ref.items()})
        assert diff < 1e-5, f"ZeRO-3 (resumed) vs DDP {name} after 3 steps: {diff:.3g}"
    assert (z / "samples/step_000003.png").exists()
    info = json.loads((z / "export/export.json").read_text())
    assert info["method"] == "dmd2" and info["sampler"]["timesteps"] == {"4": [999, 749, 499, 249], "1": [399]}


def _probe(argv: list[str]) -> None:
    """`accelerate launch tests/test_distributed.py KEY=VALUE ...`: a training run that records, per rank, which
    samples (shard url + key) the trainer received at each step. Not a test; the tests above launch it."""
    from hydra import compose, initialize_config_dir

    import distill
    from distill.config import register_configs
    from distill.trainer import Trainer

    out = Path(os.environ["DISTILL_PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    original = Trainer.to_batch

    def recording(self, raw: dict):
        urls = raw.get("url", [""] * len(raw["key"]))
        row = {"step": self.step, "samples": [f"{Path(u).name}#{k}" for u, k in zip(urls, raw["key"])]}
        with open(out / f"rank{self.acc.process_index}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return original(self, raw)

    Trainer.to_batch = recording
    if os.environ.get("DISTILL_FAULT_NAN_LOSS"):  # read by this test double, not by production code
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from helpers import install_nan_fault

        install_nan_fault(os.environ["DISTILL_FAULT_NAN_LOSS"])
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=argv)
    distill.run(cfg)


if __name__ == "__main__":
    _probe(sys.argv[1:])


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["lcm_lora_tiny", "lcm_tiny", "lightning_tiny"])
def test_deepspeed_bf16_calls_that_bypass_the_engine_get_inputs_of_its_dtype(experiment, eq_shards, tmp_path):
    """DeepSpeed bf16 casts the engines' modules to bf16 and Accelerate does not autocast them, so every call that
    bypasses an engine (LCD-LoRA's teacher and target, PAD's D-phase student and G-phase D, validation sampling)
    must cast its inputs. Before, the first of them raised 'mat1 and mat2 must have the same dtype'."""
    pytest.importorskip("deepspeed")
    ds = ["--config_file", str(ROOT / "launch/accelerate/deepspeed_zero2.yaml"), "--num_processes", "2"]
    run = tmp_path / "ds"
    extra = ["method.lora.rank=4"] if experiment == "lcm_lora_tiny" else []
    launch(run, [f"+experiment={experiment}", "+debug=fast", f"data.shards='{eq_shards}'", "data.batch_size=2",
                 "trainer.deepspeed_gloo=true", "trainer.mixed_precision=bf16", "model.frozen_dtype=bf16", *extra],
           procs=2, extra=ds, env={"ACCELERATE_USE_CPU": "false"})
    runs = sorted((run / "stages").iterdir()) if (run / "stages").exists() else [run]
    for d in runs:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        losses = [v for r in rows for k, v in r.items() if k.startswith("train/") and k.endswith("loss")]
        assert losses and all(math.isfinite(v) for v in losses) and rows[-1]["step"] == 2, d
        assert (d / "export" / "export.json").exists(), d
        assert list((d / "samples").glob("*.png")), d
