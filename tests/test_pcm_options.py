"""PCM's options on the segmented objective: CFG-free distillation, the adversarial term on the frozen teacher's
encoder, and Hyper-SD's progressive teacher (the previous stage's student) for TSCD stages."""

import json

import pytest
import torch
from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from test_pcm import _batch, _method

from distill.config import ConfigError, validate

CPU = torch.device("cpu")


def test_renoise_is_the_forward_process_between_two_times():
    """q(x_t | x_s) composed with q(x_s | x0) is q(x_t | x0): the same mean coefficient and variance; s < 0 (the
    clean end) is add_noise itself."""
    from distill.diffusion import NoiseSchedule, add_noise, renoise

    sch = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                     "beta_schedule": "scaled_linear"})
    x0, e1, e2 = torch.randn(3, 5, 4, 4, dtype=torch.float64).unbind(0)
    s, t = torch.tensor([-1, 249, 499, 10, 700]), torch.tensor([100, 300, 499, 999, 701])
    x_s = add_noise(x0, e1, s, sch)
    x_t = renoise(x_s, s, t, e2, sch)
    a_t, a_s = sch.abar(t).view(-1, 1, 1, 1), sch.abar(s).view(-1, 1, 1, 1)
    coeff_x0 = (a_t / a_s).sqrt() * a_s.sqrt()  # the mean of x_t given x0
    torch.testing.assert_close(coeff_x0, a_t.sqrt())
    var = (a_t / a_s) * (1 - a_s) + (1 - a_t / a_s)  # the noise variance of x_t given x0
    torch.testing.assert_close(var, 1 - a_t)
    torch.testing.assert_close(renoise(x0, -1, t, e2, sch), add_noise(x0, e2, t, sch))
    torch.testing.assert_close(x_t[2], x_s[2])  # s = t: no move


# -- CFG-free distillation ---------------------------------------------------------------------------------
def test_cfg_free_teacher_step_is_the_unguided_ode_and_drops_prompts():
    from distill.diffusion import call_unet, ddim_step, to_x0_eps
    from distill.models.adapters import adapters_disabled

    _, comps, m = _method("pcm_lora_tiny", "method.cfg_free=true", "method.uncond_prob=0.5")
    batch = _batch(comps, b=16)
    cond = m._train_cond(batch, CPU)
    zero = (cond.encoder_hidden_states == 0).flatten(1).all(1)
    kept = (cond.encoder_hidden_states == batch.cond.encoder_hidden_states).flatten(1).all(1)
    assert zero.any() and (~zero).any() and bool((zero ^ kept).all())
    assert bool((cond.text_embeds[zero] == 0).all()) and torch.equal(cond.time_ids, batch.cond.time_ids)
    t, s = torch.full((16,), 499), torch.full((16,), 374)
    x_t = torch.randn(16, 4, 16, 16)
    with torch.no_grad():
        got = m._teacher_step(x_t, t, s, cond, cond, torch.full((16,), 4.0))
        with adapters_disabled(m.student):  # the teacher's own (un-guided) prediction, one DDIM step
            want = ddim_step(*to_x0_eps(call_unet(m.student, x_t, t, cond), x_t, t, m.schedule), s, m.schedule)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    calls = []
    comps.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    m.losses(_batch(comps, b=3), "g", 0)["loss"].backward()
    assert sorted(calls) == [3, 3, 3], "no 2B CFG forward: the teacher runs the batch once"


def test_cfg_free_full_student_has_no_w_input_and_samples_with_the_pipelines_cfg():
    _, _, m = _method("pcm_tiny", "method.cfg_free=true", "method.inference_guidance_scale=2.5")
    assert m.w_dim is None and m.student.config.time_cond_proj_dim is None
    spec = m.sampler()
    assert spec.kind == "ddim" and spec.guidance_scale == 2.5
    _, _, guided = _method("pcm_tiny")
    assert guided.student.config.time_cond_proj_dim is not None  # the default keeps LCD's w-embedding


@pytest.mark.parametrize("override,key", [("method.uncond_prob=1.0", "method.uncond_prob"),
                                          ("method.inference_guidance_scale=0.5", "method.inference_guidance_scale"),
                                          ("method.gan_weight=-1", "method.gan_weight"),
                                          ("method.gan_lr=0", "method.gan_lr"),
                                          ("method.segment_teacher=ema", "method.segment_teacher")])
def test_option_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["+experiment=pcm_lora_tiny", "method.cfg_free=true", override]))


def test_cfg_free_with_trajectories_is_refused():
    with pytest.raises(ConfigError, match=r"method\.cfg_free"):
        validate(compose_cfg(["+experiment=mlcm_tiny", "method.cfg_free=true"]))


def test_cfg_free_run_exports_a_card_whose_pipeline_cfg_matches_distill(tiny_data, tmp_path):
    run = train(["+experiment=pcm_lora_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
                 "trainer.export_dtype=fp32", "method.cfg_free=true", "method.inference_guidance_scale=3"])
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["cfg_free"] is True and info["guidance_scale"] == 3.0 and info["scheduler"] == "DDIMScheduler-trailing"
    assert "guidance_scale=3" in (run / "export" / "README.md").read_text()
    assert_pipeline_samples_as_distill(run / "export", 4)  # CFG with the empty prompt, as the pipeline runs it


# -- the adversarial term --------------------------------------------------------------------------------
def _grads(params) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


@pytest.mark.parametrize("experiment", ["pcm_lora_tiny", "pcm_tiny"])
def test_gan_phases_train_their_own_network_only(experiment):
    """d trains the heads (the student and the teacher's encoder untouched); g trains the student through D's
    activations with the heads frozen; g's loss is the consistency loss of the same batch plus the weighted hinge."""
    _, comps, m = _method(experiment, "method.gan_weight=0.1", "method.gan_head_channels=8")
    _, _, plain = _method(experiment)
    plain.student.load_state_dict(m.student.state_dict())
    if m.ema is not None:
        plain.ema.model.load_state_dict(m.ema.model.state_dict())
    assert [s.name for s in m.optimizers()] == ["d", "g"]
    heads = list(m.discriminator.parameters())
    assert heads and {id(p) for p in heads}.isdisjoint(id(p) for p in m.trainable)
    assert not any(p.requires_grad for p in m.discriminator.net.parameters())  # the frozen teacher's encoder
    if m.lora:  # a LoRA student's D reads a copy of the encoder made before the adapters: no LoRA layers in it
        assert m.discriminator.net.conv_in is not comps.unet.conv_in
        assert not any("lora_" in n for n, _ in m.discriminator.net.named_parameters())
        assert all(p.requires_grad for p in m.trainable)  # building D froze none of the student's adapters
    else:  # a full student's teacher is a frozen UNet of its own: shared, no copy
        assert m.discriminator.net.conv_in is comps.unet.conv_in
    with torch.no_grad():  # LoRA B starts at zero: give the student its own output
        for name, p in m.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plain.student.load_state_dict(m.student.state_dict())
    batch = _batch(comps, b=4)
    out = m.losses(batch, "d", 0)
    out["loss"].backward()
    assert _grads(heads) and not _grads(m.trainable)
    m.discriminator.zero_grad()
    with m.phase_scope("g"):
        out = m.losses(batch, "g", 0)
        out["loss"].backward()
    assert _grads(m.trainable) and not _grads(heads)
    assert all(p.requires_grad for p in heads)  # the scope restored D's flags
    want = plain.losses(batch, "g", 0)["loss"]
    torch.testing.assert_close(out["loss_consistency"], want.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out["loss"].detach(), want.detach() + 0.1 * out["loss_gan"], rtol=1e-5, atol=1e-8)


def test_gan_step_runs_the_teacher_once_for_both_phases():
    _, comps, m = _method("pcm_lora_tiny", "method.gan_weight=0.1", "method.gan_head_channels=8")
    calls = []
    comps.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    batch = _batch(comps, b=3)
    m.losses(batch, "d", 5)["loss"].backward()
    with m.phase_scope("g"):
        m.losses(batch, "g", 5)["loss"].backward()
    # d: teacher (2B), target, student without grad; g: the student alone (the target reused)
    assert sorted(calls) == [3, 3, 3, 6], calls
    assert not m._shared


def test_gan_run_logs_both_phases_checkpoints_d_and_resumes(tiny_data, tmp_path):
    from safetensors.torch import load_file

    base = ["+experiment=pcm_lora_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
            "method.gan_weight=0.1", "method.gan_head_channels=8", "method.gan_lr=5e-4",
            "trainer.checkpoint_every_steps=1", "trainer.max_steps=1", "trainer.validation_steps=[4]"]
    run = train(base)
    ckpt = max((run / "checkpoints").iterdir())
    d_files = [f for f in ckpt.rglob("*.safetensors") if any("heads" in k for k in load_file(str(f)))]
    assert d_files, "the discriminator's heads are in the checkpoint"
    train([*base[:-2], "trainer.max_steps=2", "trainer.validation_steps=[4]", "resume=latest"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2
    for key in ("train/loss", "train/loss_gan", "train/loss_consistency", "train/d_loss", "train/d_logit_real"):
        assert key in last and torch.isfinite(torch.tensor(last[key])), key
    cfg = json.loads((run / "export" / "export.json").read_text())
    assert cfg["lora"]


# -- Hyper-SD's progressive teacher ------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["pcm_lora_tiny", "pcm_tiny"])
def test_previous_stage_student_is_the_next_stages_teacher(tiny_data, tmp_path, experiment):
    from distill.diffusion import Denoiser
    from distill.methods import build_method
    from distill.models import load_components
    from distill.models.loader import load_unet
    from distill.stages import Stage

    extra = [] if "lora" in experiment else ["method.w_embedding_dim=32"]
    run = train([f"+experiment={experiment}", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
                 "method.segment_stages=[2,1]", "method.segment_steps=[2]", "method.segment_teacher=previous",
                 "trainer.validation_steps=[1]", *extra])
    first = min((run / "stages").iterdir()) / "export"
    cfg = validate(compose_cfg([f"+experiment={experiment}", "+debug=fast", "method.num_segments=1",
                                "method.segment_teacher=previous", "trainer.validation_steps=[1]", *extra]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    base = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    stage = Stage("k1", 1, tmp_path / "s", info={"student_init": str(first)})
    m = build_method(cfg, comps, CPU, stage)
    prev = load_unet(str(first / "unet"), torch.float32)
    assert m.previous is not None and not any(p.requires_grad for p in m.previous.parameters())
    assert torch.equal(m.previous.conv_in.weight, prev.conv_in.weight)
    changed = [k for k, v in prev.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed, "stage 1's student differs from the original teacher"
    batch = _batch(comps, b=2)
    t, s = torch.full((2,), 999), torch.full((2,), 874)
    x_t = torch.randn(2, 4, 16, 16)
    w = m._w(batch, CPU)
    student_cond = m._cond(batch.cond, w)
    with torch.no_grad():
        got = m._teacher_step(x_t, t, s, batch.cond, student_cond, w)
        want = Denoiser(prev, m.schedule).jump(x_t, t, s, student_cond)
    torch.testing.assert_close(got, want)
    original = build_method(validate(compose_cfg([f"+experiment={experiment}", "+debug=fast",
                                                  "trainer.validation_steps=[1]", *extra])),
                            load_components(cfg.model.pretrained, parts=("unet",)), CPU, stage)
    assert original.previous is None  # segment_teacher=original (the default): the frozen teacher throughout
