"""SIM / SiD (data-free one-step distillation) on the method contract: the generator loss's gradient against
autograd of the true score divergence on a Gaussian with closed-form scores, SiD's published form, gradient
isolation, the prompts-only data kind (no image read), and the export in the diffusers pipeline."""

import json

import pytest
import torch

from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from distill.config import ConfigError, validate

FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4"]


def _schedule():
    from distill.diffusion import NoiseSchedule

    return NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})


def _posterior_mean(mu, s, x_t, a, sig):
    """E[x0 | x_t] for x0 ~ N(mu, s^2 I), x_t = a x0 + sig eps: the exact x0 prediction of that distribution."""
    return mu + (a * s * s / (a * a * s * s + sig * sig)) * (x_t - a * mu)


def _toy(n: int, seed: int = 0):
    """Generator x0 = mu + s z (learnable mu, log s); samples noised at t ~ U[20, 980]."""
    from distill.diffusion import add_noise

    sched = _schedule()
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.8, -0.4, 0.3, 1.5]).view(1, 4, 1, 1).requires_grad_(True)
    log_s = torch.tensor(0.3).log().requires_grad_(True)
    z, eps = torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 4, 2, 2, generator=g)
    t = torch.randint(20, 981, (n,), generator=g)

    def noised():
        x0 = mu + log_s.exp() * z
        x_t = add_noise(x0, eps, t, sched)
        return x0, x_t, sched.alpha(t, x_t), sched.sigma(t, x_t)

    return mu, log_s, noised


MU_REAL, S_REAL = torch.tensor([0.0, 0.5, -0.5, 0.0]).view(1, 4, 1, 1), 0.6


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2_exact"])
def test_the_generator_loss_has_the_gradient_of_the_true_divergence(distance):
    """With the fake score exact (the generator's own closed-form score, parameters held fixed), the gradient of the
    SIM loss equals autograd of D = E d(x0_real(x_t) - x0_gen(x_t)), differentiated through the samples AND the
    generator's score: the score-gradient identity."""
    from distill.methods.sim import sim_loss

    c = 0.05
    d = ((lambda delta: (delta.pow(2).mean((1, 2, 3)) + c * c).sqrt() - c) if distance == "pseudo_huber"
         else (lambda delta: delta.pow(2).mean((1, 2, 3))))
    n = 400_000
    mu, log_s, noised = _toy(n)
    x0, x_t, a, sig = noised()
    true = d(_posterior_mean(MU_REAL, S_REAL, x_t, a, sig) - _posterior_mean(mu, log_s.exp(), x_t, a, sig)).mean()
    want = torch.autograd.grad(true, [mu, log_s])

    x0, x_t, a, sig = noised()
    x0_real = _posterior_mean(MU_REAL, S_REAL, x_t, a, sig)
    x0_fake = _posterior_mean(mu.detach(), log_s.detach().exp(), x_t, a, sig)  # parameters fixed, input live
    if distance == "pseudo_huber":
        loss = sim_loss(x0, x0_real, x0_fake, "pseudo_huber", c, alpha=0.5)
    else:  # l2 without SiD's per-sample normalisation: d = mean(D^2), the exact form at alpha 0.5
        delta, v = x0_real - x0_fake, x0_fake - x0
        loss = (delta.pow(2).mean((1, 2, 3)) + 2 * (delta * v).mean((1, 2, 3))).mean()
    got = torch.autograd.grad(loss, [mu, log_s])
    for g_want, g_got in zip(want, got):
        assert g_want.abs().max() > 1e-3  # a gradient that is not trivially zero
        torch.testing.assert_close(g_got, g_want, rtol=0.05, atol=2e-3)
    # the detached-score variant (no gradient through the networks' inputs) is NOT the divergence's gradient
    x0, x_t, a, sig = noised()
    wrong = sim_loss(x0, x0_real.detach(), x0_fake.detach(), "pseudo_huber", c)
    g_wrong = torch.autograd.grad(wrong, [mu])[0]
    assert (g_wrong - want[0]).abs().max() > 0.2 * want[0].abs().max()


def test_descent_on_the_loss_moves_the_generator_onto_the_real_distribution():
    """Training the toy generator on the SIM loss alone (exact fake score) matches the real mean and scale."""
    from distill.methods.sim import sim_loss

    mu, log_s, noised = _toy(4096, seed=1)
    opt = torch.optim.Adam([mu, log_s], lr=0.03)
    for _ in range(300):
        x0, x_t, a, sig = noised()
        x0_real = _posterior_mean(MU_REAL, S_REAL, x_t, a, sig)
        x0_fake = _posterior_mean(mu.detach(), log_s.detach().exp(), x_t, a, sig)
        opt.zero_grad()
        sim_loss(x0, x0_real, x0_fake, "pseudo_huber", 0.05).backward()
        opt.step()
    torch.testing.assert_close(mu.detach(), MU_REAL, atol=0.05, rtol=0)
    assert abs(float(log_s.detach().exp()) - S_REAL) < 0.05


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_l2_is_sids_published_form(alpha):
    """SiD-LSG's generator loss per pixel: (y_real - y_fake) . ((y_real - x) - alpha (y_real - y_fake)) / w, with
    w = mean|x - y_real| per sample (stop-grad); ours is twice it (d = mean(D^2) has d' = 2 D)."""
    from distill.methods.sim import sim_loss

    g = torch.Generator().manual_seed(0)
    x, y_r, y_f = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    w = (x - y_r).abs().mean((1, 2, 3), keepdim=True)
    sid = ((y_r - y_f) * ((y_r - x) - alpha * (y_r - y_f)) / w).mean((1, 2, 3)).mean()
    torch.testing.assert_close(sim_loss(x, y_r, y_f, "l2", alpha=alpha), 2 * sid)


# -- configuration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("method.distance=l1", "method.distance"), ("method.timestep=1000", "method.timestep"),
    ("method.huber_c=0", "method.huber_c"), ("trainer.validation_steps=[4]", "trainer.validation_steps"),
    ("method.generator_every_n_steps=0", "method.generator_every_n_steps")])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["+experiment=sim_tiny", override]))


def test_prompts_data_is_refused_by_a_method_that_trains_on_data():
    with pytest.raises(ConfigError, match="data.kind=prompts"):
        validate(compose_cfg(["+experiment=dmd2_tiny", "data=tiny_world_prompts"]))


# -- isolation -----------------------------------------------------------------------------------------------
def _method(*overrides: str):
    from distill.methods import build_method
    from distill.models import load_components

    cfg = validate(compose_cfg(["+experiment=sim_tiny", *FAST, *overrides]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    torch.manual_seed(0)
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


def _batch(comps, b: int = 4, seed: int = 0):
    """Conditioning only, as the prompts data kind gives: no latents, no pixels."""
    from distill.diffusion import UNetCond
    from distill.methods.base import Batch

    g = torch.Generator().manual_seed(seed)
    d = comps.unet.config.cross_attention_dim
    pooled = comps.unet.config.projection_class_embeddings_input_dim - 6 * comps.unet.config.addition_time_embed_dim
    return Batch(latents=None, captions=["x"] * b, seeds=list(range(b)),
                 cond=UNetCond(torch.randn(b, 77, d, generator=g), torch.randn(b, pooled, generator=g),
                               torch.zeros(b, 6)))


@pytest.mark.parametrize("lora", [False, True])
def test_each_phase_trains_only_its_own_network(lora):
    extra = ["method.lora.enabled=true", "method.lora.rank=4"] if lora else []
    _, comps, m = _method(*extra)
    gen, fake = list(m.trainable), list(m.fake.parameters())
    teacher = [p for n, p in m.teacher.named_parameters() if "lora_" not in n]
    batch = _batch(comps)
    assert batch.size == 4
    for phase, trained, untouched in (("g", gen, fake), ("fake", fake, gen)):
        for p in gen + fake + teacher:
            p.grad = None
        with m.phase_scope(phase):
            m.losses(batch, phase, 1)["loss"].backward()
        assert all(p.grad is None for p in untouched + teacher), f"{phase} leaked gradients"
        assert sum(float(p.grad.abs().sum()) for p in trained if p.grad is not None) > 0, f"{phase} trained nothing"
    assert all(p.requires_grad for p in fake), "phase_scope restores the fake score's flags"


# -- prompts only, end to end --------------------------------------------------------------------------------
def test_prompt_lists_load_as_captions_without_images(tmp_path):
    from distill.data import build_loader
    from distill.data.config import DataConfig

    lines = [f"prompt number {i}" for i in range(10)]
    (tmp_path / "p.txt").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"caption": s, "other": 1}) for s in lines) + "\n")
    for name in ("p.txt", "p.jsonl"):
        cfg = DataConfig(kind="prompts", shards=str(tmp_path / name), batch_size=5, num_workers=0, shuffle_buffer=0,
                         resolution=64)
        loader = build_loader(cfg, rank=0, world_size=1, seed=0)
        a, b = next(loader), next(loader)
        assert sorted(a["caption"] + b["caption"]) == sorted(lines), name  # one epoch: every line once
        assert "pixels" not in a and a["target_size"].tolist() == [[64, 64]] * 5
        assert loader.counters().get("images_read") == 0


def test_sim_trains_from_prompts_alone_and_exports_a_one_step_generator(tiny_data, tmp_path):
    """SIM straight from the teacher (sim_from_teacher_tiny) with its own prompt list: no image read
    (data/images_read == 0 in metrics.jsonl), both phases stepped, and the export samples in the diffusers pipeline as
    distill does. (sim_tiny, with its warm-up on pairs: tests/test_pairs.py.)"""
    from distill.export import read_export

    run = train(["+experiment=sim_from_teacher_tiny", *FAST, f"output_dir={tmp_path}/run",
                 "trainer.max_steps=2",
                 "model.pretrained=distill:tiny-world", "trainer.export_at_end=true", "trainer.export_dtype=fp32"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(r["data/images_read"] == 0 for r in rows if "data/images_read" in r)
    assert any("data/images_read" in r for r in rows)
    assert all("train/loss" in r and "train/fake_loss" in r for r in rows if "train/lr_g" in r)
    info, spec = read_export(run / "export")
    assert info["method"] == "sim" and spec.kind == "lcm" and spec.timesteps == {1: (999,)}
    assert_pipeline_samples_as_distill(run / "export", 1)
