"""The sampler spec (distill.sampler): export.json round trips, and distill's sampler equals the diffusers pipeline
driven by the scheduler and call arguments the same spec names, for every kind."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from distill.card import model_card, scheduler_code
from distill.diffusion import NoiseSchedule, UNetCond, make_generators, seeded_noise
from distill.models import encode_prompts, load_components, resolve_model_path
from distill.sampler import SamplerSpec

SPECS = [SamplerSpec("lcm", (1, 2, 4), original_inference_steps=10),
         SamplerSpec("tcd", (2, 4), eta=0.3, original_inference_steps=50),
         SamplerSpec("tcd", (3,), eta=0.0, original_inference_steps=20, timesteps={3: (999, 599, 199)}),
         SamplerSpec("euler", (4,), prediction_type="epsilon"),
         SamplerSpec("euler", (1,), prediction_type="sample"),
         SamplerSpec("ddim", (4,), 5.0),
         SamplerSpec("ddim", (2,))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.steps}")
def test_info_round_trip(spec):
    info = spec.to_info()
    assert SamplerSpec.from_info(info) == spec
    flat = {k: v for k, v in info.items() if k != "sampler"}  # an export written before the `sampler` entry
    legacy = SamplerSpec.from_info(flat)
    assert (legacy.kind, legacy.steps, legacy.eta, legacy.guidance_scale) == (spec.kind, spec.steps, spec.eta,
                                                                              spec.guidance_scale)


def test_legacy_names_and_errors():
    pad = SamplerSpec.from_info({"scheduler": "EulerDiscreteScheduler-trailing-sample", "steps": [1]})
    assert pad.kind == "euler" and pad.predicts_x0 and pad.scheduler_kwargs()["prediction_type"] == "sample"
    lcm = SamplerSpec.from_info({"scheduler": "LCMScheduler", "steps": [4], "guidance_scale": 8.5})
    assert lcm.grid == 50 and lcm.guidance_scale == 8.5 and lcm.eta is None
    with pytest.raises(ValueError, match="scheduler='DPM'"):
        SamplerSpec.from_info({"scheduler": "DPM"})
    with pytest.raises(ValueError, match="kind='heun'"):
        SamplerSpec("heun")
    with pytest.raises(ValueError, match="TCD's gamma"):
        SamplerSpec("lcm", eta=0.5)
    with pytest.raises(ValueError, match="3 descending"):
        SamplerSpec("lcm", timesteps={3: (999, 499)})


def test_card_names_what_the_spec_samples():
    ddim = SamplerSpec("ddim", (2, 4, 8))
    info = {"method": "pcm", "teacher": "stabilityai/stable-diffusion-xl-base-1.0", "arch": "sdxl", **ddim.to_info()}
    assert scheduler_code(info) == ('pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, '
                                    'timestep_spacing="trailing", clip_sample=False)')
    card = model_card(info)
    assert "from diffusers import StableDiffusionXLPipeline, DDIMScheduler" in card
    assert "sampler `ddim`, scheduler `sgm_uniform`" in card and "sampler `DDIM`" in card
    tcd = SamplerSpec("tcd", (3,), eta=0.0, original_inference_steps=20, timesteps={3: (999, 599, 199)})
    card = model_card({"method": "x", "teacher": "t", "arch": "sdxl", **tcd.to_info()})
    assert "num_inference_steps=3, guidance_scale=1, eta=0, timesteps=[999, 599, 199]" in card
    assert "original_inference_steps=20" in card


@pytest.fixture(scope="module")
def world():
    path = resolve_model_path("distill:random-sdxl")
    comps = load_components(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    emb, pooled = encode_prompts(comps, prompts)
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    return comps, pipe, prompts, cond


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.steps}")
def test_distill_sampler_matches_the_pipeline_it_names(world, spec):
    comps, pipe, prompts, cond = world
    base = dict(comps.scheduler_config)
    pipe.scheduler = spec.scheduler(base)
    assert type(pipe.scheduler).__name__ == spec.scheduler_class
    seeds = [3, 7]
    noise = seeded_noise(seeds, (2, 4, 16, 16), "cpu", torch.float32)
    n = spec.steps[-1]
    # the pipeline draws its initial latents from the per-sample generators (= seeded_noise), then any step noise
    ref = pipe(prompts, height=32, width=32, generator=make_generators(seeds),
               output_type="latent", **spec.pipeline_kwargs(n)).images
    # the pipeline's own schedule: NoiseSchedule reads the same config the scheduler was built from
    ours = spec.sample(comps.unet, noise, cond, NoiseSchedule.from_config(dict(pipe.scheduler.config)), n, seeds,
                       uncond=cond.zeros_like())
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
