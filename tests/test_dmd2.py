"""DMD2 (distribution matching distillation) on the method contract: the distribution-matching gradient on a
Gaussian toy with closed-form scores, the two time scales across a resume, gradient isolation of the three
networks, backward simulation, and the export in the diffusers pipeline."""

import json
import math

import pytest
import torch

from helpers import assert_pipeline_samples_as_distill, compose_cfg, train, weights
from distill.config import ConfigError, validate

FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4",
        "method.head_channels=8", "method.regression.steps=0"]  # dmd2_tiny's warm-up: tests/test_pairs.py


def _batch(comps, b: int = 4, seed: int = 0, side: int = 8):
    from distill.diffusion import UNetCond
    from distill.methods.base import Batch

    g = torch.Generator().manual_seed(seed)
    d = comps.unet.config.cross_attention_dim
    pooled = comps.unet.config.projection_class_embeddings_input_dim - 6 * comps.unet.config.addition_time_embed_dim
    return Batch(latents=torch.randn(b, 4, side, side, generator=g), captions=["x"] * b, seeds=list(range(b)),
                 cond=UNetCond(torch.randn(b, 77, d, generator=g), torch.randn(b, pooled, generator=g),
                               torch.zeros(b, 6)))


def _method(*overrides: str):
    from distill.methods import build_method
    from distill.models import load_components

    cfg = validate(compose_cfg(["+experiment=dmd2_tiny", *FAST, *overrides]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    torch.manual_seed(0)
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


def _side(m) -> int:
    from distill.methods.discriminator import latent_side

    return latent_side(m.comps, m.cfg.data.resolution)


# -- the distribution-matching gradient on a Gaussian toy ------------------------------------------------------
def _posterior_mean(mu: torch.Tensor, s: float, x_t: torch.Tensor, a: torch.Tensor, sig: torch.Tensor):
    """E[x0 | x_t] for x0 ~ N(mu, s^2 I), x_t = a x0 + sig eps: the exact denoiser of that distribution."""
    return mu + (a * s * s / (a * a * s * s + sig * sig)) * (x_t - a * mu)


def _dm_grad(mu_fake: torch.Tensor, mu_real: torch.Tensor, s: float, n: int = 512, seed: int = 0):
    """d dm_loss / d x0 for generator samples x0 ~ N(mu_fake, s^2), noised at DMD2's t ~ U[20, 980]."""
    from distill.diffusion import NoiseSchedule, add_noise
    from distill.methods.dmd2 import dm_loss

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                       "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    g = torch.Generator().manual_seed(seed)
    x0 = (mu_fake + s * torch.randn(n, 4, 2, 2, generator=g)).requires_grad_(True)
    t = torch.randint(20, 981, (n,), generator=g)
    x_t = add_noise(x0.detach(), torch.randn(n, 4, 2, 2, generator=g), t, sched)
    a, sig = sched.alpha(t, x_t), sched.sigma(t, x_t)
    dm_loss(x0, _posterior_mean(mu_real, s, x_t, a, sig), _posterior_mean(mu_fake, s, x_t, a, sig)).backward()
    return x0.grad


def test_dm_gradient_points_from_the_fake_distribution_to_the_real_one_and_vanishes_when_they_agree():
    mu_real = torch.tensor([1.0, -0.5, 0.25, 2.0]).view(1, 4, 1, 1)
    mu_fake = torch.tensor([-1.0, 0.5, 0.0, 0.0]).view(1, 4, 1, 1)
    step = -_dm_grad(mu_fake, mu_real, 0.5).mean(dim=(0, 2, 3))  # gradient descent's direction, per channel
    want = (mu_real - mu_fake).flatten()
    assert torch.nn.functional.cosine_similarity(step, want, dim=0) > 0.999
    assert (_dm_grad(mu_real, mu_real, 0.5).abs().max() < 1e-7)  # real == fake: no gradient


def test_dm_descent_moves_a_generator_mean_onto_the_real_mean():
    """A 'generator' that is a learnable mean, trained on the DM loss alone with closed-form scores (the fake score
    follows it exactly), converges to the real distribution's mean."""
    from distill.diffusion import NoiseSchedule, add_noise
    from distill.methods.dmd2 import dm_loss

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                       "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    mu_real = torch.tensor([1.5, -1.0, 0.5, 0.0]).view(1, 4, 1, 1)
    mu = torch.zeros(1, 4, 1, 1, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x0 = mu + 0.3 * torch.randn(256, 4, 1, 1, generator=g)
        t = torch.randint(20, 981, (256,), generator=g)
        x_t = add_noise(x0.detach(), torch.randn(256, 4, 1, 1, generator=g), t, sched)
        a, sig = sched.alpha(t, x_t), sched.sigma(t, x_t)
        loss = dm_loss(x0, _posterior_mean(mu_real, 0.3, x_t, a, sig), _posterior_mean(mu.detach(), 0.3, x_t, a, sig))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (mu.detach() - mu_real).abs().max() < 0.05, mu.flatten()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fake_score_x0_loss_is_the_eps_loss_weighted_by_inverse_snr(prediction_type):
    """fake_loss=x0 (DMD's ||mu_fake - x0||^2) weighs each sample's eps error by 1 / SNR(t) = sigma^2 / alpha^2, so
    the high t where colours and layout are decided carry the loss; fake_loss=eps is the network's own target."""
    from distill.diffusion import NoiseSchedule, add_noise, to_x0_eps
    from distill.methods.dmd2 import denoising_target, fake_score_loss

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                       "beta_schedule": "scaled_linear", "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([10, 200, 400, 600, 800, 999])
    x_t = add_noise(x0, eps, t, sched)
    out = denoising_target(x0, eps, t, sched) + 0.1 * torch.randn(6, 4, 3, 3, generator=g)  # an imperfect net
    eps_hat = to_x0_eps(out, x_t, t, sched)[1]
    snr = (sched.alpha(t, x0) / sched.sigma(t, x0)) ** 2
    want = ((eps_hat - eps) ** 2 / snr).mean()
    assert torch.allclose(fake_score_loss(out, x_t, x0, eps, t, sched, "x0"), want, rtol=1e-4)
    assert torch.allclose(fake_score_loss(out, x_t, x0, eps, t, sched, "eps"),
                          ((out - denoising_target(x0, eps, t, sched)) ** 2).mean())
    per_t = ((eps_hat - eps) ** 2 / snr).mean(dim=(1, 2, 3))
    assert per_t[-1] > 50 * per_t[0]  # the last timestep's error outweighs the first's


# -- configuration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("method.student_timesteps=[249,499]", "method.student_timesteps"),
    ("method.student_timesteps=[1000]", "method.student_timesteps"),
    ("method.t_max=1000", "method.t_min"),
    ("method.gan_fake_weight=0", "method.gan_generator_weight"),
    ("method.generator_every_n_steps=0", "method.generator_every_n_steps"),
    ("trainer.validation_steps=[8]", "trainer.validation_steps"),
    ("method.fake.scheduler=exp", "method.fake.scheduler"),
    ("method.fake_loss=v", "method.fake_loss"),
    ("method.one_step_timestep=749", "method.one_step_timestep"),
    ("method.one_step_timestep=1000", "method.one_step_timestep"),
    ("method.one_step_timestep=399 method.student_timesteps=[999] trainer.validation_steps=[1]",
     "method.one_step_timestep"),
])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["+experiment=dmd2_tiny", *override.split()]))


def test_optimizers_two_time_scales_own_settings():
    _, _, m = _method("method.generator_every_n_steps=3", "method.fake.lr=3e-4", "method.fake.betas=[0.0,0.99]",
                      "method.generator.weight_decay=0.01")
    g, fake = m.optimizers()
    assert (g.name, g.every_n_steps, g.primary, fake.name, fake.every_n_steps) == ("g", 3, True, "fake", 1)
    assert g.overrides == {"lr": 2e-6, "weight_decay": 0.01} and fake.overrides == {"lr": 3e-4, "betas": [0.0, 0.99]}
    m.optimizer_specs = [g, fake]
    assert [m.phases(s) for s in range(4)] == [("g", "fake"), ("fake",), ("fake",), ("g", "fake")]
    head = {id(p) for p in m.fake.heads.parameters()}
    assert head <= {id(p) for p in fake.groups()[0]["params"]}, "the GAN head trains with the fake score"


# -- isolation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_each_phase_trains_only_its_own_network(lora):
    extra = ["method.lora.enabled=true", "method.lora.rank=4"] if lora else []
    _, comps, m = _method(*extra)
    gen = [p for p in m.trainable]
    fake = [p for p in m.fake.parameters()]
    teacher = [p for n, p in m.teacher.named_parameters() if "lora_" not in n]
    batch = _batch(comps, side=_side(m))
    for phase, trained, untouched in (("g", gen, fake), ("fake", fake, gen)):
        for p in gen + fake + teacher:
            p.grad = None
        with m.phase_scope(phase):
            m.losses(batch, phase, 1)["loss"].backward()  # step 1: k >= 0 simulated steps
        assert all(p.grad is None for p in untouched + teacher), f"{phase} leaked gradients"
        assert sum(float(p.grad.abs().sum()) for p in trained if p.grad is not None) > 0, f"{phase} trained nothing"
    assert all(p.requires_grad for p in fake), "phase_scope restores the fake score's flags"
    assert all(p.grad is not None for p in m.fake.heads.parameters()), "the fake phase trains the GAN head"


def test_backward_simulation_runs_the_generator_from_pure_noise_at_the_student_timesteps():
    _, comps, m = _method("method.one_step_timestep=null")
    batch = _batch(comps, side=_side(m))
    calls = []
    hook = m.generator.register_forward_pre_hook(lambda mod, args: calls.append(int(args[1][0])))
    try:
        for step in range(40):
            k = m.simulated_steps(step)
            calls.clear()
            x, t = m.generator_input(batch, step)
            assert calls == [999, 749, 499, 249][:k] and (t == [999, 749, 499, 249][k]).all()
            if k == 0:  # pure noise in, as the sampler starts
                assert torch.equal(x, batch.randn("z", tuple(batch.latents.shape[1:]), x.device))
    finally:
        hook.remove()
    ks = {m.simulated_steps(s) for s in range(40)}
    assert ks == {0, 1, 2, 3}, "k is drawn uniformly over the student's steps"


def test_a_one_step_mode_is_one_more_slot_of_backward_simulation_from_pure_noise_at_its_own_timestep():
    """method.one_step_timestep: k in [0, K]; k = K is G's one step from pure noise at 399 (no simulated steps),
    the rest is the 4-step chain as before (the same k for the same step where both draw below K)."""
    _, comps, m = _method("method.one_step_timestep=399")
    batch = _batch(comps, side=_side(m))
    calls = []
    hook = m.generator.register_forward_pre_hook(lambda mod, args: calls.append(int(args[1][0])))
    try:
        seen = set()
        for step in range(60):
            k = m.simulated_steps(step)
            seen.add(k)
            calls.clear()
            x, t = m.generator_input(batch, step)
            if k == 4:
                assert calls == [] and (t == 399).all()
                assert torch.equal(x, batch.randn("z", tuple(batch.latents.shape[1:]), x.device))
            else:
                assert calls == [999, 749, 499, 249][:k] and (t == [999, 749, 499, 249][k]).all()
    finally:
        hook.remove()
    assert seen == {0, 1, 2, 3, 4}
    spec = m.sampler()
    assert spec.steps == (1, 4) and spec.timesteps == {4: (999, 749, 499, 249), 1: (399,)}


def test_a_one_step_mode_takes_the_regression_warm_up_at_its_own_timestep():
    """The pair regression warm-up, allowed for a multi-step student with a 1-step mode, regresses G's one step
    from each pair's noise at one_step_timestep (what its 1-step sampler runs), not at the chain's first 999."""
    import dataclasses

    cfg = validate(compose_cfg(["+experiment=dmd2_tiny"]))  # as shipped: 4 steps, a 1-step mode, a warm-up
    assert cfg.method.regression.steps > 0 and cfg.method.one_step_timestep == 399
    _, comps, m = _method("method.one_step_timestep=399", "method.regression.keep_weight=0")
    m.regression = True
    batch = _batch(comps, side=_side(m))
    batch = dataclasses.replace(batch, noise=torch.randn_like(batch.latents))
    calls = []
    hook = m.generator.register_forward_pre_hook(lambda mod, args: calls.append((args[0], int(args[1][0]))))
    try:
        m.losses(batch, "g", 0)["loss_regression"]
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][1] == 399 and torch.equal(calls[0][0], batch.noise)


def test_the_warm_up_keeps_the_chain_on_the_teacher_with_keep_weight():
    """regression.keep_weight adds MSE(G, teacher) at pair latents noised to the chain's timesteps: 0 while G is
    the teacher, > 0 once G moved; only a student with a 1-step mode takes it (a ConfigError naming the key)."""
    import dataclasses

    _, comps, m = _method("method.one_step_timestep=399", "method.regression.keep_weight=2.0")
    m.regression = True
    batch = _batch(comps, side=_side(m))
    batch = dataclasses.replace(batch, noise=torch.randn_like(batch.latents))
    calls = []
    hook = m.generator.register_forward_pre_hook(lambda mod, args: calls.append(args[1].tolist()))
    try:
        out = m.losses(batch, "g", 0)
    finally:
        hook.remove()
    assert float(out["loss_keep"]) == 0 and torch.allclose(out["loss"], out["loss_regression"])
    assert calls[0] == [399] * 4 and set(calls[1]) <= {999, 749, 499, 249}
    with torch.no_grad():
        next(p for p in m.generator.parameters() if p.ndim == 4).add_(0.05)
    out = m.losses(batch, "g", 0)
    assert float(out["loss_keep"]) > 0
    torch.testing.assert_close(out["loss"], out["loss_regression"] + 2.0 * out["loss_keep"])
    for bad in (["+experiment=dmd2_tiny", "method.regression.keep_weight=-1"],  # a 1-step student has no chain:
                ["+experiment=dmd2_1step_tiny", "method.regression.keep_weight=1"],
                ["+experiment=sim_tiny", "method.regression.keep_weight=1"]):
        with pytest.raises(ConfigError, match=r"method\.regression\.keep_weight"):
            validate(compose_cfg(bad))


def test_keep_target_init_holds_the_chain_on_the_generator_as_the_warm_up_started(tmp_path):
    """keep_target=init (a generator whose chain an earlier stage distilled: Hyper-SD's score warm-up): the keep
    term's reference is a frozen copy of G at the warm-up's start, not the teacher: moving the teacher leaves it at
    0, moving G raises it, and the copy never trains; a keep_target outside teacher | init names the key."""
    import dataclasses

    from distill.stages import Stage

    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "0.tar").write_bytes(b"")  # a folder that holds shards (not read here)
    cfg, comps, _ = _method("method.one_step_timestep=399", "method.regression.keep_weight=1.0",
                            "method.regression.keep_target=init", f"method.regression.pairs.shards={tmp_path}/pairs",
                            "method.regression.pairs.prompts=null")
    from distill.methods import build_method

    m = build_method(cfg, comps, torch.device("cpu"), stage=Stage("regression", 0, tmp_path / "s",
                                                                   info={"phase": "regression"}))
    assert m.regression and m.keep_ref is not None and m.keep_ref is not m.generator
    assert not any(p.requires_grad for p in m.keep_ref.parameters())
    assert {id(p) for p in m.keep_ref.parameters()}.isdisjoint(id(p) for p in m.trainable)
    batch = _batch(comps, side=_side(m))
    batch = dataclasses.replace(batch, noise=torch.randn_like(batch.latents))
    with torch.no_grad():
        next(p for p in m.teacher.parameters() if p.ndim == 4).add_(0.05)
    assert float(m.losses(batch, "g", 0)["loss_keep"]) == 0  # the teacher is not the reference
    with torch.no_grad():
        next(p for p in m.generator.parameters() if p.ndim == 4).add_(0.05)
    assert float(m.losses(batch, "g", 0)["loss_keep"]) > 0
    with pytest.raises(ConfigError, match=r"method\.regression\.keep_target"):
        validate(compose_cfg(["+experiment=dmd2_tiny", "method.regression.keep_target=student"]))


def test_without_backward_simulation_the_input_is_a_noised_data_latent():
    from distill.diffusion import add_noise

    _, comps, m = _method("method.backward_simulation=false")
    batch = _batch(comps, side=_side(m))
    x, t = m.generator_input(batch, 3)
    want = add_noise(batch.latents, batch.randn("eps_in", tuple(batch.latents.shape[1:]), x.device), t, m.schedule, pure_noise_at_T=True)
    assert torch.equal(x, want)


# -- the loop: cadence across a resume, logs, export ------------------------------------------------------------
def test_cadence_resumes_exactly_and_logs_each_side(tiny_data, tmp_path):
    """7 steps straight equal 3 steps then a resume to 7, bit for bit: the generator (stepped at 0 and 5 with
    method.generator_every_n_steps=5), the fake score, both optimizers and their warm-ups (3 of each optimizer's
    OWN steps; the logged lr is the next step's). A constant schedule: a
    decaying one's length follows trainer.max_steps, which the resume changes."""
    base = ["+experiment=dmd2_tiny", *FAST, "trainer.checkpoint_every_steps=1", "optim.scheduler=constant",
            "optim.warmup_steps=3", "method.generator_every_n_steps=5"]
    straight = train([*base, f"output_dir={tmp_path}/a", "trainer.max_steps=7"])
    train([*base, f"output_dir={tmp_path}/b", "trainer.max_steps=3"])
    resumed = train([*base, f"output_dir={tmp_path}/b", "trainer.max_steps=7", "resume=latest"])
    for name in ("model.safetensors", "model_1.safetensors"):  # generator, fake score (+ head)
        a, b = weights(straight, 7, name), weights(resumed, 7, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    g_rows = [r["step"] for r in rows if "train/loss_dm" in r]
    assert g_rows == [1, 6], "the generator steps at outer steps 0 and 5"
    assert all("train/fake_loss_denoise" in r and "train/fake_loss_d" in r for r in rows)
    assert all(math.isfinite(r["train/fake_loss"]) for r in rows)
    g_lr = 2e-6  # dmd2_tiny's method.generator.lr; the fake score's is optim.lr (1e-4)
    assert [r["train/lr_g"] for r in rows if "train/lr_g" in r] == pytest.approx([2 * g_lr / 3, g_lr])
    assert [r["train/lr_fake"] for r in rows][:3] == pytest.approx([2e-4 / 3, 1e-4, 1e-4])


@pytest.mark.parametrize("steps, one_step", [(4, None), (1, None), (1, 399)])
def test_export_samples_in_the_diffusers_pipeline_as_distill_does(tiny_data, tmp_path, steps, one_step):
    """The exported generator and its sampler spec (LCMScheduler at explicit timesteps) in the diffusers SDXL
    pipeline give the images distill's own sampler gives; a 4-step student with a 1-step mode samples 1 step at
    its own timestep and names both in its card."""
    from distill.export import read_export

    ts = "[999,749,499,249]" if steps == 4 or one_step else "[399]"
    extra = [f"method.one_step_timestep={'null' if one_step is None else one_step}"]
    run = train(["+experiment=dmd2_tiny", *FAST, f"output_dir={tmp_path}/run", "trainer.max_steps=2",
                 "model.pretrained=distill:tiny-world", "trainer.export_at_end=true", "trainer.export_dtype=fp32",
                 f"method.student_timesteps={ts}", f"trainer.validation_steps=[{steps}]", *extra])
    info, spec = read_export(run / "export")
    want = {len(json.loads(ts)): tuple(json.loads(ts))}
    if one_step is not None:
        want[1] = (one_step,)
    assert info["method"] == "dmd2" and spec.kind == "lcm" and spec.timesteps == want
    card = (run / "export" / "README.md").read_text()
    assert f"timesteps={json.loads(ts)}" in card
    if one_step is not None:
        assert f"timesteps=[{one_step}]" in card, "the card names the 1-step timestep"
        assert f"num_inference_steps=1, guidance_scale=1, timesteps=[{one_step}])" in card  # its pipeline call
    assert_pipeline_samples_as_distill(run / "export", steps)


def test_lora_generator_trains_on_one_base_and_exports_a_lora(tiny_data, tmp_path):
    run = train(["+experiment=dmd2_tiny", *FAST, f"output_dir={tmp_path}/run", "trainer.max_steps=2",
                 "method.lora.enabled=true", "method.lora.rank=4", "trainer.export_at_end=true"])
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["method"] == "dmd2-lora" and (run / "export" / "lora" / "pytorch_lora_weights.safetensors").exists()
