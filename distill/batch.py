"""What a method sees of the data: `Batch` (latents, UNet conditioning, captions, pixels, per-sample seeds) and
`to_batch`, the encode stage between the loader's raw dicts and the method (VAE and text encoders when the shards
hold images, SDXL micro-conditioning). The trainer calls it without knowing input kinds or architectures."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.diffusion import UNetCond

PIXELS, LATENTS, PROMPTS = "pixels", "latents", "prompts"
TEXT = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
ENCODERS = ("vae", *TEXT)


@dataclass
class Batch:
    """One training batch as methods see it: latents and UNet conditioning (or raw pixels for a VAE)."""

    latents: Tensor | None
    cond: UNetCond | None
    captions: list[str]
    pixels: Tensor | None = None
    noise: Tensor | None = None  # data.kind=pairs: the noise the teacher's ODE solve of `latents` started from
    states: Tensor | None = None  # pairs with states: (B, K, C, h, w), x on the solve's path at state_timesteps
    state_timesteps: Tensor | None = None  # (B, K)
    seeds: list[int] = field(default_factory=list)  # one per sample: its random draws never depend on batching

    def generators(self, tag: str) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by (sample seed, tag): each draw of a step has its own tag, so
        a sample's noise, timestep and w depend only on the run seed, the step and the sample, not on batch
        size, process count or call order (this is what makes 1 and 2 processes train alike)."""
        return [torch.Generator().manual_seed(_mix(s, tag)) for s in self.seeds]

    def randn(self, tag: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators(tag)]).to(device)

    def rand(self, tag: str, device: torch.device) -> Tensor:
        return torch.stack([torch.rand((), generator=g) for g in self.generators(tag)]).to(device)

    def randint(self, tag: str, low: int, high: int, device: torch.device) -> Tensor:
        return torch.stack([torch.randint(low, high, (), generator=g) for g in self.generators(tag)]).to(device)

    def state_at(self, t: Tensor) -> Tensor:
        """x on each sample's teacher trajectory at timestep t[i] (trajectory-state data: MLCM's x_t)."""
        if self.states is None:
            raise ValueError("trajectory states are needed (method.trajectory=true): pair shards written with "
                             "`python -m distill.prepare pairs --states` (data.kind=pairs)")
        hit = self.state_timesteps.to(t.device) == t[:, None]
        if not bool(hit.any(1).all()):
            missing = sorted(set(t[~hit.any(1)].tolist()))
            raise ValueError(f"timesteps {missing} are not on the pairs' trajectory (its timesteps: "
                             f"{self.state_timesteps[0].tolist()}): write the pairs with as many DDIM steps as the "
                             "method's skip grid (method.num_ddim_timesteps)")
        idx = hit.float().argmax(1)
        return self.states[torch.arange(len(t), device=self.states.device), idx.to(self.states.device)]

    @property
    def size(self) -> int:
        ref = self.latents if self.latents is not None else self.pixels
        return ref.shape[0] if ref is not None else len(self.captions)


def _mix(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{tag}".encode(), digest_size=8).digest(), "little") >> 1


def sample_seed(run_seed: int, step: int, key: str) -> int:
    """The seed of one sample's random draws at one step: from the sample key alone (not its shard), so the
    same sample read from image shards or from precomputed latent shards gets the same noise."""
    return _mix(run_seed, f"{step}/{key}")


def needed_parts(input_kind: str, data_kind: str) -> tuple[str, ...]:
    """The components to load for a method's input kind from this kind of shards."""
    if input_kind == PIXELS:
        return ("unet", "vae")
    if input_kind == PROMPTS:  # conditioning only: text encoders unless the shards hold the embeddings
        return ("unet",) if data_kind in ("latents", "pairs") else ("unet", *TEXT)
    if input_kind == LATENTS and data_kind == "images":
        return ("unet", *ENCODERS)
    return ("unet",)


def to_batch(raw: dict, comps, input_kind: str, seeds: list[int], device: torch.device) -> Batch:
    """A loader batch as a method's Batch: encode images and captions unless the shards hold latents."""
    from distill.models import encode_images, encode_prompts, time_ids

    if input_kind == PIXELS:
        return Batch(latents=None, cond=None, captions=raw["caption"], pixels=raw["pixels"].to(device), seeds=seeds)
    ids = time_ids(raw["original_size"], raw["crop_top_left"], raw["target_size"]).to(device)
    if "latents" in raw:
        lat, emb, pooled = raw["latents"], raw["prompt_embeds"], raw.get("pooled_prompt_embeds")
        # a data-free method sees no data latent; a teacher ODE pair's latent is the teacher's own sample (its warm-up)
        lat = None if input_kind == PROMPTS and "noise" not in raw else lat
    elif input_kind == PROMPTS or "pixels" not in raw:  # a data-free method: captions only, never an image
        lat = None
        emb, pooled = encode_prompts(comps, raw["caption"])
    else:
        lat = encode_images(comps, raw["pixels"])
        emb, pooled = encode_prompts(comps, raw["caption"])
    sdxl = comps.arch == "sdxl"
    cond = UNetCond(encoder_hidden_states=emb.to(device, torch.float32),
                    text_embeds=pooled.to(device, torch.float32) if sdxl else None,
                    time_ids=ids if sdxl else None)
    noise = raw["noise"].to(device, torch.float32) if "noise" in raw else None
    states = raw["states"].to(device, torch.float32) if "states" in raw else None
    return Batch(latents=None if lat is None else lat.to(device, torch.float32), cond=cond,
                 captions=list(raw["caption"]), seeds=seeds, noise=noise, states=states,
                 state_timesteps=raw.get("state_timesteps"))


def prompt_cond(comps, prompts: list[str], resolution: int, device: torch.device) -> UNetCond:
    """UNet conditioning for prompts at a square resolution (validation grids): SDXL's micro-conditioning says
    original = target = (res, res), no crop."""
    from distill.models import encode_prompts

    emb, pooled = encode_prompts(comps, prompts)
    sdxl = comps.arch == "sdxl"
    n, res = len(prompts), resolution
    ids = torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32) if sdxl else None
    return UNetCond(encoder_hidden_states=emb, text_embeds=pooled if sdxl else None, time_ids=ids).to(
        device, torch.float32)
