"""Two probes of a DMD2 run on the tiny world, from one of its checkpoints (or the teacher alone).

    python bench/dmd2_probe.py particles [--checkpoint RUN/checkpoints/step_N] [--guidance 5] [--eta 0.02] [--iters 20]
    python bench/dmd2_probe.py fake-error --checkpoint RUN/checkpoints/step_N [--k 3]

particles   Does the distribution-matching gradient point the right way? The generator's 4-step samples (the
            teacher's weights without --checkpoint) for the quick bench's 240 prompts and seeds are moved directly,
            no network in between: x0 <- x0 - eta * (x0_fake - x0_real) / mean|x0 - x0_real|, one t ~ U[20, 980] and
            fresh noise per sample per iteration, x0_real from the teacher at --guidance, x0_fake from the
            checkpoint's fake score (the teacher without one). FD and attribute accuracy as the walk goes.
fake-error  Is the fake score a better model of the generator's samples than the frozen teacher? The generator's
            output after k backward-simulation steps (k = 3: its 4-step samples), noised at t in four bands; the x0
            error of the fake score, the teacher and the teacher at CFG 5, per band.

A checkpoint folder holds the generator (model.safetensors) and the fake score (model_1.safetensors: `backbone.*`,
the GAN head beside it) as the trainer saves them for DMD2.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from quality import Bench

from distill.diffusion import Denoiser, add_noise
from distill.methods.dmd2 import dm_gradient
from distill.models import decode_latents

TIMESTEPS = (999, 749, 499, 249)
CHUNK = 80


def networks(teacher: torch.nn.Module, checkpoint: str | None):
    """(generator, fake score) from a DMD2 checkpoint; both the teacher without one."""
    if not checkpoint:
        return teacher, teacher
    from safetensors.torch import load_file

    gen, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    gen.load_state_dict(load_file(str(Path(checkpoint) / "model.safetensors")))
    state = load_file(str(Path(checkpoint) / "model_1.safetensors"))
    fake.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return gen, fake


@torch.no_grad()
def generator_outputs(b: Bench, gen: torch.nn.Module, k: int, seed: int = 2) -> torch.Tensor:
    """The generator's x0 after k backward-simulation steps from the bench's noise (k = 3: its 4-step samples)."""
    den, g, out = Denoiser(gen, b.schedule), torch.Generator().manual_seed(seed), []
    for i in range(0, len(b.seeds), CHUNK):
        sl = slice(i, i + CHUNK)
        c, x = b.cond.index(sl), b.noise[sl]
        n = x.shape[0]
        for j in range(k):
            x0 = den.x0_eps(x, torch.full((n,), TIMESTEPS[j]), c)[0]
            x = add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((n,), TIMESTEPS[j + 1]), b.schedule)
        out.append(den.x0_eps(x, torch.full((n,), TIMESTEPS[k]), c)[0])
    return torch.cat(out)


def scores(b: Bench, latents: torch.Tensor) -> dict:
    images = torch.cat([decode_latents(b.comps, latents[i:i + CHUNK]) for i in range(0, len(latents), CHUNK)])
    return b.metrics(images, None)


@torch.no_grad()
def particles(b: Bench, teacher, fake, x: torch.Tensor, guidance: float, eta: float, iters: int, seed: int = 1):
    real_den, fake_den = Denoiser(teacher, b.schedule), Denoiser(fake, b.schedule)
    g = torch.Generator().manual_seed(seed)
    print("start", scores(b, x), flush=True)
    for it in range(iters):
        grad = torch.zeros_like(x)
        for i in range(0, len(x), CHUNK):
            sl = slice(i, i + CHUNK)
            c, x0 = b.cond.index(sl), x[sl]
            t = torch.randint(20, 981, (x0.shape[0],), generator=g)
            x_t = add_noise(x0, torch.randn(x0.shape, generator=g), t, b.schedule)
            out = real_den.guided(x_t, t, c, c.zeros_like(), guidance, form="standard")
            x0_real = real_den.x0_eps(x_t, t, c, out)[0]
            x0_fake = fake_den.x0_eps(x_t, t, c)[0]
            grad[sl] = dm_gradient(x0, x0_real, x0_fake)
        x = x - eta * grad
        if (it + 1) % max(1, iters // 4) == 0:
            print(f"iteration {it + 1}", scores(b, x), flush=True)


@torch.no_grad()
def fake_error(b: Bench, teacher, fake, x: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t_den, f_den = Denoiser(teacher, b.schedule), Denoiser(fake, b.schedule)
    for lo, hi in [(0, 200), (200, 500), (500, 800), (800, 1000)]:
        err = {"fake": 0.0, "teacher": 0.0, "teacher_cfg5": 0.0}
        chunks = range(0, len(x), CHUNK)
        for i in chunks:
            sl = slice(i, i + CHUNK)
            c, x0 = b.cond.index(sl), x[sl]
            t = torch.randint(lo, hi, (x0.shape[0],), generator=g)
            x_t = add_noise(x0, torch.randn(x0.shape, generator=g), t, b.schedule)
            guided = t_den.x0_eps(x_t, t, c, t_den.guided(x_t, t, c, c.zeros_like(), 5.0, form="standard"))[0]
            for name, pred in (("fake", f_den.x0_eps(x_t, t, c)[0]),
                               ("teacher", t_den.x0_eps(x_t, t, c)[0]), ("teacher_cfg5", guided)):
                err[name] += float(((pred - x0) ** 2).mean()) / len(chunks)
        print(f"t in [{lo}, {hi}): x0 MSE " + ", ".join(f"{k} {v:.4f}" for k, v in err.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["particles", "fake-error"])
    p.add_argument("--checkpoint", default=None, help="a DMD2 run's checkpoint folder (default: the teacher alone)")
    p.add_argument("--teacher", default="distill:tiny-world")
    p.add_argument("--guidance", type=float, default=5.0, help="particles: the real score's CFG")
    p.add_argument("--eta", type=float, default=0.02, help="particles: the step along the normalised gradient")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--k", type=int, default=3, help="fake-error: backward-simulation steps before the output")
    args = p.parse_args(argv)
    if args.probe == "fake-error" and not args.checkpoint:
        p.error("fake-error needs --checkpoint (the teacher is its own fake score)")
    torch.manual_seed(0)
    b = Bench(args.teacher, 240, 1000)
    teacher = b.comps.unet.float().eval()
    gen, fake = networks(teacher, args.checkpoint)
    x = generator_outputs(b, gen, 3 if args.probe == "particles" else args.k)
    if args.probe == "particles":
        particles(b, teacher, fake, x, args.guidance, args.eta, args.iters)
    else:
        fake_error(b, teacher, fake, x)


if __name__ == "__main__":
    main()
