"""Teacher ODE pairs: `python -m distill.prepare pairs` (the teacher's own deterministic solve from seeded noise,
resumable, any process count, counted), `data.kind=pairs`, and DMD2's 1-step regression warm-up on them."""

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import PY, run_cli
from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from distill.config import ConfigError, validate

TEACHER = "distill:tiny-world"


def _pairs(tiny_data, out, **kw):
    from distill.prepare import make_pairs

    args = dict(steps=3, guidance=5.0, resolution=32, batch_size=5, limit=12, samples_per_shard=4)
    return make_pairs(str(tiny_data / "tiny_world" / "train_prompts.txt"), TEACHER, out, **{**args, **kw})


def _read(out: Path) -> dict[str, dict]:
    """key -> {ext: bytes} of every sample in the shards of `out`."""
    samples: dict[str, dict] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _npy(b: bytes) -> torch.Tensor:
    import io

    import numpy as np

    return torch.from_numpy(np.load(io.BytesIO(b)))


def test_a_pair_is_the_teachers_own_solve_from_its_seeded_noise(tiny_data, tmp_path):
    from distill.batch import prompt_cond
    from distill.diffusion import NoiseSchedule, sample_teacher, seeded_noise
    from distill.models import load_components
    from distill.prepare import pair_seed

    summary = _pairs(tiny_data, tmp_path / "p")
    assert summary["complete"] and summary["pairs"] == summary["expected"] == 12
    samples = _read(tmp_path / "p")
    prompts = (tiny_data / "tiny_world" / "train_prompts.txt").read_text().splitlines()[:12]
    assert sorted(samples) == [f"{i:09d}" for i in range(12)]
    comps = load_components(TEACHER)
    key = "000000007"
    s = samples[key]
    assert s["txt"].decode() == prompts[7]
    noise = _npy(s["noise.npy"])
    assert noise.dtype == torch.float32
    torch.testing.assert_close(noise, seeded_noise([pair_seed(0, key)], (1, 4, 8, 8))[0], atol=0, rtol=0)
    cond = prompt_cond(comps, [prompts[7]], 32, torch.device("cpu"))
    want = sample_teacher(comps.unet, noise[None], cond, cond.zeros_like(),
                          NoiseSchedule.from_config(comps.scheduler_config), 3, "ddim", 5.0, "trailing")[0]
    torch.testing.assert_close(_npy(s["latents.npy"]).float(), want, atol=2e-3, rtol=2e-3)  # stored fp16
    meta = json.loads(s["json"])
    assert meta["pair"] == {"solver": "ddim", "steps": 3, "guidance": 5.0, "seed": pair_seed(0, key)}
    assert meta["target_size"] == [32, 32] and "pooled_prompt_embeds.npy" in s


def test_pairs_resume_skip_what_is_written_refuse_other_settings_and_recount(tiny_data, tmp_path):
    from distill.prepare import pairs_complete, pairs_settings

    out = tmp_path / "p"
    first = _pairs(tiny_data, out, limit=6)
    (out / "00009-rank000.tar.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    second = _pairs(tiny_data, out, limit=12)
    assert (first["written"], second["written"], second["pairs"]) == (6, 6, 12)
    assert not list(out.glob("*.tmp"))
    fresh = tmp_path / "q"
    _pairs(tiny_data, fresh, limit=12, batch_size=12, samples_per_shard=100)
    a, b = _read(out), _read(fresh)
    assert a.keys() == b.keys() and all(a[k]["noise.npy"] == b[k]["noise.npy"] for k in a)  # batch-independent
    for k in a:  # the same solve (batched matmuls round alike only to fp32 precision, then stored fp16: one ulp)
        torch.testing.assert_close(_npy(a[k]["latents.npy"]), _npy(b[k]["latents.npy"]), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="steps: 3 there, 4 now"):
        _pairs(tiny_data, out, steps=4)
    settings = pairs_settings(TEACHER, str(tiny_data / "tiny_world" / "train_prompts.txt"), 3, 5.0, "ddim", 32, 0, 12)
    assert pairs_complete(out, settings)
    next(iter(sorted(out.glob("*.tar")))).unlink()  # a shard lost since: not complete, and a rerun rewrites it
    assert not pairs_complete(out, settings)
    assert _pairs(tiny_data, out, limit=12)["written"] == 4


def test_a_run_on_a_pair_folder_of_another_model_names_the_key(tiny_data, tmp_path):
    """A `+debug=fast` run (a random model) pointed at pairs the tiny world's teacher wrote: an error naming the
    config key of the folder and what differs, before any training."""
    from distill.prepare import PairSettingsError

    out = tmp_path / "p"
    _pairs(tiny_data, out, limit=4)  # the tiny world's teacher, DDIM 3 at CFG 5
    with pytest.raises(PairSettingsError, match=r"method\.regression\.pairs\.shards=.*other settings \(model: "
                                                r"'distill:tiny-world' there, 'distill:random-sdxl' now.*set "
                                                r"method\.regression\.pairs\.shards to a folder of its own"):
        train(["+experiment=dmd2_tiny", "+debug=fast", "trainer.validation_prompts=[]", "method.head_channels=8",
               f"method.regression.pairs.shards={out}", "method.regression.pairs.num_pairs=4",
               "method.regression.pairs.solver_steps=3", f"output_dir={tmp_path}/run"])
    assert not list((tmp_path / "run").rglob("step_*")), "no training before the error"


def test_two_processes_write_the_pairs_one_writes(tiny_data, tmp_path):
    args = ["-m", "distill.prepare", "pairs", "--model", TEACHER, "--prompts",
            str(tiny_data / "tiny_world" / "train_prompts.txt"), "--steps", "2", "--resolution", "32", "--limit", "10",
            "--batch-size", "3"]
    run_cli([PY, *args, "--output", str(tmp_path / "one")])
    run_cli([PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1",
             *args, "--output", str(tmp_path / "two")], env={"ACCELERATE_USE_CPU": "1"})
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert len(list((tmp_path / "two").glob("*-rank001.tar"))) == 1
    assert one.keys() == two.keys() and len(one) == 10
    assert all(one[k]["noise.npy"] == two[k]["noise.npy"] for k in one)
    for k in one:
        torch.testing.assert_close(_npy(one[k]["latents.npy"]), _npy(two[k]["latents.npy"]), atol=2e-3, rtol=2e-3)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["complete"]


def test_pair_shards_load_with_their_noise_and_a_pair_without_noise_is_a_counted_skip(tiny_data, tmp_path):
    from distill.data.config import DataConfig
    from distill.data.wds import OnceLoader
    from distill.data.writer import ShardWriter

    _pairs(tiny_data, tmp_path / "p", limit=8)
    samples = _read(tmp_path / "p")
    with ShardWriter(tmp_path / "p", 10, suffix="-broken") as w:  # a latent sample, no noise
        w.write("999999999", {k: v for k, v in samples["000000000"].items() if k != "noise.npy"})
    cfg = DataConfig(kind="pairs", shards=str(tmp_path / "p"), batch_size=9, resolution=32, num_workers=0,
                     shuffle_buffer=0)
    loader = OnceLoader(cfg, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["noise"].shape == (8, 4, 8, 8) and batch["noise"].dtype == torch.float32
    i = batch["key"].index("000000003")
    torch.testing.assert_close(batch["noise"][i], _npy(samples["000000003"]["noise.npy"]), atol=0, rtol=0)
    assert loader.counters()["missing_noise"] == 1 and loader.counters()["images_read"] == 0


def test_regression_warm_up_settings_are_checked_naming_the_key(tiny_data, tmp_path):
    base = ["+experiment=dmd2_1step_tiny", f"method.regression.pairs.shards={tmp_path}/none"]
    with pytest.raises(ConfigError, match="method.regression.steps=1000: the pair regression is a 1-step"):
        validate(compose_cfg([*base, "method.student_timesteps=[999,499]", "trainer.validation_steps=[1]"]))
    with pytest.raises(ConfigError, match="method.regression.distance='l1'"):
        validate(compose_cfg([*base, "method.regression.distance=l1"]))
    with pytest.raises(ConfigError, match="method.regression.scheduler='cosin'"):
        validate(compose_cfg([*base, "method.regression.scheduler=cosin"]))
    with pytest.raises(ConfigError, match="method.regression.pairs.solver='dpmpp2m'"):
        validate(compose_cfg([*base, "method.regression.pairs.solver=dpmpp2m"]))
    with pytest.raises(FileNotFoundError, match="method.regression.pairs.shards=.*holds no pair shards"):
        train([*base, "method.regression.pairs.prompts=null", "+debug=fast", f"output_dir={tmp_path}/run"])


def test_a_warm_up_runs_its_own_steps_and_only_max_stage_steps_caps_a_stage(caplog):
    """sim_tiny_quality: 2,000 warm-up steps then trainer.max_steps=250 SIM steps (the warm-up used to be capped at
    trainer.max_steps); trainer.max_stage_steps (a debug preset's) caps both, said in the log."""
    from distill.methods import METHOD_CLASSES
    from distill.stages import stage_config

    def steps(*overrides):
        cfg = validate(compose_cfg(["+experiment=sim_tiny_quality", *overrides]))
        plan = METHOD_CLASSES["sim"].plan(cfg, Path("unused"))
        return [stage_config(cfg, s, True, s.index == len(plan) - 1).trainer.max_steps for s in plan]

    assert steps() == [2000, 250]
    assert steps("trainer.max_steps=1500") == [2000, 1500]
    assert steps("trainer.max_stage_steps=700") == [700, 250]
    with caplog.at_level("WARNING", logger="distill.stages"):
        assert steps("+debug=fast") == [2, 2] and steps("+debug=fast", "trainer.max_steps=3") == [3, 3]
    assert "stage 'regression': 2000 steps capped to trainer.max_stage_steps=2" in caplog.text
    with pytest.raises(ConfigError, match="trainer.max_stage_steps=0 must be >= 1"):
        validate(compose_cfg(["+experiment=sim_tiny_quality", "trainer.max_stage_steps=0"]))


def _unet_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("experiment,phase,kind,lora", [("dmd2_1step_tiny", "dmd2", "images", False),
                                                        ("dmd2_1step_tiny", "dmd2", "images", True),
                                                        ("dmd2_tiny", "dmd2", "images", True),  # + keep_weight
                                                        ("sim_tiny", "sim", "prompts", False)])
def test_one_step_warm_up_on_pairs_then_the_method_starts_from_that_generator(tiny_data, tmp_path, experiment,
                                                                              phase, kind, lora):
    """dmd2_1step_tiny and sim_tiny as shipped, shortened: the run writes its pairs, regresses G on them (no
    image read, no fake score), and the method's stage starts from the warm-up's export; the export samples in
    diffusers as distill."""
    run = tmp_path / "run"
    head = ["method.head_channels=8"] if phase == "dmd2" else []
    overrides = [f"+experiment={experiment}", "+debug=fast", "trainer.validation_prompts=[]", "data.batch_size=4",
                 *head, "method.regression.steps=3", "method.regression.pairs.num_pairs=8",
                 "method.regression.pairs.solver_steps=2", f"method.regression.pairs.shards={tmp_path}/pairs",
                 "method.regression.scheduler=cosine", "method.regression.warmup_steps=0",
                 "trainer.max_stage_steps=null",  # the warm-up runs its own 3 steps, the method's stage 2
                 f"output_dir={run}", *(["method.lora.enabled=true", "method.lora.rank=4"] if lora else [])]
    train(overrides)
    warm, dmd = run / "stages" / "00_regression", run / "stages" / f"01_{phase}"
    rows = [json.loads(x) for x in (warm / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3 and all(r.get("data/images_read", 0) == 0 for r in rows)
    assert max(json.loads(x)["step"] for x in (run / "stages" / f"01_{phase}" / "metrics.jsonl").open()) == 2
    assert all("train/loss_regression" in r and "train/loss_dm" not in r for r in rows if "train/loss" in r)
    keeps = [r["train/loss_keep"] for r in rows if "train/loss_keep" in r]  # dmd2_tiny holds its 4-step chain
    assert (len(keeps) > 0 and all(math.isfinite(k) for k in keeps)) == (experiment == "dmd2_tiny")
    lrs = [r["train/lr_g"] for r in rows if "train/lr_g" in r]  # the warm-up's own cosine over its own 3 steps
    assert len(lrs) >= 2 and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    assert OmegaConf_load(warm).data.kind == "pairs" and OmegaConf_load(dmd).data.kind == kind
    assert json.loads((tmp_path / "pairs" / "summary.json").read_text())["pairs"] == 8
    dm_rows = [json.loads(x) for x in (dmd / "metrics.jsonl").read_text().splitlines()]
    assert any("train/fake_loss_denoise" in r or "train/fake_loss" in r for r in dm_rows), dm_rows[-1].keys()
    assert all(r.get("data/images_read", 0) == 0 for r in dm_rows) or kind == "images"
    g_lrs = {r["train/lr_g"] for r in dm_rows if "train/lr_g" in r}  # the method's stage keeps the generator's
    assert len(g_lrs) == 1, g_lrs
    # the DMD2 stage's generator starts from the warm-up's export, not from the teacher
    from distill.methods import build_method
    from distill.models import load_components
    from distill.stages import Stage

    cfg = validate(compose_cfg(overrides))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    stage = Stage.read(dmd)
    m = build_method(cfg, comps, torch.device("cpu"), stage=stage)
    if lora:
        from safetensors.torch import load_file

        saved = load_file(str(warm / "export" / "lora" / "pytorch_lora_weights.safetensors"))
        have = {n: p for n, p in m.generator.named_parameters() if "lora_" in n}
        k = next(iter(saved))
        name = k.removeprefix("unet.").replace(".weight", ".default.weight")
        torch.testing.assert_close(have[name], saved[k].float())
        assert saved[k].abs().sum() > 0
    else:
        saved = _unet_state(warm / "export" / "unet")
        have = m.generator.state_dict()
        assert all(torch.equal(have[k], v.float()) for k, v in saved.items())
        teacher = comps.unet.state_dict()
        assert any(not torch.equal(teacher[k], v.float()) for k, v in saved.items())
    assert_pipeline_samples_as_distill(run / "export", 1)


def OmegaConf_load(d: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(d / "config.yaml")
