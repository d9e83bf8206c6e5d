"""Min-SNR-gamma weighting of the plain diffusion method (arXiv 2303.09556)."""

import torch
from helpers import compose_cfg

from distill.batch import Batch
from distill.config import validate
from distill.diffusion import UNetCond
from distill.methods import build_method
from distill.models import load_components


def _loss(gamma):
    extra = [] if gamma is None else [f"method.snr_gamma={gamma}"]
    cfg = validate(compose_cfg(["+experiment=teacher_tiny", "+debug=fast", *extra]))
    comps = load_components(cfg.model.pretrained, parts=("unet",))
    method = build_method(cfg, comps, torch.device("cpu"))
    c = comps.unet.config
    g = torch.Generator().manual_seed(0)
    cond = UNetCond(encoder_hidden_states=torch.randn(2, 77, c.cross_attention_dim, generator=g),
                    text_embeds=torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                                            generator=g) if c.addition_embed_type == "text_time" else None,
                    time_ids=torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)
                    if c.addition_embed_type == "text_time" else None)
    batch = Batch(latents=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g), cond=cond,
                  captions=["a", "b"], seeds=[1, 2])
    with torch.no_grad():
        return float(method.losses(batch, "g", 0)["loss"])


def test_min_snr_weighting_is_off_by_default_and_changes_the_loss():
    plain = _loss(None)
    assert abs(_loss(1e12) - plain) < 1e-6 * max(1.0, plain)  # gamma above every SNR: weight 1 (eps prediction)
    assert abs(_loss(0.01) - plain) > 1e-4 * plain  # a small gamma down-weights the low-noise samples
