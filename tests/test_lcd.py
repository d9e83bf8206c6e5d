"""Latent consistency distillation through the real loop on tiny SDXL-architecture models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import compose_cfg, train, weights
from distill.config import validate

FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows]


def _method_and_batch(experiment: str, b: int = 4):
    from distill.diffusion import UNetCond
    from distill.methods import build_method
    from distill.methods.base import Batch
    from distill.models import load_components

    lora = ["method.lora.rank=4"] if "lora" in experiment else []
    cfg = validate(compose_cfg([f"+experiment={experiment}", *FAST, *lora]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    method = build_method(cfg, comps, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    d = comps.unet.config.cross_attention_dim
    pooled = comps.unet.config.projection_class_embeddings_input_dim - 6 * comps.unet.config.addition_time_embed_dim
    batch = Batch(latents=torch.randn(b, 4, 16, 16, generator=g), captions=["x"] * b, seeds=list(range(b)),
                  cond=UNetCond(torch.randn(b, 77, d, generator=g), torch.randn(b, pooled, generator=g), torch.zeros(b, 6)))
    return cfg, comps, method, batch


@pytest.mark.parametrize("experiment", ["lcm_lora_tiny", "lcm_tiny"])
def test_loss_falls_on_a_fixed_batch(experiment):
    """The objective is trainable: on one fixed batch (same t, noise and w every step) the loss falls."""
    cfg, comps, method, batch = _method_and_batch(experiment)
    lr = 1e-3 if "lora" in experiment else 1e-4
    opt = torch.optim.Adam([p for g in method.optimizers()[0].groups() for p in g["params"]], lr=lr)
    losses = []
    for step in range(12):
        loss = method.losses(batch, "g", step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_lora_run_changes_only_lora(tiny_data, tmp_path):
    run = train(["+experiment=lcm_lora_tiny", *FAST, f"output_dir={tmp_path}/run", "trainer.max_steps=3",
                 "trainer.checkpoint_every_steps=3", "method.lora.rank=4", "optim.lr=1e-3"])
    assert all(torch.isfinite(torch.tensor(_losses(run))))
    trained = weights(run, 3)
    from distill.models import load_components

    base = load_components("distill:random-sdxl", parts=("unet",)).unet.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys, "the checkpoint holds the LoRA parameters"
    for k, v in trained.items():
        if "lora_" in k:
            continue
        base_key = k.replace(".base_layer", "")
        assert torch.equal(v, base[base_key]), f"base weight {k} changed"


def test_full_student_changes_and_ema_moves(tiny_data, tmp_path):
    run = train(["+experiment=lcm_tiny", *FAST, f"output_dir={tmp_path}/run", "trainer.max_steps=3",
                 "trainer.checkpoint_every_steps=1", "optim.lr=1e-3"])
    s1, s3 = weights(run, 1), weights(run, 3)
    cond_proj = "time_embedding.cond_proj.weight"
    assert torch.count_nonzero(s1[cond_proj]) > 0, "the zero-initialised w-embedding learns"
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    ema1 = load_file(str(run / "checkpoints/step_1/method_state.safetensors"))
    ema3 = load_file(str(run / "checkpoints/step_3/method_state.safetensors"))
    moved = [k for k in ema1 if not torch.equal(ema1[k], ema3[k])]
    assert moved, "the EMA target moves"
    # the EMA lags the student: it sits between the start and the student
    k = "ema.conv_out.weight"
    assert not torch.equal(ema3[k], s3[k.removeprefix("ema.")])


def test_zero_w_embedding_reproduces_teacher_at_step_0():
    from distill.models import load_components
    from distill.models.adapters import guidance_embedding, student_with_w_embedding

    comps = load_components("distill:random-sdxl", parts=("unet",))
    student = student_with_w_embedding(comps.unet, 256)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 19])
    emb = torch.randn(2, 77, comps.unet.config.cross_attention_dim)
    pooled = comps.unet.config.projection_class_embeddings_input_dim - 6 * comps.unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.zeros(2, 6)}
    ref = comps.unet(x, t, emb, added_cond_kwargs=added).sample
    out = student(x, t, emb, added_cond_kwargs=added, timestep_cond=guidance_embedding(torch.tensor([3.0, 9.0]), 256)).sample
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("experiment", ["lcm_lora_tiny", "lcm_tiny"])
def test_resume_equals_uninterrupted(tiny_data, tmp_path, experiment, capsys):
    # constant LR: the "interrupted" run stops by max_steps=2, and a cosine schedule depends on max_steps (a cosine
    # schedule across a real interruption is covered by the kill -9 test in test_faults.py)
    common = [f"+experiment={experiment}", *FAST, "trainer.checkpoint_every_steps=2", "optim.lr=1e-3",
              "optim.scheduler=constant"]
    full = train([*common, f"output_dir={tmp_path}/full", "trainer.max_steps=4"])
    part = train([*common, f"output_dir={tmp_path}/part", "trainer.max_steps=2"])
    capsys.readouterr()
    train([*common, f"output_dir={part}", "trainer.max_steps=4", "resume=latest"])
    said = capsys.readouterr().out
    # the one setting that changed is named (and the debug preset's stage cap, which follows it), with the LR note;
    # nothing else (resume itself is not a setting)
    assert ("resumed with changed settings: trainer.max_stage_steps: 2 -> 4; trainer.max_steps: 2 -> 4 "
            "(the LR schedule follows") in said, said
    assert "resume:" not in said
    a, b = weights(full, 4), weights(part, 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    if experiment == "lcm_tiny":
        ea = load_file(str(full / "checkpoints/step_4/method_state.safetensors"))
        eb = load_file(str(part / "checkpoints/step_4/method_state.safetensors"))
        for k in ea:
            torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0, msg=k)


def test_one_step_costs_one_teacher_one_target_one_student(tiny_data):
    """LoRA LCD: the UNet runs 3 times per step: teacher at 2B (cond+uncond batched), target at B, student at B."""
    cfg, comps, method, batch = _method_and_batch("lcm_lora_tiny", b=3)
    b = 3
    calls = []
    comps.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    out = method.losses(batch, "g", 0)
    out["loss"].backward()
    assert sorted(calls) == sorted([2 * b, b, b]), calls


def test_losses_equal_an_independent_hand_written_lcm_step():
    """LCD.losses against LCM Algorithm 1 written out by hand from the scheduler's alphas, as diffusers' script
    computes it: teacher at t with LCM-form CFG (cond + w (cond - uncond), all-zero uncond), DDIM to s = t - k, the
    EMA target at s with the student's w-embedding, boundary scalings c_skip / c_out at t and s, pseudo-Huber.
    The EMA is moved away from the student first, so a target taken from the online student would fail; so would a
    target at t, the teacher's cond for the target, or a flipped w."""
    from distill.models.adapters import guidance_embedding

    cfg, comps, method, batch = _method_and_batch("lcm_tiny", b=3)
    with torch.no_grad():
        for p in method.ema.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss = method.losses(batch, "g", 0)["loss"]

    m, abar = cfg.method, torch.as_tensor(method.schedule.alphas_cumprod, dtype=torch.float64)
    k = 1000 // m.num_ddim_timesteps
    i = batch.randint("index", 0, m.num_ddim_timesteps, torch.device("cpu"))
    t = (i + 1) * k - 1
    s = (t - k).clamp(min=0)
    eps = batch.randn("eps", (4, 16, 16), torch.device("cpu"))
    w = m.w_min + (m.w_max - m.w_min) * batch.rand("w", torch.device("cpu"))
    col = lambda v: v.double().view(-1, 1, 1, 1)
    a_t, a_s = col(abar[t]), col(abar[s])
    x0 = batch.latents.double()
    x_t = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps.double()).float()
    c = batch.cond
    kw = lambda cc, emb=None: {"encoder_hidden_states": cc.encoder_hidden_states, "timestep_cond": emb,
                              "added_cond_kwargs": {"text_embeds": cc.text_embeds, "time_ids": cc.time_ids}}
    zero = type(c)(torch.zeros_like(c.encoder_hidden_states), torch.zeros_like(c.text_embeds), c.time_ids)
    with torch.no_grad():
        e_c = method.teacher(x_t, t, **kw(c)).sample.double()
        e_u = method.teacher(x_t, t, **kw(zero)).sample.double()
        e = e_c + col(w) * (e_c - e_u)
        x0_hat = (x_t.double() - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x_s = (a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * e).float()
        emb = guidance_embedding(w, m.w_embedding_dim)

        def f(net, x, tt, a):
            out = net(x, tt, **kw(c, emb)).sample.double()
            x0p = (x.double() - (1 - a).sqrt() * out) / a.sqrt()
            st = col(tt) * m.timestep_scaling
            c_skip = m.sigma_data**2 / (st**2 + m.sigma_data**2)
            c_out = st / (st**2 + m.sigma_data**2).sqrt()
            return c_skip * x.double() + c_out * x0p

        target = f(method.ema.model, x_s, s, a_s)
    pred = f(method.student, x_t, t, a_t)
    ref = (torch.sqrt((pred - target) ** 2 + m.huber_c**2) - m.huber_c).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=1e-6)
