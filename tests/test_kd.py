"""Layer-level KD into a smaller UNet (SSD-1B / Segmind-Vega): the student builder, the loss terms, a real 2-step
run with its exports loaded back, the single-file rule, and KD composed with a step method afterwards."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import compose_cfg, train
from distill.config import ConfigError, validate
from distill.models.student import PRESETS, StudentPlan, build_student, count_parameters, student_config

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json, the keys that decide the layout and the size
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
             "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "addition_embed_type_num_heads": 64, "projection_class_embeddings_input_dim": 2816,
             "use_linear_projection": True, "norm_num_groups": 32}
FAST = ["+debug=fast", "trainer.export_at_end=false", "trainer.validation_prompts=[]", "data.batch_size=4"]


def _plan(name: str) -> StudentPlan:
    p = PRESETS[name]
    return StudentPlan(p["down"], p["up"], p["mid_block"])


@pytest.mark.parametrize("name, low, high", [("ssd1b", 1.25e9, 1.40e9), ("vega", 0.70e9, 0.78e9)])
def test_presets_reproduce_the_published_layouts_and_sizes(name, low, high):
    """Counted on the meta device from SDXL's config: SSD-1B ~1.3B, Vega ~0.74B of SDXL's 2.57B."""
    assert abs(count_parameters(SDXL_UNET) - 2.567e9) < 0.01e9
    cfg = student_config(SDXL_UNET, _plan(name))
    assert low < count_parameters(cfg) < high
    assert cfg["mid_block_type"] == "UNetMidBlock2D"
    if name == "ssd1b":  # diffusers' SSD-1B config: [1, 2, 4] down, [[4, 4, 10], [2, 1, 1], -] up
        assert cfg["transformer_layers_per_block"] == [1, 2, 4]
        assert cfg["reverse_transformer_layers_per_block"][:2] == [[4, 4, 10], [2, 1, 1]]
    else:  # symmetric: diffusers needs no reverse list
        assert cfg["transformer_layers_per_block"] == [1, 1, 2]
        assert cfg["reverse_transformer_layers_per_block"] is None


def _teacher(**changes):
    from diffusers import UNet2DConditionModel

    from distill.models.tiny import build_unet

    torch.manual_seed(0)
    base = build_unet("sdxl", "test")
    own = {k: v for k, v in base.config.items() if not k.startswith("_")}  # `_use_default_values` would win
    return UNet2DConditionModel.from_config({**own, **changes}) if changes else base


def test_builder_copies_every_kept_tensor_by_name_and_reports_the_rest():
    """A teacher with two transformer layers per attention: keep one in the down block and [2, 1, 0->1, ...] in the
    up block, the mid block reduced to one ResNet; every student tensor is the teacher's of the same name."""
    teacher = _teacher(transformer_layers_per_block=2)
    plan = StudentPlan(down_transformer_layers=[None, 1], up_transformer_layers=[[2, 1], None], mid_block="resnet")
    student, report = build_student(dict(teacher.config), teacher.state_dict(), plan)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert not report.not_copied and len(report.copied) == len(s_sd)
    for k, v in s_sd.items():
        assert torch.equal(v, t_sd[k]), k
    assert len(student.down_blocks[1].attentions[0].transformer_blocks) == 1
    assert [len(a.transformer_blocks) for a in student.up_blocks[0].attentions] == [2, 1]
    assert type(student.mid_block).__name__ == "UNetMidBlock2D" and len(student.mid_block.resnets) == 1
    dropped = report.summary()["dropped"]
    assert "down_blocks.1.attentions.0.transformer_blocks.1" in dropped
    assert "up_blocks.0.attentions.1.transformer_blocks.1" in dropped
    assert "mid_block.attentions.0" in dropped and "mid_block.resnets.1" in dropped
    assert "up_blocks.0.attentions.0.transformer_blocks.1" not in dropped
    # it runs, and differs from the teacher only through what was removed
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    kw = dict(encoder_hidden_states=torch.randn(2, 77, 40),
              added_cond_kwargs={"text_embeds": torch.randn(2, 24), "time_ids": torch.zeros(2, 6)})
    assert student(x, t, **kw).sample.shape == teacher(x, t, **kw).sample.shape


def test_dropping_every_layer_of_an_attention_block_and_the_mid_block():
    """kd_tiny's plan: the deepest up block loses its attentions (an UpBlock2D), the mid block goes."""
    teacher = _teacher()
    student, report = build_student(dict(teacher.config), teacher.state_dict(),
                                    StudentPlan(up_transformer_layers=[0, None], mid_block="none"))
    assert student.config.up_block_types[0] == "UpBlock2D" and student.mid_block is None
    assert not report.not_copied
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    assert n_s < 0.7 * n_t
    with pytest.raises(ValueError, match="layers_per_block"):
        student_config(dict(teacher.config), StudentPlan(layers_per_block=[2, 1]))  # more than the teacher's


def test_a_preset_fits_a_teacher_of_another_layout():
    """The random tiny SDXL of the experiment matrix has 2 levels and one layer per attention: nothing to remove
    but the mid block's attention, and nothing is ever added."""
    teacher = _teacher()
    cfg = student_config(dict(teacher.config), _plan("ssd1b"))
    assert cfg["mid_block_type"] == "UNetMidBlock2D"
    assert cfg["transformer_layers_per_block"] == [1, 1] and cfg["reverse_transformer_layers_per_block"] is None


def _batch(comps, b: int = 4, seed: int = 0):
    from distill.diffusion import UNetCond
    from distill.methods.base import Batch

    g = torch.Generator().manual_seed(seed)
    c = comps.unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return Batch(latents=torch.randn(b, 4, 8, 8, generator=g), captions=["x"] * b, seeds=list(range(b)),
                 cond=UNetCond(torch.randn(b, 77, c.cross_attention_dim, generator=g),
                               torch.randn(b, pooled, generator=g), torch.zeros(b, 6)))


def _method(*overrides: str):
    from distill.methods import build_method
    from distill.models import load_components

    cfg = validate(compose_cfg(["+experiment=kd_tiny", *FAST, *overrides]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


@pytest.mark.parametrize("level", ["block", "layer"])
def test_output_and_feature_losses_vanish_for_the_teachers_own_layout(level):
    """Nothing removed: the student is the teacher, so the KD terms are exactly 0 and the loss is the task loss."""
    cfg, comps, m = _method("method.student.mid_block=keep", "method.student.up_transformer_layers=null",
                            f"method.feature_level={level}")
    out = m.losses(_batch(comps), "g", 0)
    assert float(out["loss_out"]) == 0.0 and float(out["loss_feat"]) == 0.0
    assert float(out["loss_task"]) > 0 and torch.equal(out["loss"], out["loss_task"])
    assert len(m.student_taps.names) == (5 if level == "block" else 10)  # 2 down, mid, 2 up / 9 ResNets and attentions + mid


def test_loss_terms_of_the_smaller_student():
    """kd_tiny's student: the loss is 1 task + 0.5 output + 0.5 features, each term positive, and the feature
    term alone reaches the student's weights."""
    cfg, comps, m = _method()
    assert m.student.mid_block is None and "mid_block" not in m.student_taps.names
    out = m.losses(_batch(comps), "g", 0)
    assert all(float(out[k]) > 0 for k in ("loss_task", "loss_out", "loss_feat"))
    torch.testing.assert_close(out["loss"], out["loss_task"] + 0.5 * out["loss_out"] + 0.5 * out["loss_feat"])
    _, _, m2 = _method("method.lambda_task=0", "method.lambda_out=0")
    m2.losses(_batch(comps), "g", 0)["loss"].backward()
    assert m2.student.down_blocks[1].attentions[0].proj_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m2.teacher.parameters())


def test_loss_falls_on_a_fixed_batch():
    cfg, comps, m = _method()
    opt = torch.optim.Adam(m.student.parameters(), lr=1e-3)
    batch, losses = _batch(comps), []
    for step in range(10):
        loss = m.losses(batch, "g", step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("override, key", [("method.student.preset=ssd2b", "method.student.preset"),
                                           ("method.student.mid_block=half", "method.student.mid_block"),
                                           ("method.feature_level=channel", "method.feature_level"),
                                           ("method.lambda_feat=-1", "method.lambda_feat")])
def test_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_cfg(["+experiment=kd_tiny", override]))


def test_single_file_rule(tmp_path):
    """The asymmetric layouts have a single-file form (test below); per-block ResNet counts do not: the original
    layout numbers blocks with one layers_per_block. Refused with a ValueError naming why, never a TypeError, and
    up front in the config (method.student.layers_per_block is one count for every block)."""
    from distill.export import export_student
    from distill.models.loader import resolve_model_path

    teacher = _teacher()
    student, _ = build_student(dict(teacher.config), teacher.state_dict(), StudentPlan(layers_per_block=[0, 1]))
    with pytest.raises(ValueError, match="layers_per_block.*single-file"):
        export_student(student, tmp_path, lora=False, dtype=torch.float32,
                       info={"method": "kd", "teacher": "distill:random-sdxl", "scheduler": "DDIMScheduler-trailing"},
                       base_path=resolve_model_path("distill:random-sdxl"))
    with pytest.raises(ConfigError, match="method.student.layers_per_block"):
        validate(compose_cfg(["+experiment=kd_tiny", "method.student.layers_per_block=[0,1]"]))


def test_run_exports_a_smaller_unet_that_loads_back_in_every_format(tiny_data, tmp_path):
    """The real loop for 2 steps (kd_tiny's own settings on the random tiny SDXL); the export is the EMA student:
    the diffusers folder, the single file (with the student's own config) and the card's pipeline all give it."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from distill.diffusion import NoiseSchedule, UNetCond, seeded_noise
    from distill.export import load_export
    from distill.models import decode_latents, encode_prompts, load_components
    from distill.sampler import SamplerSpec

    run = train(["+experiment=kd_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(k in rows[-1] for k in ("train/loss_task", "train/loss_out", "train/loss_feat"))
    exp = run / "export"
    info = json.loads((exp / "export.json").read_text())
    arch = info["architecture"]
    assert info["scheduler"] == "DDIMScheduler-trailing" and info["steps"] == [25] and info["guidance_scale"] == 5.0
    assert arch["ratio"] < 0.7 and arch["mid_block_type"] is None and arch["not_copied"] == {}
    card = (exp / "README.md").read_text()
    assert "A new, smaller architecture" in card and 'config=EXPORT_DIR + "/pipeline"' in card

    ema = {k.removeprefix("ema."): v for k, v in load_file(str(run / "checkpoints/step_2/method_state.safetensors")).items()}
    folder = UNet2DConditionModel.from_pretrained(str(exp / "unet"))
    assert folder.config.mid_block_type is None and folder.config.up_block_types[0] == "UpBlock2D"
    for k, v in folder.state_dict().items():
        assert torch.equal(v, ema[k]), k
    single = UNet2DConditionModel.from_single_file(str(exp / "checkpoint.safetensors"), config=str(exp / "unet"))
    pipe_single = StableDiffusionXLPipeline.from_single_file(str(exp / "checkpoint.safetensors"),
                                                             config=str(exp / "pipeline"))
    for net in (single, pipe_single.unet):
        for k, v in folder.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), k

    # the card's pipeline (DDIM trailing, CFG 5) samples what distill's sampler samples from the same noise
    pipe = load_export(exp)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    prompts, seeds = ["a red circle on a black background", "a blue square on a white background"], [3, 7]
    comps = load_components(info["teacher"])
    noise = seeded_noise(seeds, (2, 4, 16, 16))
    ref = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="pt",
               latents=noise.clone()).images * 2 - 1
    emb, pooled = encode_prompts(comps, prompts)
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    lat = SamplerSpec.from_info(info).sample(pipe.unet, noise, cond, NoiseSchedule.from_config(comps.scheduler_config),
                                             3, seeds, uncond=cond.zeros_like())
    torch.testing.assert_close(decode_latents(comps, lat), ref.clamp(-1, 1), atol=1e-4, rtol=0)

    # composition: a step method trains on the KD student (its export/pipeline is the next run's model)
    lcd = train(["+experiment=kd_then_lcm_tiny", "+debug=fast", f"model.pretrained={exp / 'pipeline'}",
                 f"output_dir={tmp_path}/lcd", "data.batch_size=2", "trainer.validation_prompts=[]"])
    lcd_info = json.loads((lcd / "export" / "export.json").read_text())
    assert lcd_info["method"] == "lcd-lora"
    lcd_unet = UNet2DConditionModel.from_pretrained(str(lcd / "export" / "unet"))
    assert lcd_unet.config.mid_block_type is None and lcd_unet.config.up_block_types[0] == "UpBlock2D"


def test_progressive_removal_runs_as_stages(tiny_data, tmp_path):
    """Remove, distil, remove more, distil again: stage 2 starts from stage 1's export and removes more of it."""
    from diffusers import UNet2DConditionModel

    stages = ("[{name:mid,max_steps:2,student:{mid_block:resnet}},"
              "{name:more,max_steps:2,student:{mid_block:none,up_transformer_layers:[0,null]}}]")
    run = train(["+experiment=kd_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "data.batch_size=2",
                 f"method.progressive={stages}", "trainer.validation_prompts=[]"])
    first, second = sorted((run / "stages").iterdir())
    assert [first.name, second.name] == ["00_mid", "01_more"]
    info = json.loads((second / "stage.json").read_text())["info"]
    assert info["student_init"] == str(first / "export" / "unet")
    a = UNet2DConditionModel.from_pretrained(str(first / "export" / "unet")).config
    b = UNet2DConditionModel.from_pretrained(str(run / "export" / "unet")).config
    assert a.mid_block_type == "UNetMidBlock2D" and a.up_block_types[0] == "CrossAttnUpBlock2D"
    assert b.mid_block_type is None and b.up_block_types[0] == "UpBlock2D"
    arch = json.loads((run / "export" / "export.json").read_text())["architecture"]
    assert arch["stage"] == "more" and "mid_block.resnets.0" in arch["dropped"] and arch["not_copied"] == {}
