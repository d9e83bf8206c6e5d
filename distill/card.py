"""The model card of an export (export/README.md): what the student is and how to sample it in diffusers,
ComfyUI, A1111 and refiners.

The diffusers snippets run with diffusers alone (no `distill` import: the teacher is written out as a hub id or
an absolute folder), on CUDA in fp16 or on the CPU in fp32, so a user can paste them unchanged and the tests run
them as they are. The UI settings follow from the sampler the student was trained for: LCMScheduler -> ComfyUI's
`lcm` sampler; trailing Euler (SDXL-Lightning) -> `euler` + `sgm_uniform` (trailing DDIM: `ddim`), and ModelSamplingDiscrete `x0` for an
x0-predicting (1-step) student, which otherwise samples garbage because ComfyUI assumes eps prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.sampler import SamplerSpec

LDM_LORA = "lora_ldm.safetensors"  # original (LDM) module names: ComfyUI, A1111 (and diffusers for SDXL)
PROMPT = "a photo of a cat"


def predicts_x0(info: dict) -> bool:
    return SamplerSpec.from_info(info).predicts_x0


def model_ref(name: str) -> str:
    """A model reference plain diffusers can load: `distill:NAME` built-ins and relative folders become absolute
    folders (valid on the machine that exported; hub ids stay as they are)."""
    if name.startswith("distill:"):
        from distill.models.loader import resolve_model_path

        return resolve_model_path(name)
    return str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name


def _overrides(spec: SamplerSpec) -> str:
    """The scheduler_kwargs written as python (the skip grid only when it is not diffusers' default 50)."""
    kw = spec.scheduler_kwargs()
    if spec.consistency and spec.grid == 50:
        kw = {}
    return "".join(f", {k}={json.dumps(v) if isinstance(v, str) else repr(v)}" for k, v in kw.items())


def scheduler_code(info: dict) -> str:
    spec = SamplerSpec.from_info(info)
    return f"pipe.scheduler = {spec.scheduler_class}.from_config(pipe.scheduler.config{_overrides(spec)})"


def scheduler_desc(info: dict) -> str:
    spec = SamplerSpec.from_info(info)
    if spec.consistency:
        desc = (f"{spec.scheduler_class} from the teacher's scheduler config, "
                f"original_inference_steps={spec.grid}")
        if spec.timesteps and len(spec.steps) > 1:  # own timesteps at some step count (DMD2's, Hyper-SD's 1-step mode)
            per = "; ".join(f"{n} step{'' if n == 1 else 's'}: timesteps={list(spec.timesteps[n])}"
                            for n in spec.steps if n in spec.timesteps)
            desc += f", explicit timesteps in the pipeline call by step count ({per})"
        if spec.kind == "tcd" and spec.etas:
            per = ", ".join(f"{n} step{'' if n == 1 else 's'}: {spec.eta_at(n):g}" for n in spec.steps)
            return desc + f", eta (gamma) in the pipeline call by step count ({per})"
        return desc + (f", eta (gamma) = {float(spec.eta or 0.0):g} in the pipeline call" if spec.kind == "tcd" else "")
    extra = f', prediction_type="{spec.prediction_type}"' if spec.predicts_x0 else ""
    return f'{spec.scheduler_class}, timestep_spacing="trailing"{extra}'


def _eta_arg(spec: SamplerSpec, n: int) -> str:
    """The pipeline call's eta argument at `n` steps (TCD's gamma; none for other schedulers)."""
    return f", eta={spec.eta_at(n):g}" if spec.kind == "tcd" else ""


def _facts(info: dict) -> dict:
    spec = SamplerSpec.from_info(info)
    steps = list(spec.steps)
    n = steps[len(steps) // 2] if steps else 4  # the step count the card's snippets sample
    gs = float(spec.guidance_scale)
    return {"pipe": "StableDiffusionXLPipeline" if info["arch"] == "sdxl" else "StableDiffusionPipeline",
            "spec": spec, "sched": spec.scheduler_class,
            "steps": steps, "n": n, "gs": gs,
            # the single file has no w input: a w-embedding student's w is baked in and samples with CFG 1
            "ui_cfg": 1.0 if "single_file_baked_w" in info else gs,
            "eta": _eta_arg(spec, n),  # TCD's gamma (pipeline's: 0)
            "timesteps": f", timesteps={list(spec.timesteps[n])}" if n in spec.timesteps else "",
            # the other step counts with their own timesteps (DMD2's 1-step mode), one pipeline call each
            "other_timesteps": {k: list(v) for k, v in spec.timesteps.items() if k != n},
            "teacher": info["teacher"], "base": info.get("lora_base") or info["teacher"]}


def model_card(info: dict, export_dir: str | Path = "EXPORT_DIR") -> str:
    """README.md of an export: settings, files, diffusers snippets for each format, ComfyUI / A1111 / refiners."""
    f = _facts(info)
    parts = [_head(info, f), "\n## Files\n\n", *[f"- `{x}`\n" for x in info.get("files", [])],
             "\n## Use with diffusers\n\n", _diffusers(info, f, str(export_dir)), _comfyui(info, f), _a1111(info, f)]
    if "lora" in info and info["lora"]["alpha"] != info["lora"]["rank"]:
        scale = info["lora"]["alpha"] / info["lora"]["rank"]
        parts.append(f"\n## refiners\n\nrefiners ignores the files' `.alpha`: load the LoRA with "
                     f"`scale={scale:g}` (alpha / rank), not its default LCM-LoRA scale.\n")
    parts.append(f'\nIn `distill`: `distill.export.load_export("{export_dir}", "{f["teacher"]}")` returns the fused '
                 "pipeline with this scheduler.\n")
    return "".join(parts)


def _head(info: dict, f: dict) -> str:
    head = f"""# {info['method']} student of `{f['teacher']}`

{'Smaller' if 'architecture' in info else 'Few-step'} {info['arch'].upper()} student distilled with `distill` (method `{info['method']}`).

| setting | value |
|---|---|
| teacher | `{f['teacher']}` |
| steps | {', '.join(map(str, f['steps']))} |
| scheduler | `{f['spec'].scheduler_name}` ({scheduler_desc(info)}) |
| guidance_scale | {f['gs']:g} |
| prediction type | {'sample (x0)' if predicts_x0(info) else 'as the teacher'} |
| dtype | {info.get('dtype', '')} |
"""
    if "lora" in info:
        lo = info["lora"]
        head += (f"| LoRA | rank {lo['rank']}, alpha {lo['alpha']:g} (scale {lo['alpha'] / lo['rank']:g}), "
                 f"{lo['layers']} layers, on `{f['base']}` |\n")
    if "architecture" in info:
        head += _architecture(info["architecture"])
    if "single_file_baked_w" in info:
        head += (f"\nThe UNet takes the guidance scale as an input (LCM w-embedding): `unet/` and "
                 f"`unet.safetensors` keep it (diffusers pipelines pass `guidance_scale` into it and run no "
                 f"classifier-free guidance). `checkpoint.safetensors` has no such input, so "
                 f"w = {info['single_file_baked_w']:g} (guidance_scale {f['gs']:g}) is baked into its time embedding: "
                 f"sample it with CFG 1 (`guidance_scale=1.0`, ComfyUI / A1111 CFG 1.0).\n")
    return head


def _architecture(a: dict) -> str:
    """A knowledge-distilled student (method kd): a new, smaller UNet layout, not the teacher's."""
    layout = ", ".join(f"`{k}`: {json.dumps(a.get(k))}" for k in
                       ("transformer_layers_per_block", "reverse_transformer_layers_per_block", "mid_block_type",
                        "layers_per_block", "down_block_types", "up_block_types"))
    return (f"\n**A new, smaller architecture.** This UNet is not the teacher's layout: blocks were removed and the "
            f"rest copied from the teacher by name, then distilled (layer-level KD, SSD-1B / Segmind-Vega recipe"
            f"{', preset `' + a['preset'] + '`' if a.get('preset') else ''}). {a['student_parameters']:,} parameters, "
            f"{a['ratio']:g}x the teacher's {a['teacher_parameters']:,}. Layout: {layout}. Load it with its own "
            "config (`unet/config.json`; the single file with `config=EXPORT_DIR + \"/pipeline\"`): the teacher's "
            "config would build the teacher's layout. It samples as the teacher does (no step distillation).\n")


def _snippet(f: dict, export_dir: str, load: str, gs: float, name: str, info: dict) -> str:
    """One runnable python block: device and dtype chosen at run time, the pipeline built by `load`."""
    other = "".join(f'# {k} step{"" if k == 1 else "s"}, at the timesteps trained for that step count:\n'
                    f'# image = pipe("{PROMPT}", num_inference_steps={k}, guidance_scale={gs:g}'
                    f'{_eta_arg(f["spec"], k)}, timesteps={v}).images[0]\n' for k, v in f["other_timesteps"].items())
    return f"""```python
import torch
from diffusers import {f['pipe']}, {f['sched']}, UNet2DConditionModel

EXPORT_DIR = "{export_dir}"  # this folder
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
{load}
{scheduler_code(info)}
image = pipe("{PROMPT}", num_inference_steps={f['n']}, guidance_scale={gs:g}{f['eta']}{f['timesteps']}).images[0]
{other}image.save("{name}.png")
```

"""


def _diffusers(info: dict, f: dict, export_dir: str) -> str:
    teacher = json.dumps(model_ref(f["teacher"]))
    out = []
    if "lora" in info:
        if f["base"] == f["teacher"]:
            load = f"pipe = {f['pipe']}.from_pretrained({teacher}, torch_dtype=dtype).to(device)\n"
        else:  # a later PAD stage: the LoRA continues a student UNet, not the teacher
            base = json.dumps(model_ref(f["base"]))
            load = (f"unet = UNet2DConditionModel.from_pretrained({base}, torch_dtype=dtype)\n"
                    f"pipe = {f['pipe']}.from_pretrained({teacher}, unet=unet, torch_dtype=dtype).to(device)\n")
        load += 'pipe.load_lora_weights(EXPORT_DIR + "/lora")\npipe.fuse_lora()'
        out.append(f"LoRA on `{f['base']}` (diffusers format; `weight_name=\"lora_kohya.safetensors\"` or "
                   f"`\"{LDM_LORA}\"` (SDXL) loads the other files):\n\n")
        out.append(_snippet(f, export_dir, load, f["gs"], "lora", info))
    load = (f'unet = UNet2DConditionModel.from_pretrained(EXPORT_DIR + "/unet", torch_dtype=dtype)\n'
            f"pipe = {f['pipe']}.from_pretrained({teacher}, unet=unet, torch_dtype=dtype).to(device)")
    out += ["Fused UNet:\n\n", _snippet(f, export_dir, load, f["gs"], "fused", info),
            ("`unet.safetensors` is the same UNet as one file "
             "(`unet.load_state_dict(safetensors.torch.load_file(...))`).\n\n"),
            "Single file (the ComfyUI / A1111 checkpoint; the teacher's VAE and text encoders are inside):\n\n"]
    # a smaller (KD) architecture: the config of its own layout, the teacher's folder with this UNet in it
    single_cfg = 'EXPORT_DIR + "/pipeline"' if "architecture" in info else teacher
    load = (f'pipe = {f["pipe"]}.from_single_file(EXPORT_DIR + "/checkpoint.safetensors", config={single_cfg}, '
            "torch_dtype=dtype).to(device)")
    out.append(_snippet(f, export_dir, load, f["ui_cfg"], "single_file", info))
    return "".join(out)


def _ui_file(info: dict, f: dict, where: str) -> str:
    if "lora" not in info:
        return f"`checkpoint.safetensors` as the checkpoint ({where})"
    if f["base"] == f["teacher"]:
        on = "the teacher's checkpoint"
    elif Path(f["base"]).name == "unet":  # a previous stage's export/unet: its single file sits beside it
        on = f"`{Path(f['base']).parent / 'checkpoint.safetensors'}` (the stage it continues)"
    else:
        on = f"the single-file checkpoint of `{f['base']}`"
    return (f"`{LDM_LORA}` (original module names) at strength 1.0 on {on}; or `checkpoint.safetensors` (the LoRA "
            f"fused in) as the checkpoint ({where})")


def _comfyui(info: dict, f: dict) -> str:
    n, cfg, lines = f["n"], f["ui_cfg"], []
    loader = "LoraLoaderModelOnly" if "lora" in info else "Load Checkpoint"
    lines.append(f"- file: {_ui_file(info, f, 'models/checkpoints')}; LoRA files go in models/loras ({loader})")
    spec = f["spec"]
    if spec.consistency:
        lines.append(f"- KSampler: sampler `lcm`, scheduler `sgm_uniform`, steps {n}, cfg {cfg:g}; "
                     "ModelSamplingDiscrete sampling `lcm` before it (the consistency boundary scalings)")
        orig = spec.grid
        if orig != 50:
            lines.append(f"- ComfyUI's `lcm` sampling assumes the 50-step skip grid; this student was trained on "
                         f"{orig} (diffusers' `original_inference_steps={orig}` above is exact)")
        if spec.kind == "tcd":
            lines.append(f"- TCD (eta {float(spec.eta or 0.0):g}) is not in core ComfyUI: use a TCD custom "
                         "node; the core `lcm` sampler is TCD with eta 1")
        if f["other_timesteps"]:
            per = "; ".join(f"{k} step{'' if k == 1 else 's'}: {v}" for k, v in f["other_timesteps"].items())
            lines.append(f"- trained at its own timesteps for other step counts ({per}), which `sgm_uniform` does "
                         "not give: sample those with SamplerCustom and the sigmas of exactly these timesteps")
    else:
        lines.append(f"- KSampler: sampler `{spec.kind}`, scheduler `sgm_uniform` (trailing timesteps), steps {n}, "
                     f"cfg {cfg:g}")
        if predicts_x0(info):
            lines.append("- the student predicts x0: add ModelSamplingDiscrete with sampling `x0` between the model "
                         "and the KSampler (without it the image is noise)")
    if "architecture" in info:
        lines.append("- a smaller UNet layout: ComfyUI detects SSD-1B's and Segmind-Vega's from the checkpoint's keys; "
                     "other removal plans may not be recognised")
    if info["teacher"].startswith("distill:"):
        lines.append("- the tiny world's models are too small for ComfyUI's and A1111's model detection; these "
                     "settings are those of the same recipe at SDXL / SD 1.5 size")
    return "\n## ComfyUI\n\n" + "\n".join(lines) + "\n"


def _a1111(info: dict, f: dict) -> str:
    n, cfg = f["n"], f["ui_cfg"]
    lines = [f"- file: {_ui_file(info, f, 'models/Stable-diffusion')}"]
    if "architecture" in info:
        lines.append("- a smaller UNet layout: A1111 loads SDXL's layout only, unless patched for asymmetric UNets "
                     "(A1111 issue 13787); use diffusers or ComfyUI")
    if "lora" in info:
        lines.append(f"- LoRA: `{LDM_LORA}` in models/Lora, prompt `<lora:{LDM_LORA.removesuffix('.safetensors')}:1>`")
    spec = f["spec"]
    if spec.consistency:
        lines.append(f"- sampler `LCM`, steps {n}, CFG scale {cfg:g}")
        if spec.grid != 50:
            lines.append("- A1111's LCM sampler assumes the 50-step skip grid, as ComfyUI's does")
        if spec.kind == "tcd":
            lines.append("- A1111 has no TCD sampler: `LCM` is TCD with eta 1")
    else:
        lines.append(f"- sampler `{spec.kind.upper() if spec.kind == 'ddim' else 'Euler'}`, schedule type "
                     f"`SGM Uniform`, steps {n}, CFG scale {cfg:g}")
        if predicts_x0(info):
            lines.append("- A1111 has no x0-prediction setting: sample this student with diffusers or ComfyUI")
    return "\n## A1111 (Stable Diffusion web UI)\n\n" + "\n".join(lines) + "\n"
