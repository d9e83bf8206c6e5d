"""Tiny models of the real architectures: built offline, saved as diffusers folders, loaded back, sampled."""

import contextlib

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from distill.models import ModelNotFoundError, encode_prompts, load_components, resolve_model_path
from distill.models.tiny import save_tiny_pipeline


@pytest.mark.parametrize("arch,cls", [("sdxl", StableDiffusionXLPipeline), ("sd15", StableDiffusionPipeline)])
def test_tiny_pipeline_round_trips_and_samples(tmp_path, arch, cls):
    path = save_tiny_pipeline(tmp_path / arch, arch=arch)
    pipe = cls.from_pretrained(str(path))
    assert pipe.tokenizer.model_max_length == 77
    out = pipe("a red circle on a black background", num_inference_steps=2, height=32, width=32,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    again = cls.from_pretrained(str(path))("a red circle on a black background", num_inference_steps=2, height=32,
                                          width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(out, again)


def test_world_words_are_single_tokens(tmp_path):
    comps = load_components("distill:random-sdxl", parts=("tokenizer",))
    ids = comps.tokenizer("a red circle on a black background").input_ids
    assert len(ids) == 2 + 7  # bos + one token per word + eos


def test_loader_detects_arch_and_encodes(tmp_path):
    sdxl = load_components("distill:random-sdxl")
    sd15 = load_components("distill:random-sd15")
    assert (sdxl.arch, sd15.arch) == ("sdxl", "sd15")
    emb, pooled = encode_prompts(sdxl, ["a red circle", "a blue square"])
    assert emb.shape[-1] == sdxl.unet.config.cross_attention_dim and pooled.shape[0] == 2
    assert not torch.allclose(emb[0], emb[1])
    emb15, pooled15 = encode_prompts(sd15, ["a red circle"])
    assert pooled15 is None and emb15.shape[-1] == sd15.unet.config.cross_attention_dim


def test_hub_id_offline_fails_at_once_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model.*local diffusers folder"):
        resolve_model_path("nobody/no-such-model")


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        resolve_model_path(str(tmp_path / "empty"))



def _lora_unet(dtype=torch.float32, dropout=0.0):
    from distill.models.adapters import add_lora

    unet = load_components("distill:random-sdxl", parts=("unet",), dtype=dtype).unet
    add_lora(unet, 4, 4, dropout, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    g = torch.Generator().manual_seed(0)
    for n, p in unet.named_parameters():
        if "lora_B" in n:  # B is zero at init: give the adapters an effect
            p.data = torch.randn(p.shape, generator=g) * 0.05
    calls = []  # PEFT's own path calls every lora_A module; the fused path reads their weights instead
    for n, m in unet.named_modules():
        if n.endswith("lora_A.default"):
            m.register_forward_hook(lambda *a: calls.append(1))
    return unet, calls


def _unet_call(unet):
    from distill.diffusion import UNetCond
    from distill.diffusion.guidance import call_unet

    c, g = unet.config, torch.Generator().manual_seed(1)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = UNetCond(torch.randn(2, 77, c.cross_attention_dim, generator=g), torch.randn(2, pooled, generator=g),
                    torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2))
    x, t = torch.randn(2, c.in_channels, 16, 16, generator=g), torch.tensor([999, 400])
    return lambda: call_unet(unet, x, t, cond)


def test_lora_fused_no_grad_pass_is_peft_s_output_in_one_call_per_layer_and_leaves_the_weights_alone():
    from distill.models.adapters import adapters_disabled, lora_fused

    unet, calls = _lora_unet()
    f = _unet_call(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        peft_out = f()
        with adapters_disabled(unet):
            base_out = f()
    n_peft = len(calls)
    assert n_peft > 0 and (peft_out - base_out).abs().max() > 1e-3  # the adapters matter here
    calls.clear()
    with torch.no_grad(), lora_fused(unet):
        fused = f()
        with adapters_disabled(unet):  # the teacher inside a fused scope is still the base
            torch.testing.assert_close(f(), base_out, rtol=0, atol=0)
    assert calls == []  # no lora_A / lora_B call: each layer ran once with W + scale B A
    torch.testing.assert_close(fused, peft_out, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # nothing written
    assert not any("forward" in m.__dict__ for m in unet.modules())  # the scope restored PEFT's forward
    with torch.no_grad(), lora_fused(unet, enabled=False):
        torch.testing.assert_close(f(), peft_out, rtol=0, atol=0)
    assert len(calls) == n_peft
    calls.clear()
    with lora_fused(unet):  # grad enabled: PEFT's path, and the LoRA gets its gradient
        f().square().mean().backward()
    assert len(calls) == n_peft
    assert all(p.grad is not None for n, p in unet.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("case", ["bf16_base", "autocast", "dropout"])
def test_lora_fused_leaves_to_peft_what_it_cannot_merge_exactly(case):
    """A bf16 base (or an autocast region) would round a small delta away inside a merged weight; PEFT adds the
    LoRA path's output instead. Dropout has no merged form. All three run PEFT's path, bit for bit."""
    from distill.models.adapters import lora_fused

    unet, calls = _lora_unet(torch.bfloat16 if case == "bf16_base" else torch.float32,
                             dropout=0.1 if case == "dropout" else 0.0)
    unet.eval()  # dropout off (deterministic), but its layers still have no merged form
    f = _unet_call(unet)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        ref = f()
        n = len(calls)
        with lora_fused(unet):
            out = f()
    assert n > 0 and len(calls) == 2 * n
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
