"""In-process training runs for tests: compose the real Hydra config and call distill.run."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import distill
from distill.config import register_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def load_bench(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, CONFIGS.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train(overrides: list[str]) -> Path:
    return distill.run(compose_cfg(overrides))


def weights(run_dir: Path, step: int, name: str = "model.safetensors") -> dict:
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step}" / name))


def install_nan_fault(spec: str) -> None:
    """Test double for fault injection (production code reads no fault variables): STEP[@RANK][/MICRO] makes the
    loss of that step (1-based) NaN on that rank (default 0), in every micro-batch of a phase or only micro-batch
    MICRO (0-based), by wrapping the built method's `losses`."""
    import torch

    from distill.trainer import Trainer

    spec, _, micro = spec.partition("/")
    step, _, rank = spec.partition("@")
    step, rank, micro = int(step), int(rank or 0), int(micro) if micro else None
    build = Trainer.build

    def faulty_build(self):
        build(self)
        losses, calls = self.method.losses, {}

        def faulty(batch, phase, s):
            out = losses(batch, phase, s)
            n = calls[(s, phase)] = calls.get((s, phase), -1) + 1
            if (s + 1, self.acc.process_index) == (step, rank) and micro in (None, n):
                out["loss"] = out["loss"] * torch.tensor(float("nan"))
            return out

        self.method.losses = faulty

    Trainer.build = faulty_build


def assert_pipeline_samples_as_distill(export_dir: Path, steps: int) -> None:
    """The export, loaded as a plain diffusers pipeline with its sampler spec, gives the images distill's own
    sampler gives from the same noise (tiny-world teacher, 32 px, two prompts)."""
    import torch

    from distill.diffusion import NoiseSchedule, UNetCond, seeded_noise
    from distill.export import load_export, read_export
    from distill.models import decode_latents, encode_prompts, load_components

    info, spec = read_export(export_dir)
    pipe = load_export(export_dir)
    prompts, seeds = ["a red circle on a black background", "a blue square on a white background"], [3, 7]
    ref = pipe(prompts, height=32, width=32, output_type="pt", **spec.pipeline_kwargs(steps),
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 2 - 1
    comps = load_components(info["teacher"])
    emb, pooled = encode_prompts(comps, prompts)
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    side = 32 // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    lat = spec.sample(pipe.unet, seeded_noise(seeds, (2, 4, side, side)), cond,
                      NoiseSchedule.from_config(comps.scheduler_config), steps, seeds,
                      uncond=cond.zeros_like())  # a CFG card's empty prompt (SDXL: zeros)
    torch.testing.assert_close(decode_latents(comps, lat), ref.clamp(-1, 1), atol=1e-4, rtol=0)
