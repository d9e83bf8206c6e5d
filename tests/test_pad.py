"""Progressive adversarial distillation (SDXL-Lightning) through the real loop on tiny SDXL-architecture models."""

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg
from safetensors.torch import load_file

from distill.config import ConfigError, validate
from distill.diffusion import UNetCond
from distill.methods.discriminator import Discriminator
from distill.methods.pad import PAD, PADStage
from distill.runner import run as run_training
from distill.stages import stage_config

FAST = ["+experiment=lightning_tiny", "+debug=fast", "trainer.validation_prompts=[]", "data.batch_size=2"]
TWO = [  # 4-step MSE from the base (8 steps), then a 2-step conditional LoRA stage taught by the 4-step student
    {"name": "s4_mse", "student_steps": 4, "teacher_steps_per_student_step": 2, "objective": "mse", "lora": False,
     "max_steps": 1},
    {"name": "s2_cond_lora", "student_steps": 2, "teacher_steps_per_student_step": 2, "discriminator": "conditional",
     "lora": True, "max_steps": 2, "lr": 1e-3},
]


def _cfg(out: Path, stages: list[dict], *extra: str):
    cfg = compose_cfg([*FAST, f"output_dir={out}", *extra])
    cfg.method.stages = [PADStage(**s) for s in stages]
    return cfg


def _base_unet():
    from distill.models import load_components

    return load_components("distill:random-sdxl", parts=("unet",)).unet


def _cond(b: int, unet) -> UNetCond:
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    return UNetCond(encoder_hidden_states=torch.randn(b, 77, c.cross_attention_dim, generator=g),
                    text_embeds=torch.randn(b, pooled, generator=g), time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * b))


def _sample_export(export: Path, steps: int) -> torch.Tensor:
    """Sample an export with stock diffusers: its fused UNet in the base pipeline, Euler on trailing timesteps."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from distill.models import resolve_model_path

    info = json.loads((export / "export.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(str(export / "unet"), torch_dtype=torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model_path("distill:random-sdxl"), unet=unet)
    kw = {"prediction_type": "sample"} if info["prediction_type"] == "sample" else {}
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", **kw)
    out = pipe("a red circle", num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    return torch.from_numpy(out)


# -- the discriminator --------------------------------------------------------------------------------------
def test_discriminator_is_a_trainable_copy_of_the_encoder_with_one_logit_per_sample():
    unet = _base_unet()
    b, x = 3, torch.randn(3, 4, 16, 16)
    t, cond = torch.tensor([999, 499, 10]), _cond(3, unet)
    mid = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: mid.update(out=o))
    unet(x, t, **cond.kwargs())
    hook.remove()
    for conditional in (True, False):
        d = Discriminator(unet, latent_size=16, head_channels=16, conditional=conditional)
        # re-initialised from the teacher: every backbone tensor equals the UNet's, and is a separate copy
        own = unet.state_dict()
        for k, v in d.backbone.state_dict().items():
            assert torch.equal(v, own[k]), k
        assert d.backbone.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()
        assert all(p.requires_grad for p in d.parameters())
        # the backbone computes what the UNet computes up to its mid block (conditioning fed as in the UNet)
        torch.testing.assert_close(d.backbone(x, t, cond), mid["out"])
        x_s = torch.randn(2 * b, 4, 16, 16, requires_grad=True)
        logits = d(x_s, torch.cat([t, t]), cond, x, t) if conditional else d(x_s, torch.cat([t, t]), cond)
        assert logits.shape == (2 * b,)
        logits.sum().backward()
        assert x_s.grad.abs().sum() > 0 and d.backbone.conv_in.weight.grad.abs().sum() > 0
        # the logit depends on the candidate: a head whose last GroupNorm normalised single values (one channel per
        # group at 1x1) returned its bias for every input, the same logit for real and fake to 6 digits
        other = torch.randn_like(x_s)
        moved = d(other, torch.cat([t, t]), cond, x, t) if conditional else d(other, torch.cat([t, t]), cond)
        assert (moved - logits).abs().max() > 1e-2, "the discriminator ignores its input"
        assert x_s.grad.abs().max() > 1e-3
    assert isinstance(d.head[-1], torch.nn.Conv2d) and d.head[-1].out_channels == 1
    convs = [m for m in d.head if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs[:-1]] == [(4, 4)] * 3 and all(c.stride == (2, 2) for c in convs[:-1])


def test_head_group_norm_never_normalises_too_few_values():
    from distill.methods.discriminator import norm_groups

    assert norm_groups(1280, 1) == 32 and norm_groups(32, 4) == 32  # wide, or enough spatial values: 32 groups
    assert norm_groups(256, 1) == 16 and norm_groups(32, 1) == 2 and norm_groups(16, 1) == 1
    for width in (8, 16, 32, 64, 256, 1280):
        for side in (1, 2, 4, 8):
            g = norm_groups(width, side)
            assert width % g == 0 and ((width // g) * side * side >= 16 or g == 1)


# -- stage resolution and validation -------------------------------------------------------------------------
def test_stages_chain_students_teachers_and_loras(tmp_path):
    cfg = validate(compose_cfg(["method=pad", f"output_dir={tmp_path}", "trainer.max_stage_steps=700"]))
    plan = PAD.plan(cfg, tmp_path)
    stages = [stage_config(cfg, s, True, s.index == len(plan) - 1) for s in plan]
    by = {s.name: SimpleNamespace(**s.info) for s in plan}
    exp = lambda name: str(tmp_path / "stages" / f"{next(s.index for s in plan if s.name == name):02d}_{name}" / "export")
    assert by["s32_mse"].teacher is None and by["s32_mse"].student_init is None  # the base teaches at 128 steps
    assert by["s8_cond_lora"].teacher == exp("s32_mse") + "/unet"
    assert by["s8_uncond_lora"].student_init == exp("s32_mse") + "/unet"  # LoRA continued on the same base
    assert by["s8_uncond_lora"].lora_init == exp("s8_cond_lora") + "/lora"
    assert by["s8_uncond_full"].student_init == exp("s8_uncond_lora") + "/unet" and by["s8_uncond_full"].lora_init is None
    assert by["s4_cond_lora"].teacher == exp("s8_uncond_full") + "/unet"
    assert by["s2_cond_lora"].teacher == exp("s8_uncond_full") + "/unet"  # skip-level teacher
    assert by["s1_x0"].teacher == exp("s2_uncond_full") + "/unet"  # the frozen eps copy of its own start
    assert by["s1_cond"].teacher == exp("s4_uncond_full") + "/unet"  # skip-level teacher
    assert by["s1_cond"].student_prediction_type == "sample" and by["s1_cond"].teacher_prediction_type is None
    settings = [PAD.student_settings(cfg, st) for st in cfg.method.stages]
    assert [c.trainer.max_steps for c in stages][:2] == [700, 700] and settings[1]["betas"] == [0.0, 0.99]
    assert settings[0]["betas"] == [0.9, 0.999] and settings[0]["lr"] == 1e-5
    assert [c.trainer.export_dtype for c in stages] == ["fp32"] * (len(stages) - 1) + [cfg.trainer.export_dtype]
    assert [s.index for s in plan] == list(range(len(plan)))


@pytest.mark.parametrize("bad, match", [
    ({"objective": "x0", "student_steps": 1}, "prediction_type=sample"),
    ({"student_steps": 2, "train_timestep_steps": 3}, "must divide"),
    ({"prediction_type": "sample"}, "only an objective=x0"),
    ({"objective": "gan"}, "objective"),
    ({"name": "a b"}, "name"),
])
def test_invalid_stages_fail_at_start_naming_the_key(bad, match):
    cfg = compose_cfg(["method=pad"])
    cfg.method.stages = [PADStage(**{"name": "s", "student_steps": 4, **bad})]
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_teacher_moves_from_pure_noise_follow_the_trailing_euler_sampler(tmp_path):
    """n teacher moves from t = T (x_T = pure noise) to the clean end are the 4-step trailing Euler sampler
    (diffusers' EulerDiscreteScheduler, which sample_lightning matches), and the student target point is clean."""
    from distill.diffusion import sample_lightning
    from distill.models import load_components

    stage = {"name": "s1", "student_steps": 1, "teacher_steps_per_student_step": 4, "objective": "mse", "lora": False}
    cfg = validate(compose_cfg(["method=pad", "model.pretrained=distill:random-sdxl", f"output_dir={tmp_path}"]))
    cfg.method.stages = [PADStage(**stage)]
    comps = load_components("distill:random-sdxl", parts=("unet",))
    method = PAD(cfg, comps, torch.device("cpu"), stage=PAD.plan(cfg, tmp_path)[0])
    assert method.grid.tolist() == [999, 749, 499, 249, -1]
    noise, cond = torch.randn(2, 4, 16, 16), _cond(2, comps.unet)
    j = torch.zeros(2, dtype=torch.long)
    # diffusers' trailing Euler starts at noise * sigma_max, i.e. the VP point sqrt(1 - abar_999) noise (training
    # uses pure noise there, Sec. 3.3; the 0.2% gap is the paper's accepted train/inference difference)
    ours = method.teacher_path(noise * method.schedule.sigma(999, noise), j, cond)
    ref = sample_lightning(comps.unet, noise, cond, method.schedule, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # a sample that starts later stops at the clean end instead of moving past it
    late = method.teacher_path(noise, torch.tensor([3, 4]), cond)
    assert torch.equal(late[1], noise[1]) and torch.isfinite(late).all()
    # training draws x_T = eps at t = T (pure noise), and the 1-step student's target point is the clean end
    from distill.methods.base import Batch

    batch = Batch(latents=torch.randn(2, 4, 16, 16), cond=cond, captions=["", ""], seeds=[1, 2])
    x_t, t, t_next, j = method._draw(batch)
    assert t.tolist() == [999, 999] and t_next.tolist() == [-1, -1]
    assert torch.equal(x_t, batch.randn("eps", (4, 16, 16), x_t.device))


# -- one D step and one G step on real tensors ---------------------------------------------------------------
@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, False), (False, True), (True, True)])
def test_d_step_leaves_student_and_g_step_leaves_discriminator(tiny_data, tmp_path, lora, checkpointing):
    """Gradient isolation, also with gradient checkpointing on D and the student (the SDXL experiments' setting:
    a D frozen only during the forward made the checkpoint recompute disagree and crash the first G step)."""
    from distill.runner import make_accelerator
    from distill.trainer import Trainer

    stage = {"name": "s4", "student_steps": 4, "teacher_steps_per_student_step": 2, "lora": lora, "max_steps": 2, "lr": 1e-3}
    cfg = validate(_cfg(tmp_path, [stage], "method.lr_d=1e-3", f"trainer.gradient_checkpointing={checkpointing}"))
    (stage,) = PAD.plan(cfg, tmp_path)
    stage_cfg = stage_config(cfg, stage, False, True)
    acc = make_accelerator(stage_cfg)
    trainer = Trainer(stage_cfg, acc, tmp_path, stage=stage)
    method = trainer.method
    student, d = method.student_raw, method.d_raw
    blocks = [m for m in d.backbone.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks and all(m.gradient_checkpointing == checkpointing for m in blocks)
    base = _base_unet().state_dict()
    for k, v in d.backbone.state_dict().items():  # re-initialised from the base at this stage
        assert torch.equal(v, base[k]), k
    batch = trainer.to_batch(next(iter(trainer.loader)))
    snap = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}

    s0, d0 = snap(student), snap(d)
    method.phases = lambda step: ("d",)
    trainer.train_step([batch])
    s1, d1 = snap(student), snap(d)
    assert all(torch.equal(s0[k], s1[k]) for k in s0), "a D step changed the student"
    assert all(p.grad is None for p in student.parameters()), "a D step left gradients on the student"
    assert any(not torch.equal(d0[k], d1[k]) for k in d0), "a D step did not train D"

    method.phases = lambda step: ("g",)
    trainer.train_step([batch])
    s2, d2 = snap(student), snap(d)
    assert all(torch.equal(d1[k], d2[k]) for k in d1), "a G step changed D"
    assert all(p.grad is None for p in d.parameters()), "a G step left gradients on D"
    changed = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert changed, "a G step did not train the student"
    if lora:
        assert all("lora_" in k for k in changed), "a LoRA stage changed base weights"
    assert all(p.requires_grad for p in d.parameters())  # D is trainable again after the G step
    trainer.close()
    acc.free_memory()


# -- whole runs ----------------------------------------------------------------------------------------------
def test_two_stage_run_chains_exports_and_samples_with_diffusers(tiny_data, tmp_path):
    run = run_training(_cfg(tmp_path / "run", TWO))
    s0, s1 = run / "stages" / "00_s4_mse", run / "stages" / "01_s2_cond_lora"
    info = json.loads((s1 / "export" / "export.json").read_text())
    assert info["steps"] == [2] and info["scheduler"] == "EulerDiscreteScheduler-trailing"
    assert info["stage_teacher"] == str(s0 / "export" / "unet") and info["guidance_scale"] == 1.0
    assert (s1 / "export" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((run / "export" / "export.json").read_text())["stage"] == "s2_cond_lora"
    w0 = load_file(str(s0 / "export" / "unet.safetensors"))
    w1 = load_file(str(s1 / "export" / "unet.safetensors"))
    base = _base_unet().state_dict()
    assert w0["conv_in.weight"].dtype == torch.float32  # intermediate exports keep full precision
    assert any(not torch.equal(w0[k], base[k]) for k in w0), "the MSE stage trained the student"
    assert any(not torch.equal(w0[k].float(), w1[k].float()) for k in w0), "stage 2 started from stage 1 and trained"
    rows = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[-1] for k in ("train/d_loss", "train/loss", "train/d_logit_real", "train/d_logit_fake"))
    for export, steps in ((s0 / "export", 4), (s1 / "export", 2)):
        images = _sample_export(export, steps)
        assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_killed_mid_stage_resumes_mid_stage(tiny_data, tmp_path, monkeypatch):
    stages = [TWO[0], {**TWO[1], "max_steps": 4}]
    overrides = ("trainer.checkpoint_every_steps=1", "trainer.max_stage_steps=null")  # the stages set 1 and 4
    original = PAD.losses

    def crash(self, batch, phase, step):  # the process dies during stage 1's third step (step_2 is on disk)
        if self.stage_info.index == 1 and step == 2:
            raise KeyboardInterrupt("killed")
        return original(self, batch, phase, step)

    monkeypatch.setattr(PAD, "losses", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(tmp_path, stages, *overrides))
    s0, s1 = tmp_path / "stages" / "00_s4_mse", tmp_path / "stages" / "01_s2_cond_lora"
    assert (s0 / "export" / "export.json").exists() and not (s1 / "export").exists()
    state = json.loads((s1 / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["stage"] == {"index": 1, "name": "s2_cond_lora"}
    stamp = (s0 / "export" / "export.json").stat().st_mtime_ns

    monkeypatch.setattr(PAD, "losses", original)
    run_training(_cfg(tmp_path, stages, *overrides, "resume=latest"))
    assert (s0 / "export" / "export.json").stat().st_mtime_ns == stamp, "the finished stage ran again"
    steps = [json.loads(x)["step"] for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps  # continued at step 3 of stage 1, not from its start
    final = json.loads((s1 / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert final["stage"]["index"] == 1 and (s1 / "export" / "export.json").exists()


def test_lightning_tiny_exports_8_4_2_1_step_students(tiny_data, tmp_path):
    cfg = compose_cfg([*FAST, f"output_dir={tmp_path}", "trainer.max_steps=1"])
    run = run_training(cfg)
    exports = {}
    for d in sorted((run / "stages").iterdir()):
        info = json.loads((d / "export" / "export.json").read_text())
        exports[info["steps"][0]] = (d / "export", info)  # the last stage of each step count wins
    assert set(exports) >= {32, 8, 4, 2, 1}
    assert exports[1][1]["scheduler"] == "EulerDiscreteScheduler-trailing-sample"
    assert exports[1][1]["prediction_type"] == "sample"
    for steps in (8, 4, 2, 1):
        images = _sample_export(exports[steps][0], steps)
        assert torch.isfinite(images).all() and images.std() > 0


def test_stages_continue_the_data_stream_and_the_seed_sequence(tiny_data, tmp_path):
    """Each stage goes on from where the previous one left the data stream and the per-sample seeds: step s of
    every stage used to see the same samples with the same noise, so a chain trained on its first stage's data."""
    from distill.runner import make_accelerator
    from distill.trainer import Trainer

    cfg = validate(_cfg(tmp_path / "run", TWO))
    run = run_training(cfg)
    carry = json.loads((run / "stages" / "00_s4_mse" / "carry.json").read_text())
    assert carry["seed_step"] == TWO[0]["max_steps"] and carry["data"]["batch"] == TWO[0]["max_steps"]
    stage1 = PAD.plan(cfg, run)[1]
    cfg1 = stage_config(cfg, stage1, True, True)
    first = {}
    for name, c in (("replayed", None), ("carried", carry)):
        acc = make_accelerator(cfg1)
        trainer = Trainer(cfg1, acc, tmp_path / name, carry=c, stage=stage1)
        batch = trainer.to_batch(next(iter(trainer.loader)))
        first[name] = (batch.captions, batch.seeds, batch.randn("eps", (4, 4, 4), torch.device("cpu")))
        trainer.close()
        acc.free_memory()
    (cap_a, seeds_a, eps_a), (cap_b, seeds_b, eps_b) = first["replayed"], first["carried"]
    assert cap_a != cap_b, "the next stage's first batch replays the previous stage's first samples"
    assert not set(seeds_a) & set(seeds_b) and not torch.equal(eps_a, eps_b)


def test_reuse_stages_copies_the_finished_stages_that_match_and_trains_the_rest_as_a_fresh_run_would(tiny_data,
                                                                                                      tmp_path):
    """reuse_stages=RUN: the leading stages whose settings equal this run's are copied (export, carry; no
    checkpoints), the rest train from them, and the result is what a fresh run of the same settings trains."""
    from distill.config import ConfigError

    changed = [TWO[0], {**TWO[1], "lr": 2e-3}]
    a = run_training(_cfg(tmp_path / "a", TWO))
    b = run_training(_cfg(tmp_path / "b", changed, f"reuse_stages={a}"))
    fresh = run_training(_cfg(tmp_path / "fresh", changed))
    s0, s1 = "stages/00_s4_mse", "stages/01_s2_cond_lora"
    assert json.loads((b / s0 / "reused.json").read_text())["from"] == str((a / s0).resolve())
    assert not (b / s0 / "checkpoints").exists() and (b / s1 / "checkpoints").exists()
    assert (b / s0 / "carry.json").read_text() == (a / s0 / "carry.json").read_text()
    assert json.loads((b / s0 / "stage.json").read_text())["folder"] == str(b / s0)
    assert json.loads((b / s1 / "stage.json").read_text())["info"]["student_init"] == str(b / s0 / "export" / "unet")
    unet = "export/unet.safetensors"
    assert (b / s0 / unet).read_bytes() == (a / s0 / unet).read_bytes()
    lora = "export/lora/pytorch_lora_weights.safetensors"
    wb, wf, wa = (load_file(str(r / s1 / lora)) for r in (b, fresh, a))
    assert all(torch.equal(wb[k], wf[k]) for k in wb)  # bit for bit what training stage 0 again gives
    assert any(not torch.equal(wb[k], wa[k]) for k in wb)  # and stage 1 trained with the new setting
    # the same command again with resume=latest: nothing trains again, nothing is copied again
    stamps = [(b / s / "export" / "export.json").stat().st_mtime_ns for s in (s0, s1)]
    run_training(_cfg(tmp_path / "b", changed, f"reuse_stages={a}", "resume=latest"))
    assert [(b / s / "export" / "export.json").stat().st_mtime_ns for s in (s0, s1)] == stamps
    # a first stage that differs reuses nothing: an error naming the key, before anything trains
    with pytest.raises(ConfigError, match=r"stage 's4_mse' differs: method\.stages\[0\]\.max_steps: 1 -> 2"):
        run_training(_cfg(tmp_path / "c", [{**TWO[0], "max_steps": 2}, TWO[1]], f"reuse_stages={a}"))
    assert not (tmp_path / "c" / "stages").exists()
    with pytest.raises(ConfigError, match="reuse_stages=.*not a staged run folder"):
        run_training(_cfg(tmp_path / "d", TWO, f"reuse_stages={tmp_path}"))
    with pytest.raises(ConfigError, match=r"reuse_stages=.*already exists here \(resume=latest continues it\)"):
        run_training(_cfg(tmp_path / "b", changed, f"reuse_stages={a}"))
