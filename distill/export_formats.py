"""State-dict conversions behind distill.export: LoRA (PEFT and kohya), fused UNets, and the original
single-file (LDM / SGM) checkpoint layout that ComfyUI, A1111 and diffusers' `from_single_file` read.

diffusers ships only the original -> diffusers direction (`diffusers.loaders.single_file_utils`); the
functions here are its inverse, derived from the model config rather than hard-coded for SDXL, so they also
cover the tiny test models. The tests check them by round-tripping through diffusers' own converters.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text encoder prefixes of the original layouts: SD 1.x's CLIP-L, SDXL's CLIP-L and OpenCLIP-bigG
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."


# -- LoRA ------------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """module path -> PEFT LoRA layer carrying `adapter`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def effective_alpha(layer: nn.Module, adapter: str = "default") -> float:
    """The kohya `.alpha` that gives this layer's PEFT scaling: kohya scales by alpha / rank, PEFT by
    `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA), so alpha_kohya = scaling * r."""
    return float(layer.scaling[adapter]) * int(layer.r[adapter])


def lora_peft_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """PEFT keys without the adapter name (`<path>.lora_A.weight`), as `save_lora_weights` expects."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def lora_kohya_state_dict(model: nn.Module, adapter: str = "default", dtype: torch.dtype = torch.float32
                          ) -> dict[str, Tensor]:
    """`lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha` (diffusers module names, as
    LCM-LoRA and SDXL-Lightning ship). diffusers' `convert_state_dict_to_kohya` does the renaming but writes
    alpha = rank (scale 1), which loads a LoRA with alpha != rank at the wrong strength; the true alpha is
    written here from each layer's own scaling."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_sd = {f"unet.{k}": v.to(dtype) for k, v in lora_peft_state_dict(model, adapter).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    layers = lora_layers(model, adapter)
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        if f"{key}.lora_down.weight" not in kohya:
            raise KeyError(f"kohya conversion lost the LoRA of {name}")
        # a float scalar: A1111 / ComfyUI read it with .item(); fp32 keeps a non-integer alpha exact
        kohya[f"{key}.alpha"] = torch.tensor(effective_alpha(layer, adapter), dtype=torch.float32)
    if len(kohya) != 3 * len(layers):
        raise ValueError(f"kohya LoRA has {len(kohya)} tensors for {len(layers)} layers (expected 3 per layer)")
    return kohya


def lora_ldm_state_dict(model: nn.Module, config: dict, adapter: str = "default",
                        dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The kohya file with the original (LDM / SGM) module names, as kohya's sd-scripts writes SDXL LoRAs
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`): A1111 and ComfyUI map
    these by the checkpoint's own module names, for SDXL and SD 1.5 alike. A1111's diffusers-name fallback
    (`convert_diffusers_name_to_compvis`) numbers blocks as SD 1.5 does, so it silently drops SDXL layers
    such as up_blocks.0.upsamplers.0.conv from the diffusers-named file. Names come from `unet_module_map`,
    the same table as the single-file checkpoint."""
    kohya = lora_kohya_state_dict(model, adapter, dtype)
    out: dict[str, Tensor] = {}
    for name, ldm in lora_ldm_names(list(lora_layers(model, adapter)), config).items():
        src, dst = (f"lora_unet_{n.replace('.', '_')}" for n in (name, ldm))
        for part in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            out[dst + part] = kohya[src + part]
    return out


def lora_ldm_names(names: list[str], config: dict) -> dict[str, str]:
    """diffusers module path -> original module path for each LoRA layer; raises unless one-to-one."""
    modules = unet_module_map(config)
    out = {name: original_name(name, modules) for name in names}
    if len(set(out.values())) != len(out):
        raise ValueError("two LoRA layers map to the same original module")
    return out


# -- fusing ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def fused_state_dict(model: nn.Module, adapter: str = "default", base: dict[str, Tensor] | None = None
                     ) -> dict[str, Tensor]:
    """The model's state dict with every LoRA layer of `adapter` merged (W + scaling * B A, PEFT's own
    `get_delta_weight`) and plain module names (no `base_layer`, no `lora_`). The model is not modified,
    so training can go on. Merged weights are computed AND kept in fp32 (a Lightning LoRA stage's 1e-5..1e-4
    deltas are below bf16's half-ulp at typical weights): the export's dtype is applied once, by the caller.
    `base`: the base weights as stored (fp32), used instead of the model's copy when that one was trained in
    half precision, so a fused export is the stored base plus the delta, not a rounded base plus the delta."""
    layers = lora_layers(model, adapter)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach()
    if base is not None:
        if set(base) != set(out):
            raise ValueError(f"the stored LoRA base does not match the model: {sorted(set(base) ^ set(out))[:3]}")
        out = {k: base[k].to(v.device, torch.float32 if v.is_floating_point() else v.dtype) for k, v in out.items()}
    for name, layer in layers.items():
        if adapter in getattr(layer, "merged_adapters", []):
            continue  # already merged into the base weight in place
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = w.float() + layer.get_delta_weight(adapter).float().to(w.device)
    return out


def bake_guidance_embedding(state: dict[str, Tensor], w_embedding: Tensor) -> dict[str, Tensor]:
    """Fold a fixed guidance (w) embedding into the time embedding, for layouts without a w input.

    diffusers' TimestepEmbedding computes linear_1(t_emb + cond_proj(w_emb)); with w fixed,
    linear_1(x + c) = W1 x + (b1 + W1 c), so the bias absorbs c = cond_proj(w_emb) exactly and the model
    becomes a plain UNet that samples as the student at that guidance scale (LCM arXiv 2310.04378, Eq. 9:
    the w-conditioned consistency function evaluated at one w)."""
    out = dict(state)
    wc = out.pop("time_embedding.cond_proj.weight").float()  # [time_embed_in, w_dim], no bias
    w1, b1 = out["time_embedding.linear_1.weight"], out["time_embedding.linear_1.bias"]
    c = wc @ w_embedding.float().reshape(-1)
    out["time_embedding.linear_1.bias"] = (b1.float() + w1.float() @ c).to(b1.dtype)
    return out


# -- UNet: diffusers -> original (LDM) ---------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_module_map(config: dict) -> dict[str, str]:
    """diffusers module path -> original module path, laid out from the UNet config as the original
    UNetModel numbers its blocks: input_blocks.0 is conv_in, then per level `layers_per_block` (resnet,
    attention) pairs and a downsampler; output_blocks have one more layer per level, the upsampler sits after
    the last one (index 2 when the layer has an attention, else 1)."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):  # a ValueError, not a TypeError: the layout, not the caller, is the problem
        raise ValueError(f"layers_per_block={list(lpb)} differs per block: the original single-file layout "
                         "(checkpoint.safetensors for ComfyUI / A1111 / from_single_file) numbers its blocks with one "
                         "layers_per_block for every level, so this UNet has no single-file form; use the diffusers "
                         "folder (unet/) or one layers_per_block for all blocks")
    levels = len(config["block_out_channels"])
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if config.get("addition_embed_type") == "text_time":
        m.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    if config.get("class_embed_type") in ("timestep", "projection"):
        m.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})
    i = 1
    for b in range(levels):
        for j in range(lpb):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < levels - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    mid_attn = "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    m["mid_block.resnets.0"] = "middle_block.0"
    if mid_attn:
        m["mid_block.attentions.0"] = "middle_block.1"
    m["mid_block.resnets.1"] = f"middle_block.{2 if mid_attn else 1}"
    i = 0
    for b in range(levels):
        has_attn = "CrossAttn" in config["up_block_types"][b]
        for j in range(lpb + 1):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == lpb and b < levels - 1:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if has_attn else 1}.conv"
            i += 1
    return m


def unet_to_original(state: dict[str, Tensor], config: dict, prefix: str = UNET_PREFIX) -> dict[str, Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the original layout (`model.diffusion_model.*`).
    Every key must map; a key without an original counterpart (e.g. an LCM guidance projection, which
    `bake_guidance_embedding` removes first) raises instead of being silently dropped."""
    if "time_embedding.cond_proj.weight" in state:
        raise ValueError("the original layout has no guidance-embedding input: bake it in first "
                         "(bake_guidance_embedding)")
    modules = unet_module_map(config)
    return {prefix + original_name(key, modules): value for key, value in state.items()}


def original_name(name: str, modules: dict[str, str]) -> str:
    """One diffusers UNet key or module path -> its original (LDM / SGM) name, through `unet_module_map`."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest module prefix first
        module = ".".join(parts[:cut])
        if module in modules:
            rest = parts[cut:]
            if ".resnets." in f".{module}." and rest and rest[0] in _RESNET:
                rest = _RESNET[rest[0]].split(".") + rest[1:]
            return ".".join([modules[module], *rest])
    raise KeyError(f"UNet key {name!r} has no counterpart in the original layout")


# -- VAE -------------------------------------------------------------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state: dict[str, Tensor], prefix: str = VAE_PREFIX) -> dict[str, Tensor]:
    """AutoencoderKL -> the original `first_stage_model.*` layout (encoder.down.N.block.M, mid.block_1,
    mid.attn_1 with 1x1-conv q/k/v/proj_out, decoder.up numbered from the bottom)."""
    n_up = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        attn = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if attn:
            k = f"{attn.group(1)}.mid.attn_1.{_VAE_ATTN[attn.group(2)]}.{attn.group(3)}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        if "_blocks." in k or "mid_block" in k:
            raise KeyError(f"VAE key {key!r} has no counterpart in the original layout")
        out[prefix + k] = value
    return out


# -- text encoders ---------------------------------------------------------------------------------------------
def clip_to_original(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """CLIPTextModel -> `<prefix>text_model.*` (the transformers layout the originals embed). transformers
    >= 5.6 flattened CLIPTextModel (no `text_model.` in its keys); the original files always have it."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_to_original(state: dict[str, Tensor], prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP's layout (SDXL's second encoder): q/k/v fused into
    `attn.in_proj_*`, `text_projection` stored transposed (x @ P in OpenCLIP, Linear(x) = x W^T here)."""
    sd = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, Tensor] = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
        prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
            for a, b in _OPENCLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    if sd:
        raise KeyError(f"text encoder keys without an OpenCLIP counterpart: {sorted(sd)[:5]}")
    return out
