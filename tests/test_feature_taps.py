"""Feature taps and the tapped-feature discriminator: which parameters train in each backbone mode, gradients
through a frozen backbone, and taps that record once under gradient checkpointing's recompute."""

import copy

import pytest
import torch

from distill.diffusion import UNetCond, call_unet
from distill.methods.discriminator import UNetEncoder
from distill.methods.feature_taps import FeatureTaps, TapDiscriminator, _level_shapes, frozen_encoder_discriminator
from distill.models import load_components, resolve_model_path


@pytest.fixture(scope="module")
def unet():
    return load_components(resolve_model_path("distill:random-sdxl"), parts=("unet",)).unet.float()


def _inputs(unet, b=2, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, size, size, generator=g)
    d = unet.config.cross_attention_dim
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    cond = UNetCond(torch.randn(b, 5, d, generator=g), torch.randn(b, pooled, generator=g),
                    torch.tensor([[32.0, 32, 0, 0, 32, 32]] * b))
    return x, torch.tensor([999, 500]), cond


def _run(d, x, t, cond):
    x = x.clone().requires_grad_(True)
    logits = d(x, t, cond)
    logits.sum().backward()
    return logits, x.grad


def test_frozen_backbone_trains_heads_only_and_passes_gradient_to_x(unet):
    teacher = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = frozen_encoder_discriminator(teacher, latent_size=16, head_channels=8)
    assert {n.split(".")[0] for n, _ in d.named_parameters()} == {"heads"}  # the teacher is not D's parameter
    assert len(d.heads) == len(teacher.down_blocks) + 1
    x, t, cond = _inputs(teacher)
    logits, gx = _run(d, x, t, cond)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in teacher.parameters())
    assert gx is not None and gx.abs().sum() > 0  # the generator's gradient goes through the frozen teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def _inner_taps(teacher):
    """A frozen-encoder D tapping modules INSIDE the blocks diffusers checkpoints (resnets are recomputed)."""
    enc = UNetEncoder(teacher, share=True).requires_grad_(False)
    channels, sizes = _level_shapes(teacher, 16)
    return TapDiscriminator(enc, ["down_blocks.1.resnets.0", "mid_block.resnets.1.conv1"], [channels[1], channels[-1]],
                            [sizes[1], sizes[-1]], 8, "frozen")


def test_taps_record_once_under_gradient_checkpointing(unet):
    x, t, cond = _inputs(unet)
    torch.manual_seed(0)
    plain = _inner_taps(copy.deepcopy(unet).train())
    ref_logits, ref_gx = _run(plain, x, t, cond)
    ref_grads = [p.grad.clone() for p in plain.heads.parameters()]

    teacher = copy.deepcopy(unet)
    teacher.enable_gradient_checkpointing()
    teacher.train()
    d = _inner_taps(teacher)
    d.heads.load_state_dict(plain.heads.state_dict())
    seen = []
    d.taps.handles.append(teacher.mid_block.resnets[1].conv1.register_forward_hook(lambda m, a, o: seen.append(o)))
    logits, gx = _run(d, x, t, cond)
    assert len(seen) == 2  # the conv ran twice: its forward and the checkpoint's recompute in backward...
    assert d.taps.features["mid_block.resnets.1.conv1"] is seen[0]  # ...and the tap kept the forward's output only
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6)
    for a, b in zip(d.heads.parameters(), ref_grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_shared_backbone_reads_the_trained_networks_own_forward(unet):
    net = copy.deepcopy(unet).requires_grad_(True)
    c = net.config.block_out_channels[-1]
    d = TapDiscriminator(net, ["mid_block"], [c], [4], 8, "shared")
    assert {n.split(".")[0] for n, _ in d.named_parameters()} == {"heads"}
    x, t, cond = _inputs(net)
    logits, out = d.forward_with_output(x, t, cond)
    torch.testing.assert_close(out, call_unet(net, x, t, cond))  # tapping does not change the prediction
    (logits.sum() + out.mean()).backward()
    assert net.mid_block.resnets[0].conv1.weight.grad is not None  # the head's loss reaches the shared network


def test_copy_backbone_is_trained_and_bad_tap_names_are_named(unet):
    enc = UNetEncoder(unet)
    d = TapDiscriminator(enc, ["mid_block"], [unet.config.block_out_channels[-1]], [4], 8, "copy")
    assert any(n.startswith("backbone.") for n, _ in d.named_parameters())
    assert enc.conv_in.weight is not unet.conv_in.weight and UNetEncoder(unet, share=True).conv_in is unet.conv_in
    with pytest.raises(KeyError, match="down_blocks.9"):
        FeatureTaps(enc, ["down_blocks.9"])
    with pytest.raises(ValueError, match="mode='heads'"):
        TapDiscriminator(enc, ["mid_block"], [4], [4], 8, "heads")
