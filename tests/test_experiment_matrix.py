"""Every SDXL / SD 1.5 experiment as users run it, at tiny size: only the model (the random tiny model of the same
architecture), the data (the tiny world's shards at 64 px) and the step budget (two steps per stage; +debug=fast)
are swapped. Everything else stays the experiment's own: bf16 autocast with the frozen nets in bf16 (what
`model.frozen_dtype=auto` picks on a GPU), gradient checkpointing, accumulation, EMA, LoRA, the whole stage chain,
validation and the export dtype. A new experiment joins by existing."""

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import CONFIGS, compose_cfg, train

MODELS = {"stabilityai/stable-diffusion-xl-base-1.0": "distill:random-sdxl",
          "stable-diffusion-v1-5/stable-diffusion-v1-5": "distill:random-sd15"}
KEPT = ("trainer.mixed_precision", "trainer.gradient_checkpointing", "trainer.gradient_accumulation_steps",
        "trainer.export_dtype", "method.lora", "method.stages", "method.ema_decay", "trainer.validation_prompts")


def _real_size_experiments() -> list[str]:
    names = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    return [n for n in names if compose_cfg([f"+experiment={n}"]).model.pretrained in MODELS]


def _overrides(name: str, out: Path, data: Path | None = None) -> list[str]:
    cfg = compose_cfg([f"+experiment={name}"])
    frozen = cfg.trainer.mixed_precision if cfg.trainer.mixed_precision in ("bf16", "fp16") else "fp32"
    prompts = f"{data}/tiny_world/train_prompts.txt"
    shards = (f"data.shards='{prompts}'" if cfg.data.kind == "prompts"  # data-free
              else f"data.shards='{out.parent}/pairs'" if cfg.data.kind == "pairs"  # written by the run, below
              else f"data.shards='{data}/tiny_world/train/{{00000..00003}}.tar'")
    kind = f"data.kind={cfg.data.kind if cfg.data.kind in ('prompts', 'pairs') else 'images'}"
    pairs = []  # teacher ODE pairs are data too: written by the run itself from the tiny prompts, with the tiny model
    if OmegaConf.select(cfg, "method.regression.steps"):
        pairs = [f"method.regression.pairs.prompts='{prompts}'",
                 f"method.regression.pairs.shards='{out.parent}/pairs'", "method.regression.pairs.num_pairs=8",
                 "method.regression.pairs.solver_steps=2"]
    if cfg.data.kind == "pairs":  # trajectories (MLCM) keep their solve: its timesteps are the skip grid
        pairs = [f"method.pairs.prompts='{prompts}'", "method.pairs.num_pairs=8"]
        if not OmegaConf.select(cfg, "method.trajectory"):
            pairs.append("method.pairs.solver_steps=2")
    if OmegaConf.select(cfg, "method.reward.model") and not cfg.method.reward.model.startswith("distill:"):
        pairs.append("method.reward.model=distill:tiny-reward")  # a reward model is a model: the tiny world's
    if OmegaConf.select(cfg, "method.perceptual"):  # a latent perceptual net is a model: the tiny world's
        pairs.append("method.perceptual=distill:tiny-latent-lpips")
    return [f"+experiment={name}", "+debug=fast", f"model.pretrained={MODELS[cfg.model.pretrained]}", "model.vae=null",
            f"model.frozen_dtype={frozen}", kind, "data.resolution=64", shards, f"output_dir={out}",
            "trainer.checkpoint_every_steps=2", *pairs]  # one checkpoint per stage (its end), not one per step


def _select(cfg, key: str):
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True) if OmegaConf.is_config(
        OmegaConf.select(cfg, key)) else OmegaConf.select(cfg, key)


def test_the_matrix_holds_every_real_size_experiment():
    names = _real_size_experiments()
    assert {"lcm_sdxl", "lcm_lora_sdxl", "lcm_sd15", "lcm_lora_sd15", "lightning_sdxl", "lightning_lora_sdxl"} <= set(names)


@pytest.fixture
def fresh_accelerate_state():
    """These runs use bf16 in-process; Accelerate's state is a process singleton, so later tests in this worker
    must not inherit it (they would fail to start, or silently train in bf16)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.timeout(3600)  # the Lightning chains are 7 and 13 stages: minutes each on an idle 2-core machine
@pytest.mark.parametrize("name", _real_size_experiments())
def test_experiment_trains_validates_and_exports_with_its_own_settings(tiny_data, tmp_path, name,
                                                                        fresh_accelerate_state):
    own = compose_cfg([f"+experiment={name}"])
    overrides = _overrides(name, tmp_path / "run", tiny_data)
    smoke = compose_cfg(overrides)
    for key in KEPT:  # the swap keeps the experiment's own settings
        assert _select(smoke, key) == _select(own, key), key
    run = train(overrides)
    stages = sorted((run / "stages").iterdir()) if (run / "stages").exists() else [run]
    for d in stages:  # what each run (stage) recorded as its resolved settings
        saved = OmegaConf.load(d / "config.yaml")
        assert saved.trainer.mixed_precision == own.trainer.mixed_precision
        assert saved.trainer.gradient_checkpointing == own.trainer.gradient_checkpointing
        assert saved.model.frozen_dtype == ("bf16" if own.trainer.mixed_precision == "bf16" else saved.model.frozen_dtype)
    if "stages" in own.method:
        assert [d.name.split("_", 1)[1] for d in stages] == [s.name for s in own.method.stages]
    for d in stages:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["step"] == 2, d
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("train/loss")), d
        assert all(r.get("train/nonfinite_steps", 0) == 0 for r in rows), d
        assert list((d / "samples").glob("*.png")), f"{d}: no validation grid"
        info = json.loads((d / "export" / "export.json").read_text())
        # the run's own export dtype at the end; a stage chain keeps its intermediate exports in fp32
        want = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[own.trainer.export_dtype]
        assert info["dtype"] == (want if d == stages[-1] else "float32"), d
        assert (d / "export" / "unet.safetensors").exists()
        if info.get("lora"):
            assert (d / "export" / "lora_kohya.safetensors").exists()
        if info.get("lora") and "stages" in own.method:  # the card names the model the LoRA is a delta over
            saved = OmegaConf.load(d / "config.yaml")
            base = json.loads((d / "stage.json").read_text())["info"]["student_init"] or saved.model.pretrained
            assert info["lora_base"] == base, d
            assert f"on `{base}`" in (d / "export" / "README.md").read_text(), d


# The tiny world's own experiments (X_tiny, X_tiny_quality, the embedded default's VAE / teacher / reward / perceptual
# nets) as shipped, two steps per stage: every setting their own (precision, LoRA, stages and their step shares,
# schedules, validation step counts and prompts, export dtype); only the step budget, the batch and, where a
# recipe starts from an earlier run's export (`runs/...`), the model are swapped. A data set the run writes first
# (teacher ODE pairs, trajectories) is written small (8) into the test's folder, at the experiment's own solver.
TINY_KEPT = ("trainer.mixed_precision", "trainer.gradient_checkpointing", "trainer.gradient_accumulation_steps",
             "trainer.export_dtype", "trainer.validation_steps", "trainer.validation_prompts", "method",
             "optim.scheduler", "data.kind")


def _tiny_experiments() -> list[str]:
    names = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    return [n for n in names if compose_cfg([f"+experiment={n}"]).model.pretrained not in MODELS]


def _tiny_overrides(name: str, out: Path) -> list[str]:
    cfg = compose_cfg([f"+experiment={name}"])
    own = cfg.model.pretrained
    model = own if own.startswith("distill:") else "distill:tiny-world"  # an earlier run's export: the tiny teacher
    steps = OmegaConf.to_container(cfg.trainer.validation_steps)
    o = [f"+experiment={name}", "+debug=fast", f"model.pretrained={model}", f"output_dir={out}",
         "trainer.checkpoint_every_steps=2", f"trainer.validation_steps={steps}"]
    for key in ("method.pairs", "method.regression.pairs"):  # written by the run, small, at its own solver
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, f"{key}.prompts"):
            shards = f"{out.parent}/{key.split('.')[-2]}_pairs"
            o += [f"{key}.num_pairs=8", f"{key}.shards={shards}" if key != "method.pairs" else f"data.shards={shards}"]
    if cfg.data.kind == "prompts":
        o.append(f"data.shards={OmegaConf.select(cfg, 'data.shards')}")
    return o


def test_the_tiny_matrix_holds_every_tiny_experiment():
    names = set(_tiny_experiments())
    assert {"mlcm_tiny", "mlcm_tiny_quality", "hyper_sd_tiny_quality", "dmd2_tiny_quality", "vae_tiny"} <= names
    assert not names & set(_real_size_experiments())


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", _tiny_experiments())
def test_tiny_experiment_trains_validates_and_exports_as_shipped(tiny_data, tmp_path, name, fresh_accelerate_state):
    own = compose_cfg([f"+experiment={name}"])
    overrides = _tiny_overrides(name, tmp_path / "run")
    smoke = compose_cfg(overrides)
    for key in TINY_KEPT:
        if key == "method":  # every method key but the size of a data set the run writes first
            a, b = (OmegaConf.to_container(c.method, resolve=False) for c in (smoke, own))
            for m in (a, b):
                for sub in (m.get("pairs") or {}, (m.get("regression") or {}).get("pairs") or {}):
                    sub.pop("num_pairs", None), sub.pop("shards", None)
            assert a == b, key
        else:
            assert _select(smoke, key) == _select(own, key), key
    run = train(overrides)
    stages = sorted((run / "stages").iterdir()) if (run / "stages").exists() else [run]
    for d in stages:
        saved = OmegaConf.load(d / "config.yaml")
        assert saved.trainer.mixed_precision == own.trainer.mixed_precision, d
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["step"] == 2, d
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("train/loss")), d
        assert all(r.get("train/nonfinite_steps", 0) == 0 for r in rows), d
        if saved.trainer.validation_prompts:
            assert list((d / "samples").glob("*.png")), f"{d}: no validation grid"
        assert list((d / "export").rglob("*.safetensors")), f"{d}: no exported weights"
    if (run / "export" / "export.json").exists():  # a student (a net of the tiny world's own is a model folder)
        info = json.loads((run / "export" / "export.json").read_text())
        assert info["dtype"] == {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[own.trainer.export_dtype]
