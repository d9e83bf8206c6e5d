"""Tiny models of the real architectures: built offline, saved as diffusers folders, loaded back, sampled."""

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
