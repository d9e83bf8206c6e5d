"""Exports load into the ecosystem's loaders (diffusers' load_lora_weights for the PEFT and kohya LoRA,
from_pretrained / from_single_file for the fused UNet) and reproduce the in-memory student."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from distill import export_formats as fmt
from distill.config import LoraConfig
from distill.export import export_student, load_export, main
from distill.models.adapters import add_lora, student_with_w_embedding
from distill.models.tiny import build_pipeline

TOL = 1e-4


SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True}  # the real SDXL base UNet


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which on a loaded 2-core machine made each
    small op ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sdxl_base(path):
    """A tiny SDXL whose two text encoders differ in width, as in SDXL (768 / 1280). With equal widths
    diffusers' from_single_file cannot tell the encoders apart (it matches them by position-embedding width)."""
    pipe = build_pipeline("sdxl", "test", seed=0)
    c1 = pipe.text_encoder.config
    cfg2 = CLIPTextConfig(**{**c1.to_dict(), "hidden_size": 24, "intermediate_size": 48, "projection_dim": 24})
    te2 = CLIPTextModelWithProjection(cfg2)
    uc = dict(pipe.unet.config)
    uc.update(cross_attention_dim=c1.hidden_size + 24,
              projection_class_embeddings_input_dim=24 + 6 * uc["addition_time_embed_dim"])
    pipe = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=te2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=UNet2DConditionModel.from_config(uc), scheduler=pipe.scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def xl_base(tmp_path_factory):
    return _sdxl_base(tmp_path_factory.mktemp("sdxl_base"))


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15_base")
    build_pipeline("sd15", "test", seed=1).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _perturb(model, only_lora: bool, seed: int) -> None:
    """Random LoRA weights (B is zero at init, which would make every LoRA test trivially pass), or a small
    random change of every weight (a full student that differs from the teacher)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if only_lora and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif not only_lora:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _info(arch, base, **kw):
    return {"method": "lcd-lora", "teacher": base, "scheduler": "LCMScheduler", "steps": [1, 2, 4, 8],
            "guidance_scale": 1.0, "arch": arch} | kw


@pytest.fixture(scope="module")
def lora_export(xl_base, tmp_path_factory):
    """A LoRA student with alpha != rank (rank 4, alpha 8: scale 2) and random (non-zero) LoRA weights."""
    unet = UNet2DConditionModel.from_pretrained(xl_base, subfolder="unet")
    add_lora(unet, rank=4, alpha=8.0, dropout=0.0, target_modules=LoraConfig().target_modules)
    _perturb(unet, only_lora=True, seed=1)
    unet.eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out = tmp_path_factory.mktemp("lora_export")
    export_student(unet, out, lora=True, dtype=torch.float32, info=_info("sdxl", xl_base), base_path=xl_base)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "unet modified"
    return unet, out


def _xl_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([999, 459]),
                "encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(2, text_dim, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}}


@torch.no_grad()
def _out(unet, inputs, **kw):
    return unet.eval()(**inputs, **kw).sample


# -- the original layout against diffusers' own converters -------------------------------------------------------
def _same(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k, v in a.items():
        assert v.shape == b[k].shape and torch.equal(v, b[k]), k


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_original_layout_inverts_diffusers_converters(arch):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = build_pipeline(arch, "test", seed=2)
    sd = pipe.unet.state_dict()
    config = dict(pipe.unet.config)
    _same(convert_ldm_unet_checkpoint(fmt.unet_to_original(sd, config), config), sd)
    vae = pipe.vae.state_dict()
    _same(convert_ldm_vae_checkpoint(fmt.vae_to_original(vae), dict(pipe.vae.config)), vae)
    prefix = fmt.SDXL_CLIP_PREFIX if arch == "sdxl" else fmt.SD15_CLIP_PREFIX
    te = pipe.text_encoder.state_dict()
    back = convert_ldm_clip_checkpoint(fmt.clip_to_original(te, prefix))
    _same({k.removeprefix("text_model."): v for k, v in back.items()}, te)
    if arch == "sdxl":
        te2 = pipe.text_encoder_2.state_dict()
        orig = fmt.openclip_to_original(te2)
        assert orig[prefix.replace("0.transformer", "1.model") + "text_projection"].shape == tuple(te2["text_projection.weight"].shape[::-1])
        _same(convert_open_clip_checkpoint(pipe.text_encoder_2, orig, prefix=fmt.SDXL_OPENCLIP_PREFIX), te2)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_original_layout_of_full_size_unets(arch):
    """The real SDXL / SD 1.5 UNet configs (3 levels, 2 layers, 10-deep transformers; 4 levels), on the meta
    device: every key maps, diffusers maps it back, and the keys ComfyUI / diffusers detect models by exist."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sdxl = SDXL_UNET
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sdxl if arch == "sdxl" else {"cross_attention_dim": 768})
    sd, config = unet.state_dict(), dict(unet.config)
    orig = fmt.unet_to_original(sd, config)
    assert len(orig) == {"sdxl": 1680, "sd15": 686}[arch]
    assert set(convert_ldm_unet_checkpoint(orig, config)) == set(sd)
    p = fmt.UNET_PREFIX
    expected = {"sdxl": ["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.6.0.op.weight",
                         "output_blocks.2.2.conv.weight", "label_emb.0.0.weight",
                         "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight"],
                "sd15": ["output_blocks.11.0.skip_connection.weight", "input_blocks.1.1.proj_in.weight",
                         "output_blocks.2.1.conv.weight", "middle_block.2.out_layers.3.weight"]}[arch]
    assert all(p + k in orig for k in expected)


# -- LoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["diffusers", "kohya"])
def test_lora_loads_onto_fresh_teacher_and_reproduces_student(lora_export, xl_base, which):
    student, out = lora_export
    inputs = _xl_inputs(student)
    ref = _out(student, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_base)
    teacher_out = _out(pipe.unet, inputs)
    assert (teacher_out - ref).abs().max() > 1e-2  # the LoRA changes the output: the test below is not trivial
    if which == "diffusers":
        pipe.load_lora_weights(str(out / "lora"))
    else:
        pipe.load_lora_weights(str(out), weight_name="lora_kohya.safetensors")
    assert (_out(pipe.unet, inputs) - ref).abs().max() < TOL
    pipe.fuse_lora()
    assert (_out(pipe.unet, inputs) - ref).abs().max() < TOL


def test_lora_alpha_is_stored_and_needed(lora_export, xl_base):
    """alpha 8 / rank 4 is in the PEFT metadata and in every kohya `.alpha`; a loader that falls back to
    alpha = rank (no metadata; diffusers' convert_state_dict_to_kohya) loads it at half strength."""
    student, out = lora_export
    path = out / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(alphas) == len(downs) == len(fmt.lora_layers(student)) > 50
    assert all(float(a) == 8.0 for a in alphas) and all(k.startswith("lora_unet_") for k in kohya)

    inputs = _xl_inputs(student)
    ref = _out(student, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_base)
    pipe.load_lora_weights(load_file(str(path)))  # the same tensors without the metadata
    assert (_out(pipe.unet, inputs) - ref).abs().max() > 100 * TOL


# -- fused UNet: folder, one file, single-file checkpoint -------------------------------------------------------
def test_fused_formats_agree_with_student_and_lora(lora_export, xl_base):
    student, out = lora_export
    inputs = _xl_inputs(student, seed=3)
    ref = _out(student, inputs)
    folder = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert not any("lora" in k for k in folder.state_dict())
    assert (_out(folder, inputs) - ref).abs().max() < TOL
    one = UNet2DConditionModel.from_config(folder.config)
    one.load_state_dict(load_file(str(out / "unet.safetensors")))
    assert (_out(one, inputs) - ref).abs().max() < TOL

    single = StableDiffusionXLPipeline.from_single_file(str(out / "checkpoint.safetensors"), config=xl_base)
    assert (_out(single.unet, inputs) - ref).abs().max() < TOL
    base = StableDiffusionXLPipeline.from_pretrained(xl_base)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        _same(getattr(single, name).state_dict(), getattr(base, name).state_dict())

    # whole images: LoRA on the teacher, fused folder via load_export, single file, same seed -> same image
    base.load_lora_weights(str(out / "lora"))
    pipes = [base, load_export(out, xl_base), single]
    for p in pipes:
        p.scheduler = LCMScheduler.from_config(p.scheduler.config)
    images = [p("a red circle", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images for p in pipes]
    assert images[0].std() > 1e-3
    for img in images[1:]:
        assert abs(img - images[0]).max() < TOL


def test_w_embedding_student_bakes_guidance_into_single_file(xl_base, tmp_path):
    """A full LCD student takes w through `time_cond_proj_dim`; the diffusers folder keeps that input, the
    original layout has none, so the card's w is folded into the time embedding and the single file samples
    as the student at that w with no w input."""
    teacher = UNet2DConditionModel.from_pretrained(xl_base, subfolder="unet")
    student = student_with_w_embedding(teacher, 256)
    _perturb(student, only_lora=False, seed=4)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.02)
    info = _info("sdxl", xl_base, method="lcd", guidance_scale=8.5)
    export_student(student, tmp_path, lora=False, dtype=torch.float32, info=info, base_path=xl_base)
    inputs = _xl_inputs(student, seed=5)
    # the w embedding exactly as diffusers' SDXL pipeline computes it for guidance_scale 8.5 (w = 7.5)
    w = torch.tensor([7.5, 7.5])
    w_emb = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    ref = _out(student, inputs, timestep_cond=w_emb)
    assert (_out(student, inputs, timestep_cond=w_emb * 0) - ref).abs().max() > 1e-3
    folder = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    assert (_out(folder, inputs, timestep_cond=w_emb) - ref).abs().max() < TOL
    single = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "checkpoint.safetensors"), config=xl_base)
    assert single.unet.config.time_cond_proj_dim is None
    assert (_out(single.unet, inputs) - ref).abs().max() < TOL
    card = (tmp_path / "README.md").read_text()
    assert "baked" in card and "guidance_scale=1.0" in card
    assert not (tmp_path / "lora").exists() and not (tmp_path / "lora_kohya.safetensors").exists()


def test_sd15_folder_and_single_file(sd15_base, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(sd15_base, subfolder="unet")
    _perturb(unet, only_lora=False, seed=6)
    info = _info("sd15", sd15_base, method="pad", scheduler="EulerDiscreteScheduler-trailing-sample",
                 steps=[1], prediction_type="sample")
    export_student(unet, tmp_path, lora=False, dtype=torch.float32, info=info, base_path=sd15_base)
    g = torch.Generator().manual_seed(7)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([999, 10]),
                  "encoder_hidden_states": torch.randn(2, 77, 16, generator=g)}
    ref = _out(unet, inputs)
    assert (_out(UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")), inputs) - ref).abs().max() < TOL
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "checkpoint.safetensors"), config=sd15_base,
                                                      safety_checker=None, requires_safety_checker=False)
    assert (_out(single.unet, inputs) - ref).abs().max() < TOL
    keys = load_file(str(tmp_path / "checkpoint.safetensors")).keys()
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)

    # the card and load_export agree on the scheduler: Euler, trailing, x0 prediction
    card = (tmp_path / "README.md").read_text()
    assert 'timestep_spacing="trailing", prediction_type="sample"' in card and "StableDiffusionPipeline" in card
    pipe = load_export(tmp_path, sd15_base)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    sched = pipe.scheduler.config
    assert sched.timestep_spacing == "trailing" and sched.prediction_type == "sample"
    assert (_out(pipe.unet, inputs) - ref).abs().max() < TOL


def test_card_and_load_export_lcm(lora_export, xl_base):
    _, out = lora_export
    card = (out / "README.md").read_text()
    assert "LCMScheduler.from_config(pipe.scheduler.config)" in card and "load_lora_weights" in card
    assert "rank 4, alpha 8 (scale 2)" in card
    info = json.loads((out / "export.json").read_text())
    assert info["scheduler"] == "LCMScheduler" and info["steps"] == [1, 2, 4, 8] and info["lora"]["alpha"] == 8
    assert isinstance(load_export(out, xl_base).scheduler, LCMScheduler)


# -- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_exports_latest_checkpoint(xl_base, tmp_path):
    """A run folder in the trainer's layout (config.yaml, accelerate save_state of the prepared student,
    trainer_state.json); an incomplete later checkpoint is skipped."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from distill.config import validate
    from distill.methods import build_method
    from distill.models import load_components

    cfg = validate({"model": {"pretrained": xl_base}, "output_dir": str(tmp_path),
                    "method": {"name": "lcd", "lora": {"enabled": True, "rank": 4, "alpha": 8.0},
                               "w_min": 7.5, "w_max": 7.5},
                    "trainer": {"export_dtype": "fp16"}})
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    method = build_method(cfg, load_components(xl_base, parts=("unet",)), torch.device("cpu"))
    _perturb(method.student, only_lora=True, seed=8)
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(*method.modules.values())
    step = tmp_path / "checkpoints" / "step_3"
    acc.save_state(str(step))
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "method": {}}))
    (tmp_path / "checkpoints" / "step_5").mkdir()  # preempted mid-save: no trainer_state.json
    del prepared

    main(["--run", str(tmp_path), "--dtype", "fp32"])
    out = tmp_path / "export"
    info = json.loads((out / "export.json").read_text())
    assert info["method"] == "lcd-lora" and info["dtype"] == "float32" and info["lora"]["rank"] == 4
    inputs = _xl_inputs(method.student, seed=9)
    ref = _out(method.student, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_base)
    pipe.load_lora_weights(str(out / "lora"))
    assert (_out(pipe.unet, inputs) - ref).abs().max() < TOL
    assert (_out(UNet2DConditionModel.from_pretrained(str(out / "unet")), inputs) - ref).abs().max() < TOL


def test_trained_run_exports_end_to_end(tiny_data, tmp_path):
    """The real loop: a full LCD student (w-embedding, EMA in method_state) trained 2 steps exports at the end;
    the CLI on the same run writes the same weights (so it rebuilds and loads the student as training had it)."""
    from helpers import train

    run = train(["+experiment=lcm_tiny", "+debug=fast", f"output_dir={tmp_path}/run",
                 "trainer.validation_prompts=[]", "data.batch_size=2", "trainer.export_dtype=fp32",
                 "method.w_embedding_dim=32", "method.num_ddim_timesteps=20", "method.w_min=2", "method.w_max=8",
                 "method.inference_w=4", "method.inference_gamma=null"])
    trained_info = json.loads((run / "export" / "export.json").read_text())
    assert trained_info["method"] == "lcd" and trained_info["single_file_baked_w"] == 4.0
    # the skip grid it was trained on travels to the card and to the scheduler load_export builds
    assert trained_info["original_inference_steps"] == 20 and trained_info["guidance_scale"] == 5.0
    assert "LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=20)" in (
        run / "export" / "README.md").read_text()
    assert load_export(run / "export").scheduler.config.original_inference_steps == 20
    main(["--run", str(run), "--out", str(tmp_path / "cli")])
    trained, cli = (load_file(str(d / "unet.safetensors")) for d in (run / "export", tmp_path / "cli"))
    assert "time_embedding.cond_proj.weight" in cli and trained.keys() == cli.keys()
    assert all(torch.equal(trained[k], cli[k]) for k in trained)
    base = load_file(str(tmp_path / "cli" / "checkpoint.safetensors"))
    assert any(k.startswith("conditioner.embedders.1.model.") for k in base)


def test_tcd_sampler_export_matches_diffusers_pipeline(tiny_data, tmp_path):
    """method.inference_gamma names TCDScheduler in the export; the card's diffusers call (TCDScheduler, the
    w-embedding fed from guidance_scale, eta=gamma, per-sample generators) gives the images distill samples."""
    from helpers import train

    from distill.diffusion import NoiseSchedule, UNetCond, sample_lcm, seeded_noise
    from distill.models import decode_latents, encode_prompts, load_components
    from distill.models.adapters import guidance_embedding

    run = train(["+experiment=lcm_tiny", "+debug=fast", f"output_dir={tmp_path}/run", "trainer.max_steps=2",
                 "trainer.validation_prompts=[]", "data.batch_size=2", "trainer.export_dtype=fp32",
                 "method.w_embedding_dim=32", "method.inference_gamma=0.3"])
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["scheduler"] == "TCDScheduler" and info["eta"] == 0.3 and info["guidance_scale"] == 5.0
    card = (run / "export" / "README.md").read_text()
    assert "TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=10)" in card
    assert "guidance_scale=5, eta=0.3)" in card
    pipe = load_export(run / "export")
    assert isinstance(pipe.scheduler, TCDScheduler) and pipe.scheduler.config.original_inference_steps == 10
    prompts, seeds = ["a red circle on a black background", "a blue square on a white background"], [3, 7]
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, eta=0.3, height=32, width=32, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 2 - 1
    comps = load_components(info["teacher"])
    emb, pooled = encode_prompts(comps, prompts)
    w_emb = guidance_embedding(torch.full((2,), 4.0), 32)
    cond = UNetCond(emb, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2), w_emb)
    side = 32 // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    noise = seeded_noise(seeds, (2, 4, side, side))
    lat = sample_lcm(pipe.unet, noise, cond, NoiseSchedule.from_config(comps.scheduler_config), 4, seeds,
                     original_inference_steps=10, gamma=0.3)
    torch.testing.assert_close(decode_latents(comps, lat), ref.clamp(-1, 1), atol=1e-4, rtol=0)
    lcm = sample_lcm(pipe.unet, noise, cond, NoiseSchedule.from_config(comps.scheduler_config), 4, seeds,
                     original_inference_steps=10)
    assert (decode_latents(comps, lcm) - ref).abs().max() > 1e-3  # the sampler matters
