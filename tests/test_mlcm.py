"""Trajectory-state data (MLCM) on PCM's objective: `prepare pairs --states` records the teacher's own DDIM path,
`Batch.state_at` reads x_t off it, PCM with `method.trajectory` trains on those states (never a noised data latent),
and `mlcm_tiny` runs from prompts alone and exports a student diffusers samples like distill does."""

import json
import tarfile

import numpy as np
import pytest
import torch

from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from distill.config import ConfigError, validate

TEACHER = "distill:tiny-world"


def _write(tiny_data, out, steps=4, n=6):
    from distill.prepare import make_pairs

    return make_pairs(str(tiny_data / "tiny_world" / "train_prompts.txt"), TEACHER, out, steps=steps, guidance=5.0,
                      resolution=32, batch_size=3, limit=n, states=True)


def test_states_are_the_teachers_own_ddim_path_from_the_pairs_noise(tiny_data, tmp_path):
    import io

    from distill.batch import prompt_cond
    from distill.diffusion import NoiseSchedule, sample_teacher
    from distill.models import load_components

    _write(tiny_data, tmp_path / "p")
    with tarfile.open(sorted((tmp_path / "p").glob("*.tar"))[0]) as tar:
        get = lambda name: tar.extractfile(f"000000001.{name}").read()  # noqa: E731
        states = torch.from_numpy(np.load(io.BytesIO(get("states.npy")))).float()
        noise = torch.from_numpy(np.load(io.BytesIO(get("noise.npy"))))
        meta = json.loads(get("json"))
    assert meta["pair"]["state_timesteps"] == [999, 749, 499, 249]  # the 4-point skip grid, descending
    assert states.shape == (4, 4, 8, 8)
    torch.testing.assert_close(states[0], noise, atol=2e-3, rtol=2e-3)  # the path starts at the pair's noise
    comps = load_components(TEACHER)
    caption = (tiny_data / "tiny_world" / "train_prompts.txt").read_text().splitlines()[1]
    cond = prompt_cond(comps, [caption], 32, torch.device("cpu"))
    path: list = []
    sample_teacher(comps.unet, noise[None], cond, cond.zeros_like(), NoiseSchedule.from_config(comps.scheduler_config),
                   4, "ddim", 5.0, "trailing", states=path)
    torch.testing.assert_close(states, torch.cat(path), atol=3e-3, rtol=3e-3)


def test_state_at_reads_each_samples_own_timestep_and_names_a_grid_that_does_not_match():
    from distill.methods.base import Batch

    states = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.float32).view(2, 3, 1, 2, 2)
    b = Batch(latents=torch.zeros(2, 1, 2, 2), cond=None, captions=["a", "b"], seeds=[0, 1], states=states,
              state_timesteps=torch.tensor([[999, 666, 333]] * 2))
    got = b.state_at(torch.tensor([333, 999]))
    torch.testing.assert_close(got, torch.stack([states[0, 2], states[1, 0]]))
    with pytest.raises(ValueError, match=r"timesteps \[500\] are not on the pairs' trajectory.*num_ddim_timesteps"):
        b.state_at(torch.tensor([500, 999]))
    with pytest.raises(ValueError, match="prepare pairs --states"):
        Batch(latents=None, cond=None, captions=[], seeds=[]).state_at(torch.tensor([999]))


@pytest.mark.parametrize("override,key", [
    ("data.kind=images", "method.trajectory=true reads the teacher's trajectory"),
    ("method.w_max=6", "set method.w_min = method.w_max"),
    ("method.pairs.solver_steps=10", "solver_steps=method.num_ddim_timesteps=20"),
    ("method.pairs.guidance_scale=7", "method.pairs.guidance_scale=7.0"),
])
def test_trajectory_settings_are_checked_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        validate(compose_cfg(["+experiment=mlcm_tiny", override]))


def test_the_student_is_trained_on_the_trajectory_state_not_on_a_noised_latent(tiny_data, tmp_path):
    """The student's input at (x_t, t) is the stored state at t, whatever the batch's latents."""
    from distill.data.config import DataConfig
    from distill.data.wds import OnceLoader
    from distill.methods import build_method
    from distill.methods.base import Batch
    from distill.models import load_components

    _write(tiny_data, tmp_path / "p", steps=8, n=4)
    cfg = validate(compose_cfg(["+experiment=mlcm_tiny", "+debug=fast", "model.pretrained=distill:tiny-world",
                                "method.lora.rank=4", "method.pairs.prompts=null", f"data.shards={tmp_path}/p",
                                "method.num_ddim_timesteps=8", "method.pairs.solver_steps=8"]))  # the pairs above
    comps = load_components(cfg.model.pretrained, parts=("unet", "text_encoder", "text_encoder_2", "tokenizer",
                                                         "tokenizer_2"))
    m = build_method(cfg, comps, torch.device("cpu"))
    raw = next(iter(OnceLoader(DataConfig(kind="pairs", shards=str(tmp_path / "p"), batch_size=4, resolution=32,
                                          num_workers=0, shuffle_buffer=0), rank=0, world_size=1)))
    from distill.batch import to_batch

    batch = to_batch(raw, comps, "latents", [0, 1, 2, 3], torch.device("cpu"))
    batch = Batch(latents=torch.full_like(batch.latents, 1e3), cond=batch.cond, captions=batch.captions,
                  seeds=batch.seeds, noise=batch.noise, states=batch.states, state_timesteps=batch.state_timesteps)
    seen = []
    jump = m._jump

    def spy(unet, x, t, to, cond):
        seen.append((unet, x.detach().clone(), t.clone()))
        return jump(unet, x, t, to, cond)

    m._jump = spy
    m.losses(batch, "g", 0)
    unet, x, t = seen[-1]  # the student's own call comes last (after the teacher step and the target)
    assert unet is m.modules["student"]
    torch.testing.assert_close(x, batch.state_at(t))
    assert x.abs().max() < 100  # no trace of the latents (1e3) it would have noised


@pytest.mark.parametrize("name", ["mlcm_tiny", "mlcm_tiny_quality"])  # the LoRA, and the full student with a w input
def test_mlcm_tiny_trains_from_prompts_alone_and_exports(tiny_data, tmp_path, name):
    run = tmp_path / "run"
    lora = ["method.lora.rank=4"] if name == "mlcm_tiny" else []
    train([f"+experiment={name}", "+debug=fast", "model.pretrained=distill:tiny-world", *lora,
           "trainer.validation_prompts=[]", "data.batch_size=4", "method.pairs.num_pairs=8",
           f"data.shards={tmp_path}/traj", f"output_dir={run}"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(r.get("data/images_read", 0) == 0 for r in rows)
    assert json.loads((tmp_path / "traj" / "summary.json").read_text())["settings"]["states"] is True
    assert_pipeline_samples_as_distill(run / "export", 4)
