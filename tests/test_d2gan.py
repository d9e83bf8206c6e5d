"""Diffusion2GAN and the latent perceptual distance it trains with: the net's properties, the shipped tiny net
against the decoded-image distance it was trained on (and against plain latent L2), the ensemble augmentation, the
isolation of G and D, the text-alignment fakes, config errors, and the one-step export in diffusers."""

import json

import pytest
import torch

from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from distill.config import ConfigError, validate
from distill.models.latent_perceptual import LatentPerceptual, LatentPerceptualConfig, augment_pair

FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4",
        "method.head_channels=8", "method.pairs.prompts=null"]


def _lat(n=4, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- the latent perceptual net ---------------------------------------------------------------------------------
def test_latent_distance_is_zero_on_equal_inputs_symmetric_and_grows_with_the_error():
    torch.manual_seed(0)
    net = LatentPerceptual(LatentPerceptualConfig(widths=[8, 16]))
    a, e = _lat(), _lat(seed=1)
    assert net(a, a).abs().max() < 1e-6
    torch.testing.assert_close(net(a, a + 0.3 * e), net(a + 0.3 * e, a))
    d = [float(net(a, a + s * e).mean()) for s in (0.05, 0.2, 0.8)]
    assert d[0] < d[1] < d[2]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert net(a, a, ensemble=True, generators=gens).abs().max() < 1e-6  # the SAME transform on both


def test_the_ensemble_augmentation_is_per_sample_differentiable_and_shared_by_both_inputs():
    a, b = _lat().requires_grad_(True), _lat(seed=1)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    xa, xb = augment_pair(a, b, gens())
    ya, yb = augment_pair(a[2:], b[2:], gens()[2:])  # sample i's draw does not depend on the batch around it
    torch.testing.assert_close(xa[2:], ya)
    torch.testing.assert_close(xb[2:], yb)
    za, _ = augment_pair(a, a, gens())
    torch.testing.assert_close(xa, za)  # a's transform is the one b gets
    assert not torch.equal(xa, a)  # something happened (shift, flip or cutout)
    xa.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_a_saved_net_loads_back_and_a_wrong_folder_is_named(tmp_path):
    torch.manual_seed(0)
    net = LatentPerceptual(LatentPerceptualConfig(widths=[8, 16], info={"model": "x"}))
    net.save_pretrained(tmp_path / "net")
    back = LatentPerceptual.from_pretrained(tmp_path / "net")
    a, b = _lat(), _lat(seed=2)
    torch.testing.assert_close(back(a, b), net(a, b))
    assert back.config.info == {"model": "x"}
    with pytest.raises(FileNotFoundError, match="method.perceptual=.*not a latent perceptual net folder"):
        LatentPerceptual.from_pretrained(tmp_path)


def test_the_ssim_target_sees_blur_that_the_l1_target_barely_sees():
    import torch.nn.functional as F

    from distill.methods.latent_lpips import image_distance, ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    blurred, offset = F.avg_pool2d(x, 3, 1, 1), (x + 0.05).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    assert (ssim(x, blurred) < 0.5).all() and (ssim(x, offset) > 0.95).all()
    l1 = image_distance(x, blurred, [1, 2]), image_distance(x, offset, [1, 2])
    both = image_distance(x, blurred, [1, 2], 1.0), image_distance(x, offset, [1, 2], 1.0)
    assert (both[0] / both[1] > 2 * l1[0] / l1[1]).all()  # the SSIM term ranks blur far above a uniform offset
    torch.testing.assert_close(image_distance(x, x, [1, 2], 1.0), torch.zeros(4))
    with pytest.raises(ConfigError, match="method.ssim_weight=-1"):
        validate(compose_cfg(["+experiment=latent_lpips_tiny", "method.ssim_weight=-1"]))


def _heldout_pairs(tiny_data, n=96):
    """(a, b, decoded-image distance) on held-out images, for the distortions the net was trained on."""
    from distill.data.config import DataConfig
    from distill.data.wds import OnceLoader
    from distill.methods.base import Batch
    from distill.methods.latent_lpips import LatentLPIPS, pixel_distance
    from distill.models import load_components

    cfg = validate(compose_cfg(["+experiment=latent_lpips_tiny"]))
    comps = load_components(cfg.model.pretrained, parts=("unet", "vae"))
    m = LatentLPIPS(cfg, comps, torch.device("cpu"))
    loader = OnceLoader(DataConfig(kind="images", shards=str(tiny_data / "tiny_world" / "heldout" / "00000.tar"),
                                   batch_size=n, resolution=32, num_workers=0, shuffle_buffer=0),
                        rank=0, world_size=1)
    pixels = next(iter(loader))["pixels"]
    a = m.encode(pixels)
    b, _ = m.distort(a, Batch(latents=None, cond=None, captions=[""] * len(a), seeds=list(range(len(a)))))
    return a, b, pixel_distance(m.decode(a), m.decode(b), [1, 2, 4])


def _concordance(d, target):
    dd, dt = d[:, None] - d[None, :], target[:, None] - target[None, :]
    off = ~torch.eye(len(d), dtype=torch.bool)
    return float(((dd * dt) > 0)[off].float().mean())


@torch.no_grad()
def test_the_shipped_tiny_net_orders_held_out_errors_like_the_decoded_images_and_better_than_latent_l2(tiny_data):
    net = LatentPerceptual.from_pretrained("distill:tiny-latent-lpips").eval()
    a, b, target = _heldout_pairs(tiny_data)
    ours = _concordance(net(a, b), target)
    l2 = _concordance((a - b).pow(2).mean(dim=(1, 2, 3)), target)
    assert ours > 0.85 and ours > l2 + 0.02, (ours, l2)


# -- the method ------------------------------------------------------------------------------------------------
def _method(tmp_path, *overrides: str):
    from distill.methods import build_method
    from distill.models import load_components

    net = tmp_path / "net"
    if not net.exists():
        torch.manual_seed(0)
        LatentPerceptual(LatentPerceptualConfig(widths=[8, 16])).save_pretrained(net)
    cfg = validate(compose_cfg(["+experiment=d2gan_tiny", *FAST, f"method.perceptual={net}", *overrides]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    torch.manual_seed(0)
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


def _batch(comps, b=4):
    from distill.diffusion import UNetCond
    from distill.methods.base import Batch
    from distill.methods.discriminator import latent_side

    side = latent_side(comps, 32)
    g = torch.Generator().manual_seed(0)
    c = comps.unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = UNetCond(torch.randn(b, 77, c.cross_attention_dim, generator=g), torch.randn(b, pooled, generator=g),
                    torch.tensor([[32.0, 32, 0, 0, 32, 32]] * b))
    return Batch(latents=torch.randn(b, 4, side, side, generator=g), cond=cond, captions=["x"] * b,
                 seeds=list(range(b)), noise=torch.randn(b, 4, side, side, generator=g))


@pytest.mark.parametrize("lora", [False, True])
def test_each_phase_trains_only_its_own_network(tmp_path, lora):
    _, comps, m = _method(tmp_path, *(["method.lora.enabled=true", "method.lora.rank=4"] if lora else []))
    gen, disc = list(m.trainable), list(m.discriminator.parameters())
    frozen = [p for n, p in m.teacher.named_parameters() if "lora_" not in n] + list(m.perceptual.parameters())
    batch = _batch(comps)
    for phase, trained, untouched in (("g", gen, disc), ("d", disc, gen)):
        for p in gen + disc + frozen:
            p.grad = None
        with m.phase_scope(phase):
            out = m.losses(batch, phase, 0)
            out["loss"].backward()
        assert all(p.grad is None for p in untouched + frozen), f"{phase} leaked gradients"
        assert sum(float(p.grad.abs().sum()) for p in trained if p.grad is not None) > 0, f"{phase} trained nothing"
    assert all(p.requires_grad for p in disc), "phase_scope restores D's flags"
    assert {"loss_regression", "loss_gan"} <= set(m.losses(batch, "g", 0))
    assert len(m.discriminator.heads) == len(m.teacher.up_blocks)  # a head per decoder resolution


def test_the_discriminator_sees_real_fake_and_real_with_another_prompt(tmp_path):
    _, comps, m = _method(tmp_path)
    batch = _batch(comps)
    seen = []
    d = m.modules["discriminator"]
    orig = d.forward

    def spy(x, t, cond, **kw):
        seen.append((x.detach().clone(), cond))
        return orig(x, t, cond, **kw)

    d.forward = spy
    out = m.losses(batch, "d", 0)
    (x, cond), = seen
    b = batch.size
    torch.testing.assert_close(x[:b], batch.latents)
    torch.testing.assert_close(x[2 * b:], batch.latents)
    torch.testing.assert_close(cond.encoder_hidden_states[2 * b:], batch.cond.encoder_hidden_states.roll(1, 0))
    torch.testing.assert_close(cond.encoder_hidden_states[:b], batch.cond.encoder_hidden_states)
    with torch.no_grad():
        fake = m._generate(m.g_raw, batch)
    torch.testing.assert_close(x[b:2 * b], fake)
    assert {"loss_d", "logit_real", "logit_fake", "logit_mismatch"} <= set(out)


def test_without_the_gan_there_is_no_discriminator_and_l2_needs_no_net(tmp_path):
    _, _, m = _method(tmp_path, "method.gan_weight=0", "method.distance=l2", "method.perceptual=null")
    assert m.discriminator is None and m.perceptual is None
    assert [s.name for s in m.optimizers()] == ["g"] and set(m.modules) == {"generator"}


@pytest.mark.parametrize("override,key", [
    ("data.kind=images", "data.kind=images"),
    ("method.distance=lpips", "method.distance='lpips'"),
    ("trainer.validation_steps=[4]", "trainer.validation_steps=[4]"),
    ("method.timestep=1000", "method.timestep=1000"),
    ("method.perceptual_decay_steps=-1", "method.perceptual_decay_steps=-1"),
    ("method.perceptual_decay_steps=100 method.latent_l2_weight=0", "method.perceptual_decay_steps=100"),
])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_cfg(["+experiment=d2gan_tiny", *override.split()]))


@pytest.mark.parametrize("lora", [False, True])
def test_d2gan_trains_on_pairs_it_writes_itself_and_exports_a_one_step_generator(tiny_data, tmp_path, lora):
    """d2gan_tiny as shipped, shortened: the run writes its pairs from the prompt list (no image read), trains G and
    D, and the export samples in the diffusers pipeline as distill's sampler does."""
    run = tmp_path / "run"
    train(["+experiment=d2gan_tiny", "+debug=fast", "trainer.validation_prompts=[]", "data.batch_size=4",
           "method.head_channels=8", "method.pairs.num_pairs=8", "method.pairs.solver_steps=2",
           f"data.shards={tmp_path}/pairs", f"output_dir={run}",
           *(["method.lora.enabled=true", "method.lora.rank=4"] if lora else [])])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(r.get("data/images_read", 0) == 0 for r in rows)
    assert any("train/g_loss_regression" in r or "train/loss_regression" in r for r in rows)
    assert json.loads((tmp_path / "pairs" / "summary.json").read_text())["pairs"] == 8
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["method"] == ("d2gan-lora" if lora else "d2gan") and info["sampler"]["timesteps"] == {"1": [399]}
    assert_pipeline_samples_as_distill(run / "export", 1)


def test_latent_lpips_trains_and_its_export_drives_d2gan(tiny_data, tmp_path):
    net_run = train(["+experiment=latent_lpips_tiny", "+debug=fast", f"output_dir={tmp_path}/net"])
    rows = [json.loads(x) for x in (net_run / "metrics.jsonl").read_text().splitlines()]
    assert "train/rank_agreement" in rows[-1]
    LatentPerceptual.from_pretrained(net_run / "export")
    run = train(["+experiment=d2gan_tiny", *FAST[:-1], "method.pairs.num_pairs=8", "method.pairs.solver_steps=2",
                 f"data.shards={tmp_path}/pairs", f"method.perceptual={net_run}/export", f"output_dir={tmp_path}/g"])
    assert (run / "checkpoints" / "step_2").exists()


def test_the_hybrid_distance_adds_latent_l2_to_the_perceptual_one(tmp_path):
    from distill.methods.pairs import regression_distance

    _, comps, m = _method(tmp_path, "method.ensemble=false", "method.latent_l2_weight=0")
    batch = _batch(comps)
    x0, target = batch.noise, batch.latents
    perceptual = m.distance(x0, target, batch)
    torch.testing.assert_close(perceptual, m.perceptual(x0, target).mean())
    m.cfg.method.latent_l2_weight = 2.0
    torch.testing.assert_close(m.distance(x0, target, batch),
                               perceptual + 2.0 * regression_distance(x0, target, "l2", 0.03))


def test_the_perceptual_term_decays_to_latent_l2_alone_and_the_net_then_is_not_run(tmp_path):
    from distill.methods.pairs import regression_distance

    _, comps, m = _method(tmp_path, "method.ensemble=false", "method.latent_l2_weight=1",
                          "method.perceptual_decay_steps=100")
    batch = _batch(comps)
    x0, target = batch.noise, batch.latents
    perceptual, l2 = m.perceptual(x0, target).mean(), regression_distance(x0, target, "l2", 0.03)
    torch.testing.assert_close(m.distance(x0, target, batch, 0), perceptual + l2)
    torch.testing.assert_close(m.distance(x0, target, batch, 25), 0.75 * perceptual + l2)
    calls = []
    m.perceptual.register_forward_hook(lambda *a: calls.append(1))
    for step in (100, 400):
        torch.testing.assert_close(m.distance(x0, target, batch, step), l2)
    assert calls == []
