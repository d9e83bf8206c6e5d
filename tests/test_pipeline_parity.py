"""distill's sampler against the diffusers pipeline end to end: same tiny SDXL model, scheduler and noise."""

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from distill.diffusion import NoiseSchedule, UNetCond, sample_teacher, seeded_noise
from distill.models import decode_latents, encode_prompts, load_components, resolve_model_path


def test_teacher_sampler_matches_diffusers_pipeline():
    path = resolve_model_path("distill:random-sdxl")
    comps = load_components(path)
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    seeds = [3, 7]
    noise = seeded_noise(seeds, (2, 4, 16, 16), "cpu", torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    # SDXL's own DDIM settings (the tiny folder stores an Euler config, which lacks these keys)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=False)
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, latents=noise.clone(),
               output_type="pt").images * 2 - 1
    emb, pooled = encode_prompts(comps, prompts)
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    lat = sample_teacher(comps.unet, noise, cond, cond.zeros_like(), schedule, 4, solver="ddim",
                         guidance_scale=5.0, spacing="trailing")
    ours = decode_latents(comps, lat)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), atol=1e-4, rtol=0)
