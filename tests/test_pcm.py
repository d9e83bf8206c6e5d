"""Segmented consistency distillation (PCM) on the method contract, on tiny SDXL-architecture models."""

import json

import pytest
import torch

from helpers import compose_cfg, train
from distill.config import ConfigError, validate

FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4"]


def _batch(comps, b: int = 6, seed: int = 0):
    from distill.diffusion import UNetCond
    from distill.methods.base import Batch

    g = torch.Generator().manual_seed(seed)
    d = comps.unet.config.cross_attention_dim
    pooled = comps.unet.config.projection_class_embeddings_input_dim - 6 * comps.unet.config.addition_time_embed_dim
    return Batch(latents=torch.randn(b, 4, 16, 16, generator=g), captions=["x"] * b, seeds=list(range(b)),
                 cond=UNetCond(torch.randn(b, 77, d, generator=g), torch.randn(b, pooled, generator=g),
                               torch.zeros(b, 6)))


def _method(experiment: str, *overrides: str):
    from distill.methods import build_method
    from distill.models import load_components

    lora = ["method.lora.rank=4"] if "lora" in experiment else []
    cfg = validate(compose_cfg([f"+experiment={experiment}", *FAST, *lora, *overrides]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    torch.manual_seed(0)
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


@pytest.mark.parametrize("lora", [True, False])
def test_one_segment_with_lcd_scalings_is_lcd_exactly(lora):
    """K = 1 with boundary=lcm gives LCD's loss on the same batch, bit for bit (same draws, same networks). The EMA
    of the full student is moved away from the student first, so a wrong target network would show."""
    lcd_exp, pcm_exp = ("lcm_lora_tiny", "pcm_lora_tiny") if lora else ("lcm_tiny", "pcm_tiny")
    shared = ["method.num_ddim_timesteps=10", "method.w_min=2", "method.w_max=8"]
    _, comps, lcd = _method(lcd_exp, *shared)
    _, _, pcm = _method(pcm_exp, *shared, "method.num_segments=1", "method.boundary=lcm")
    # the same weights in both: LoRA is randomly initialised (A) and the full student's EMA is perturbed
    pcm.student.load_state_dict(lcd.student.state_dict())
    if not lora:
        with torch.no_grad():
            for p in lcd.ema.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        pcm.ema.model.load_state_dict(lcd.ema.model.state_dict())
    for seed in range(3):
        batch = _batch(comps, seed=seed)
        a, b = lcd.losses(batch, "g", 0)["loss"], pcm.losses(batch, "g", 0)["loss"]
        assert torch.equal(a, b), (seed, float(a), float(b))


def test_edges_are_the_trailing_ddim_timesteps_and_grid_points():
    from distill.diffusion import inference_timesteps, lcm_skip_grid
    from distill.methods.pcm import lower_edge, segment_edges

    for n, k in [(8, 4), (40, 4), (50, 2), (20, 1), (40, 8), (10, 5)]:
        edges = segment_edges(1000, k)
        assert edges[0] == 0
        assert torch.equal(edges[1:].flip(0), inference_timesteps(k, "trailing", 1000))
        assert set(edges[1:].tolist()) <= set(lcm_skip_grid(1000, n).tolist())
    assert segment_edges(1000, 4).tolist() == [0, 249, 499, 749, 999]
    idx = torch.arange(8)  # grid 124, 249, ..., 999: two points per segment
    assert lower_edge(idx, 1000, 8, 4).tolist() == [0, 0, 249, 249, 499, 499, 749, 749]


@pytest.mark.parametrize("override, key", [("method.num_segments=3", "method.num_segments"),
                                           ("method.num_ddim_timesteps=7", "method.num_ddim_timesteps"),
                                           ("method.boundary=edm", "method.boundary"),
                                           ("method.target=ctm", "method.target")])
def test_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_cfg(["+experiment=pcm_lora_tiny", override]))


def test_target_at_the_edge_is_the_teachers_point_and_else_the_target_networks_jump():
    """A hand-written step: index n with t_{n-1} on the edge takes x_{t_{n-1}} itself as target; other indices take
    the stop-grad student's DDIM jump from x_{t_{n-1}} to the edge; the student jumps from x_{t_n}. A DDIM jump in
    place is the identity, so the rule decides the bottom segment (t_{n-1} = 0, the edge: the clean end)."""
    from distill.diffusion import add_noise, call_unet, ddim_step, guided_ddim_step, to_x0_eps
    from distill.methods.lcd import pseudo_huber
    from distill.models.adapters import adapters_disabled

    cfg, comps, m = _method("pcm_lora_tiny", "method.num_ddim_timesteps=8", "method.num_segments=4")
    with torch.no_grad():  # LoRA B starts at zero: give the student its own output, unlike the teacher's
        for name, p in m.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    b = 16
    batch = _batch(comps, b=b)
    loss = m.losses(batch, "g", 0)["loss"]
    dev = torch.device("cpu")
    idx = batch.randint("index", 0, 8, dev)
    assert len(set((idx % 2).tolist())) == 2 and (idx == 0).any(), "the batch holds every kind of index"
    t = (idx + 1) * 125 - 1
    s = t - 125
    s = s.clamp(min=0)
    edge = torch.tensor([0, 249, 499, 749])[idx // 2]
    x_t = add_noise(batch.latents, batch.randn("eps", (4, 16, 16), dev), t, m.schedule)
    w = torch.full((b,), 4.0)
    sch = m.schedule
    land = lambda x0, eps: ddim_step(x0, eps, torch.where(edge == 0, -1, edge), sch)
    with torch.no_grad():
        with adapters_disabled(m.student):
            x_s, _, _ = guided_ddim_step(m.student, x_t, t, s, batch.cond, batch.cond.zeros_like(), w, sch)
        jumped = land(*to_x0_eps(call_unet(m.student, x_s, s, batch.cond), x_s, s, sch))
        on_edge = (s == edge).view(-1, 1, 1, 1)
        assert on_edge.any() and not on_edge.all()
        target = torch.where(on_edge, x_s, jumped)
    pred = land(*to_x0_eps(call_unet(m.student, x_t, t, batch.cond), x_t, t, sch))
    torch.testing.assert_close(loss, pseudo_huber(pred, target, 1e-3), rtol=1e-5, atol=1e-7)
    # in place (s on an upper edge) the jump gives x_s back; at the bottom it lands on the clean end, not x_0
    inner, bottom = (on_edge.flatten() & (idx > 0)), idx == 0
    assert inner.any()
    torch.testing.assert_close(jumped[inner], x_s[inner], atol=1e-4, rtol=1e-4)
    assert (jumped[bottom] - x_s[bottom]).abs().max() > 1e-2


def test_tcd_target_jumps_inside_the_segment():
    cfg, comps, m = _method("pcm_lora_tiny", "method.target=tcd")
    batch = _batch(comps, b=32)
    idx = batch.randint("index", 0, 8, torch.device("cpu"))
    s = ((idx + 1) * 125 - 1 - 125).clamp(min=0)
    to = m.targets_of(batch, idx, s)
    edge = torch.tensor([0, 249, 499, 749])[idx // 2]
    assert bool(((edge <= to) & (to <= s)).all()) and bool((to > edge).any())
    assert torch.isfinite(m.losses(batch, "g", 0)["loss"])


@pytest.mark.parametrize("experiment", ["pcm_lora_tiny", "pcm_tiny"])
def test_loss_falls_on_a_fixed_batch(experiment):
    cfg, comps, m = _method(experiment)
    lr = 1e-3 if "lora" in experiment else 1e-4
    opt = torch.optim.Adam([p for g in m.optimizers()[0].groups() for p in g["params"]], lr=lr)
    batch, losses = _batch(comps, b=4), []
    for step in range(12):
        loss = m.losses(batch, "g", step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_one_step_costs_one_teacher_one_target_one_student():
    cfg, comps, m = _method("pcm_lora_tiny")
    calls = []
    comps.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    m.losses(_batch(comps, b=3), "g", 0)["loss"].backward()
    assert sorted(calls) == [3, 3, 6], calls


@pytest.mark.parametrize("experiment", ["pcm_lora_tiny", "pcm_tiny"])
def test_run_exports_and_the_diffusers_pipeline_samples_what_distill_samples(tiny_data, tmp_path, experiment):
    """The real loop (train, validate, export), then the card's pipeline (DDIMScheduler, trailing) on the export
    gives the images the method's own sampler gives on the same noise, and visits the segment edges."""
    from diffusers import DDIMScheduler

    from distill.diffusion import UNetCond, seeded_noise
    from distill.export import load_export
    from distill.models import decode_latents, encode_prompts, load_components
    extra = [] if "lora" in experiment else ["method.w_embedding_dim=32"]
    run = train([f"+experiment={experiment}", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
                 "trainer.export_dtype=fp32", *extra])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    assert list((run / "samples").glob("*.png"))
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["scheduler"] == "DDIMScheduler-trailing" and 4 in info["steps"]
    card = (run / "export" / "README.md").read_text()
    assert 'DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)' in card
    assert "sampler `ddim`, scheduler `sgm_uniform`" in card
    pipe = load_export(run / "export")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    gs = info["guidance_scale"]
    prompts, seeds = ["a red circle on a black background", "a blue square on a white background"], [3, 7]
    comps = load_components(info["teacher"])
    side = 32 // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    noise = seeded_noise(seeds, (2, 4, side, side))
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=gs, height=32, width=32, output_type="pt",
               latents=noise.clone()).images * 2 - 1
    emb, pooled = encode_prompts(comps, prompts)
    w_dim = pipe.unet.config.time_cond_proj_dim
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    from distill.diffusion import NoiseSchedule
    from distill.sampler import SamplerSpec

    spec = SamplerSpec.from_info(info)
    assert spec.kind == "ddim" and spec.guidance_scale == gs
    lat = spec.sample(pipe.unet, noise, cond, NoiseSchedule.from_config(comps.scheduler_config), 4, seeds,
                      w_dim=w_dim)
    torch.testing.assert_close(decode_latents(comps, lat), ref.clamp(-1, 1), atol=1e-4, rtol=0)
