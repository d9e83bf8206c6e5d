"""Exports as users of other tools meet them: the LoRA with original (LDM) module names that ComfyUI and A1111
map directly, and model cards whose diffusers snippets run with diffusers alone and whose ComfyUI / A1111
settings follow the sampler the student was trained for."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import test_export
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from test_export import TOL, _info, _out, _xl_inputs

from distill import export_formats as fmt
from distill.card import LDM_LORA, model_card
from distill.config import LoraConfig
from distill.export import export_student
from distill.models.adapters import add_lora

SDXL = test_export.SDXL_UNET
SD15 = {"cross_attention_dim": 768}  # diffusers' defaults are SD 1.5's UNet
# the export tests' module fixtures (tiny SDXL and SD 1.5 teachers, a LoRA student exported with alpha 8, rank 4)
one_thread, xl_base, sd15_base, lora_export = (test_export.one_thread, test_export.xl_base, test_export.sd15_base,
                                               test_export.lora_export)


def _original_modules(unet) -> set[str]:
    """The module names of the single-file checkpoint (what ComfyUI and A1111 match `lora_unet_*` against)."""
    orig = fmt.unet_to_original(unet.state_dict(), dict(unet.config), prefix="")
    return {k.rsplit(".", 1)[0] for k in orig}


# -- the LDM-named LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_ldm_lora_names_are_modules_of_the_full_size_checkpoint(arch):
    """Real-size UNets on the meta device: every LoRA layer of the default target list gets the name of a module
    of the single-file conversion, one to one, with the names kohya's sd-scripts writes."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL if arch == "sdxl" else SD15)
        modules = _original_modules(unet)
        add_lora(unet, rank=4, alpha=4.0, dropout=0.0, target_modules=LoraConfig().target_modules)
    names = list(fmt.lora_layers(unet))
    ldm = fmt.lora_ldm_names(names, dict(unet.config))
    assert len(ldm) == len(set(ldm.values())) == len(names) == {"sdxl": 788, "sd15": 278}[arch]
    assert set(ldm.values()) <= modules, sorted(set(ldm.values()) - modules)[:5]
    expected = {"sdxl": {"up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
                         "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
                             "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                         "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
                         "mid_block.attentions.0.transformer_blocks.9.ff.net.2":
                             "middle_block.1.transformer_blocks.9.ff.net.2"},
                "sd15": {"up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
                         "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
                         "up_blocks.3.resnets.2.conv_shortcut": "output_blocks.11.0.skip_connection",
                         "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1"}}[arch]
    assert {k: ldm[k] for k in expected} == expected


def test_ldm_lora_file_loads_in_diffusers_and_reproduces_student(lora_export, xl_base):
    """diffusers reads kohya / sd-scripts SDXL LoRAs with original names (`_maybe_map_sgm_blocks_to_diffusers`), so
    the file loads back onto a fresh teacher and gives the student's output, with each layer's true alpha.
    (For SD 1.5, whose first up block has no attention, diffusers' block mapping misplaces the upsampler, so
    only the names are checked there, above; ComfyUI and A1111 map both by name.)"""
    student, out = lora_export
    ldm = load_file(str(out / LDM_LORA))
    layers = fmt.lora_layers(student)
    assert len(ldm) == 3 * len(layers)
    modules = _original_modules(UNet2DConditionModel.from_pretrained(xl_base, subfolder="unet"))
    underscored = {"lora_unet_" + m.replace(".", "_") for m in modules}  # ComfyUI's key map of the checkpoint
    assert {k.split(".")[0] for k in ldm} <= underscored
    assert "lora_unet_output_blocks_1_2_conv.lora_down.weight" in ldm  # up_blocks.0.upsamplers.0.conv (1 layer)
    assert all(float(v) == 8.0 for k, v in ldm.items() if k.endswith(".alpha"))

    inputs = _xl_inputs(student, seed=11)
    ref = _out(student, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_base)
    assert (_out(pipe.unet, inputs) - ref).abs().max() > 1e-2
    pipe.load_lora_weights(str(out), weight_name=LDM_LORA)
    assert (_out(pipe.unet, inputs) - ref).abs().max() < TOL


# -- the card's diffusers snippets run with diffusers alone --------------------------------------------------------
BLOCK_DISTILL = """
import importlib.abc, sys
class _NoDistill(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "distill" or name.startswith("distill."):
            raise ImportError("distill is not installed here")
sys.meta_path.insert(0, _NoDistill())
try:
    import distill
except ImportError:
    pass
else:
    raise SystemExit("the distill blocker failed")
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"))
"""


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def run_card(card: str, cwd) -> None:
    blocks = python_blocks(card)
    assert blocks and not any("distill" in b for b in blocks), "a snippet names distill"
    script = cwd / "card_snippets.py"
    script.write_text("\n".join(blocks))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    proc = subprocess.run([sys.executable, "-c", BLOCK_DISTILL, str(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _image_ok(path) -> None:
    img = Image.open(path)
    assert img.size[0] >= 16 and img.size[1] >= 16


def test_lora_card_snippets_run_without_distill(lora_export, tmp_path):
    _, out = lora_export
    run_card((out / "README.md").read_text(), tmp_path)
    for name in ("lora", "fused", "single_file"):
        _image_ok(tmp_path / f"{name}.png")


def test_x0_card_snippets_run_without_distill(sd15_base, tmp_path):
    """A 1-step x0 (PAD) full student of SD 1.5: trailing Euler with prediction_type="sample" from the card."""
    unet = UNet2DConditionModel.from_pretrained(sd15_base, subfolder="unet")
    info = _info("sd15", sd15_base, method="pad", scheduler="EulerDiscreteScheduler-trailing-sample", steps=[1],
                 prediction_type="sample")
    export_student(unet, tmp_path / "export", lora=False, dtype=torch.float32, info=info, base_path=sd15_base)
    card = (tmp_path / "export" / "README.md").read_text()
    assert len(python_blocks(card)) == 2  # fused and single file, no LoRA
    run_card(card, tmp_path)
    for name in ("fused", "single_file"):
        _image_ok(tmp_path / f"{name}.png")


# -- the card's settings per sampler -----------------------------------------------------------------------------
def _card(**kw) -> str:
    return model_card(_info("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", **kw), "/exports/x")


def _code(card: str) -> str:
    return "\n".join(python_blocks(card))


def test_card_lcm_lora():
    card = _card(lora={"rank": 64, "alpha": 64.0, "layers": 788, "target_modules": []},
                 files=["lora_kohya.safetensors", LDM_LORA])
    assert "sampler `lcm`, scheduler `sgm_uniform`, steps 4, cfg 1" in card
    assert "ModelSamplingDiscrete sampling `lcm`" in card and f"`{LDM_LORA}`" in card
    assert "sampler `LCM`, steps 4, CFG scale 1" in card and "<lora:lora_ldm:1>" in card
    assert "## refiners" not in card and "50-step" not in card  # alpha = rank; the 50-step grid it assumes
    assert 'from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=dtype)' in _code(card)


def test_card_tcd_full_student_with_baked_w():
    card = _card(method="lcd", scheduler="TCDScheduler", eta=0.3, original_inference_steps=20,
                 guidance_scale=8.5, single_file_baked_w=7.5)
    code = _code(card)
    assert "TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=20)" in code
    assert "guidance_scale=8.5, eta=0.3)" in code and "guidance_scale=1, eta=0.3)" in code  # folder; single file
    assert "cfg 1;" in card and "CFG scale 1" in card  # the UIs load the single file, whose w is baked in
    assert "TCD custom node" in card and "A1111 has no TCD sampler" in card
    assert card.count("50-step skip grid") == 2 and "trained on 20" in card


def test_card_lightning_x0_and_lora_base():
    card = _card(method="pad", scheduler="EulerDiscreteScheduler-trailing-sample", steps=[1],
                 prediction_type="sample")
    assert 'timestep_spacing="trailing", prediction_type="sample")' in _code(card)
    assert "sampler `euler`, scheduler `sgm_uniform`" in card and "ModelSamplingDiscrete with sampling `x0`" in card
    assert "sampler `Euler`, schedule type `SGM Uniform`, steps 1, CFG scale 1" in card
    assert "A1111 has no x0-prediction setting" in card

    lora = {"rank": 8, "alpha": 4.0, "layers": 10, "target_modules": []}
    card = _card(method="pad-lora", scheduler="EulerDiscreteScheduler-trailing", steps=[4],
                 prediction_type="epsilon", lora=lora, lora_base="/runs/pad/stages/00/export/unet")
    code = _code(card)
    assert 'UNet2DConditionModel.from_pretrained("/runs/pad/stages/00/export/unet", torch_dtype=dtype)' in code
    assert "x0" not in card and "refiners ignores" in card and "`scale=0.5`" in card
    assert "on `/runs/pad/stages/00/export/checkpoint.safetensors` (the stage it continues)" in card  # UIs


def test_card_builtin_teacher_is_written_as_a_folder():
    from distill.models.loader import resolve_model_path

    card = model_card(_info("sdxl", "distill:tiny-world"), "/exports/x")
    assert f'"{resolve_model_path("distill:tiny-world")}"' in _code(card) and "distill:" not in _code(card)
