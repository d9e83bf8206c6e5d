"""Hyper-SD's building blocks that have landed: TSCD's progressive segments on the generic staging, a stage that
runs another method (the chain contract), TCD etas per step count, and the reward models."""

import json

import pytest
import torch

from helpers import compose_cfg, train
from distill.config import ConfigError, validate


def test_tscd_stages_run_each_from_the_previous_student(tiny_data, tmp_path):
    """segment_stages [4, 2, 1]: three stages, K per stage, each student continues the previous export's LoRA."""
    from safetensors.torch import load_file

    run = train(["+experiment=pcm_lora_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
                 "method.segment_stages=[4,2,1]", "method.segment_steps=[2]", "trainer.validation_steps=[1]"])
    folders = sorted((run / "stages").iterdir())
    assert [f.name for f in folders] == ["00_k4", "01_k2", "02_k1"]
    stages = [json.loads((f / "stage.json").read_text()) for f in folders]
    assert [s["method"]["num_segments"] for s in stages] == [4, 2, 1]
    assert stages[1]["info"]["student_init"] == str(folders[0] / "export")
    for f, k in zip(folders, (4, 2, 1)):
        info = json.loads((f / "export" / "export.json").read_text())
        assert info["num_segments"] == k and k in info["steps"]
    first = load_file(str(folders[0] / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    last = load_file(str(run / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    assert first.keys() == last.keys() and any(not torch.equal(first[k], last[k]) for k in first)


@pytest.mark.parametrize("override,key", [("method.segment_stages=[3]", "method.segment_stages"),
                                          ("method.segment_steps=[1,2,3]", "method.segment_steps")])
def test_tscd_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["+experiment=pcm_lora_tiny", "method.segment_stages=[4,2]", override]))


def test_a_stage_naming_another_method_gets_that_methods_checked_config():
    from distill.stages import Stage, stage_config

    cfg = validate(compose_cfg(["+experiment=pcm_lora_tiny"]))
    ok = Stage("score", 1, __import__("pathlib").Path("/tmp/x"),
               method={"name": "dmd2", "student_timesteps": [999], "guidance_scale": 5.0},
               trainer={"validation_steps": [1]}, optim={"lr": 3e-5})
    c = stage_config(cfg, ok, staged=True, last=True)
    assert c.method.name == "dmd2" and list(c.method.student_timesteps) == [999] and c.method.t_min == 20
    assert c.optim.lr == 3e-5 and cfg.method.name == "pcm"
    bad = Stage("score", 1, ok.folder, method={"name": "dmd2", "student_timesteps": [1, 999]})
    with pytest.raises(ConfigError, match="stage 'score' \\(dmd2\\).*student_timesteps"):
        stage_config(cfg, bad, staged=True, last=True)
    typo = Stage("score", 1, ok.folder, method={"name": "dmd2", "guidance_scal": 5.0})
    with pytest.raises(ConfigError, match="guidance_scal"):
        stage_config(cfg, typo, staged=True, last=True)


def test_tcd_etas_per_step_count_round_trip_and_reach_the_pipeline_and_card():
    from distill.card import scheduler_desc
    from distill.sampler import SamplerSpec

    spec = SamplerSpec("tcd", (1, 2, 4, 8), 1.0, eta=0.3, original_inference_steps=8, etas={1: 1.0, 8: 0.2})
    assert spec.eta_at(1) == 1.0 and spec.eta_at(8) == 0.2 and spec.eta_at(4) == 0.3
    info = json.loads(json.dumps(spec.to_info()))
    back = SamplerSpec.from_info(info)
    assert back == spec and back.pipeline_kwargs(8)["eta"] == 0.2 and back.pipeline_kwargs(2)["eta"] == 0.3
    assert "1 step: 1, 2 steps: 0.3, 4 steps: 0.3, 8 steps: 0.2" in scheduler_desc({**info, "arch": "sd15"})
    with pytest.raises(ValueError, match="etas"):
        SamplerSpec("lcm", (4,), etas={4: 0.5})
    with pytest.raises(ValueError, match="gamma"):
        SamplerSpec("tcd", (4,), eta=0.3, etas={4: 1.5})


def test_tcd_etas_change_the_samples_only_at_their_step_count():
    from distill.batch import prompt_cond
    from distill.diffusion import NoiseSchedule
    from distill.models import load_components
    from distill.sampler import SamplerSpec

    comps = load_components("distill:tiny-world")
    sched = NoiseSchedule.from_config(comps.scheduler_config)
    cond = prompt_cond(comps, ["a red circle on a black background"] * 2, 32, torch.device("cpu"))
    side = 32 // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    noise = torch.randn(2, comps.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(1))
    a = SamplerSpec("tcd", (2, 4), eta=0.3, original_inference_steps=8)
    b = SamplerSpec("tcd", (2, 4), eta=0.3, original_inference_steps=8, etas={4: 0.9})
    run = lambda s, n: s.sample(comps.unet, noise, cond, sched, n, [1, 2])  # noqa: E731
    assert torch.equal(run(a, 2), run(b, 2)) and not torch.allclose(run(a, 4), run(b, 4))


def test_tiny_reward_prefers_the_true_prompt_and_passes_gradients():
    from distill.data.synthetic import PROMPTS, caption, generate_batch
    from distill.evaluate import to_tensor
    from distill.models.reward import load_reward

    r = load_reward("distill:tiny-reward")
    assert r.info["split"] == "reward"  # not the evaluator's data
    imgs, attrs = generate_batch(range(48), 99, "heldout")
    x = to_tensor(imgs).requires_grad_(True)
    right = r(x, [caption(a) for a in attrs])
    wrong = r(x, [PROMPTS[(PROMPTS.index(caption(a)) + 1) % len(PROMPTS)] for a in attrs])
    assert (right > wrong).float().mean() > 0.9
    right.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())


def test_missing_reward_model_names_the_key(tmp_path):
    from distill.models.reward import load_reward

    with pytest.raises(FileNotFoundError, match="method.reward.model"):
        load_reward(str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["clip", "aesthetic"])
def test_clip_scorers_load_from_a_local_folder_and_score_differentiably(tmp_path, kind):
    """Random-weight models of the real classes (offline): saved as the folder layout, loaded by load_reward."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from distill.models.loader import ASSETS
    from distill.models.reward import CONFIG, AestheticHead, load_reward

    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 49408, "max_position_embeddings": 77}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    tok = CLIPTokenizer.from_pretrained(str(ASSETS / "tiny" / "teacher" / "tokenizer"))
    out = tmp_path / "reward"
    if kind == "clip":
        CLIPModel(cfg).save_pretrained(str(out / "clip"))
        tok.save_pretrained(str(out / "clip"))
    else:
        from safetensors.torch import save_file

        vcfg = cfg.vision_config
        vcfg.projection_dim = 16
        CLIPVisionModelWithProjection(vcfg).save_pretrained(str(out / "clip"))
        save_file(AestheticHead(16).state_dict(), str(out / "head.safetensors"))
    (out / CONFIG).write_text(json.dumps({"kind": kind}))
    r = load_reward(str(out))
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    s = r(x, ["a red circle", "a blue square"])
    assert s.shape == (2,) and torch.isfinite(s).all()
    s.sum().backward()
    assert x.grad.abs().sum() > 0
