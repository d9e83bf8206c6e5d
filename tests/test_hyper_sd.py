"""Hyper-SD end to end: the chain (TSCD stages -> reward fine-tuning -> 1-step score distillation) on one LoRA, the
reward stage's objective (ReFL), the unified TCD export, and the checks that name their keys."""

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_pipeline_samples_as_distill, compose_cfg, train
from distill.config import ConfigError, validate

FAST = ["+experiment=hyper_sd_tiny", "+debug=fast", "model.pretrained=distill:tiny-world", "method.lora.rank=4",
        "trainer.validation_prompts=[]", "data.batch_size=4", "method.pairs.num_pairs=8"]


def _lora(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "export" / "lora" / "pytorch_lora_weights.safetensors"))


def test_hyper_sd_tiny_chain_trains_one_lora_through_every_stage_and_exports_the_unified_sampler(tiny_data,
                                                                                                 tmp_path):
    run = train([*FAST, f"data.shards={tmp_path}/traj", f"output_dir={tmp_path}/run"])
    folders = sorted((run / "stages").iterdir())
    assert [f.name for f in folders] == ["00_tscd_k8", "01_tscd_k4", "02_tscd_k2", "03_tscd_k1", "04_reward",
                                         "05_score_warmup", "06_score"]
    stages = [json.loads((f / "stage.json").read_text()) for f in folders]
    assert [s["method"]["name"] for s in stages] == ["pcm"] * 4 + ["refl", "dmd2", "dmd2"]
    assert [s["method"].get("num_segments") for s in stages[:5]] == [8, 4, 2, 1, 1]
    for prev, s in zip(folders, stages[1:]):  # each stage starts from the previous stage's export
        assert str(prev / "export") in (s["info"].get("student_init"), s["info"].get("generator_init"))
    warm, score = stages[5], stages[6]
    # the warm-up: DMD2's pair regression of the 1-step mode on the run's own trajectories, the chain held on the
    # LoRA as the reward stage left it; then DMD2 over the 4-step chain of the grid with the 1-step mode beside it
    assert warm["info"]["phase"] == "regression" and score["info"]["phase"] == "dmd2"
    assert warm["data"] == {"kind": "pairs", "shards": f"{tmp_path}/traj"}
    assert warm["method"]["regression"]["keep_target"] == "init" and warm["method"]["regression"]["keep_weight"] > 0
    assert score["method"]["student_timesteps"] == [999, 749, 499, 249] and score["method"]["one_step_timestep"] == 399
    rows = [json.loads(x) for x in (folders[5] / "metrics.jsonl").read_text().splitlines()]
    assert all("train/loss_keep" in r and "train/loss_regression" in r for r in rows if "train/loss" in r)
    loras = [_lora(f) for f in folders]
    assert all(x.keys() == loras[0].keys() for x in loras)  # one adapter, continued
    for a, b in zip(loras, loras[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in a)  # and every stage moved it
    rows = [json.loads(x) for x in (folders[4] / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("data/images_read", 0) == 0 for r in rows)
    assert all("train/reward" in r and "train/loss_consistency" in r for r in rows if "train/loss" in r)
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["method"] == "hyper-sd-lora" and info["scheduler"] == "TCDScheduler"
    assert info["original_inference_steps"] == 8 and info["steps"] == [1, 2, 4, 8]
    etas = info["etas"]
    assert set(etas) == {"1", "2", "4", "8"} and info["sampler"]["timesteps"] == {"1": [399]}
    assert info["stages"] == [f.name.split("_", 1)[1] for f in folders]
    card = (run / "export" / "README.md").read_text()
    assert ", ".join(f"{n} step{'' if n == '1' else 's'}: {etas[n]:g}" for n in etas) in card
    assert "num_inference_steps=1, guidance_scale=1, eta=1, timesteps=[399]" in card
    assert_pipeline_samples_as_distill(run / "export", 1)  # the 1-step mode at 399, from the card's spec
    assert_pipeline_samples_as_distill(run / "export", 2)  # eta 0.6 at 2 steps, from the card's spec


def test_the_papers_one_step_score_stage_is_still_one_override_away(tmp_path):
    """Without a chain, a 1-step mode or a warm-up the score stage is the paper's: DMD2 at timestep 999 alone,
    straight after the reward stage, and the export's 1-step call takes no timesteps of its own."""
    from distill.methods import METHOD_CLASSES

    cfg = validate(compose_cfg(["+experiment=hyper_sd_tiny", "method.score.student_timesteps=null",
                                "method.score.one_step_timestep=null", "method.score.regression.steps=0"]))
    stages = METHOD_CLASSES["hyper_sd"].plan(cfg, tmp_path)
    assert [s.name for s in stages][-2:] == ["reward", "score"]
    score = stages[-1]
    assert score.method["student_timesteps"] == [999] and score.method["one_step_timestep"] is None
    assert score.info == {"generator_init": str(stages[-2].folder / "export")} and score.data == {}
    assert score.trainer["validation_steps"] == [1]


def _refl(tmp_path, *overrides):
    """The chain's reward stage as the trainer builds it (its config from the plan), on the tiny world."""
    from distill.methods import METHOD_CLASSES, build_method
    from distill.models import load_components
    from distill.stages import stage_config

    cfg = validate(compose_cfg(["+experiment=hyper_sd_tiny", "+debug=fast", "model.pretrained=distill:tiny-world",
                                "method.lora.rank=4", "method.trajectory=false", *overrides]))
    stage = next(s for s in METHOD_CLASSES["hyper_sd"].plan(cfg, tmp_path) if s.name == "reward")
    stage.info = {}  # from the teacher itself, not a previous stage's export
    c = stage_config(cfg, stage, staged=True, last=False)
    comps = load_components(c.model.pretrained, parts=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                       "tokenizer_2"))
    return c, comps, build_method(c, comps, torch.device("cpu"), stage=stage)


def _batch(comps, n=4, seed=0):
    from distill.data.synthetic import PROMPTS
    from distill.methods.base import Batch
    from distill.models import encode_prompts

    captions = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    emb, pooled = encode_prompts(comps, captions)
    from distill.diffusion import UNetCond

    ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * n, dtype=torch.float32)
    cond = UNetCond(emb, pooled, ids)
    lat = torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return Batch(latents=lat, cond=cond, captions=captions, seeds=list(range(seed, seed + n)))


def test_reward_gradient_flows_through_the_last_sampled_step_only(tiny_data, tmp_path):
    """n - 1 student steps without gradient, the last with it; the reward's gradient reaches the LoRA."""
    _, comps, m = _refl(tmp_path, "method.reward.regularizer_weight=0.0", "method.reward.sample_steps=[4]")
    batch = _batch(comps)
    grads = []
    hook = m.student.register_forward_hook(lambda mod, a, out: grads.append(torch.is_grad_enabled()))
    try:
        out = m.sample_with_last_grad(batch, 4, batch.size)
    finally:
        hook.remove()
    assert grads == [False, False, False, True] and out.requires_grad
    loss = m.losses(batch, "g", 0)
    assert m.sample_steps_at(0) == 4 and float(loss["loss"].detach()) == pytest.approx(-0.002 * float(loss["reward"]),
                                                                              rel=1e-5)
    loss["loss"].backward()
    lora_grads = [p.grad for n, p in m.student.named_parameters() if "lora_" in n]
    assert lora_grads and any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in m.student.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in m.reward_model.parameters()) and all(
        p.grad is None for p in comps.vae.parameters())


def test_reward_steps_are_drawn_from_the_step_alone(tiny_data, tmp_path):
    m = _refl(tmp_path)[2]
    draws = [m.sample_steps_at(s) for s in range(60)]
    assert set(draws) == {1, 2, 4} and draws == [m.sample_steps_at(s) for s in range(60)]


def test_reward_fine_tuning_raises_the_reward_of_the_students_samples(tiny_data, tmp_path):
    """A few steps on the reward alone (no regulariser) raise the reward model's score of the same batch."""
    _, comps, m = _refl(tmp_path, "method.reward.regularizer_weight=0.0",
                        "method.reward.sample_steps=[2]", "method.reward.weight=1.0")
    batch = _batch(comps, n=8)
    opt = torch.optim.Adam(m.trainable, lr=3e-4)
    scores = []
    for step in range(6):
        out = m.losses(batch, "g", 0)
        scores.append(float(out["reward"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert scores[-1] > scores[0] + 1.0 and scores == sorted(scores), scores


@pytest.mark.parametrize("override,key", [
    ("method.lora.enabled=false", "method.lora.enabled"),
    ("method.segment_stages=[]", "method.segment_stages"),
    ("method.reward.sample_steps=[16]", "method.reward.sample_steps"),
    ("method.reward.eta=1.5", "method.reward.eta"),
    ("method.reward.model=distill:no-such-reward", "method.reward.model"),
    ("method.inference_etas=[1.0]", "method.inference_etas"),
    ("method.score.t_min=990", "stage 'score_warmup' (dmd2): method.t_min=990"),  # the first DMD2 stage named
    ("method.score.gan_fake_weight=0", "stage 'score_warmup' (dmd2): method.gan_generator_weight"),
    ("method.score.student_timesteps=[999,700]", "method.score.student_timesteps"),  # off the 8-point grid
    ("method.score.one_step_timestep=499", "method.score.one_step_timestep"),  # the 2- and 4-step chains visit it
])
def test_hyper_sd_checks_name_the_key_before_any_stage_trains(override, key):
    with pytest.raises(ConfigError, match=__import__("re").escape(key)):
        validate(compose_cfg(["+experiment=hyper_sd_tiny", override]))


def test_a_score_warm_up_on_image_data_needs_pairs_named_by_its_key():
    """On raw images (SDXL's recipe) the warm-up has no pairs to read: an error naming the key, before training."""
    with pytest.raises(ConfigError, match=r"method\.score\.regression\.pairs\.shards"):
        validate(compose_cfg(["+experiment=hyper_sd_tiny", "data=tiny_world", "method.trajectory=false"]))
    validate(compose_cfg(["+experiment=hyper_sd_tiny", "data=tiny_world", "method.trajectory=false",
                          "method.score.regression.pairs.shards=/somewhere/pairs"]))


def test_a_missing_reward_model_folder_is_an_error_naming_the_key(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="method.reward.model"):
        _refl(tmp_path, f"method.reward.model={tmp_path}/nothing")
