"""UNetCond plumbing and classifier-free guidance in one batched forward."""

from __future__ import annotations

import pytest
import torch

from distill.diffusion import UNetCond, guided_prediction


class CountingUNet:
    """Per-sample nonlinear function of (x, t, prompt, pooled, time_ids); records each call's batch size."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, x, t, encoder_hidden_states, added_cond_kwargs=None, timestep_cond=None):
        self.calls.append(x.shape[0])
        tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        h = encoder_hidden_states.sum((1, 2)).reshape(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            h = (
                h
                + added_cond_kwargs["text_embeds"].sum(1).reshape(-1, 1, 1, 1)
                + added_cond_kwargs["time_ids"].sum(1).reshape(-1, 1, 1, 1) * 1e-3
            )
        return (torch.tanh(x * (1 + tt / 1000) + h),)  # a tuple, like return_dict=False


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    B = 4
    cond = UNetCond(
        torch.randn(B, 3, 5, generator=g),
        torch.randn(B, 6, generator=g),
        torch.randn(B, 6, generator=g),
        torch.randn(B, 2, generator=g),
    )
    return torch.randn(B, 4, 2, 2, generator=g), torch.tensor([999, 500, 19, 0]), cond


def test_one_forward_of_2b_equals_two_forwards(inputs):
    x, t, cond = inputs
    uncond, unet = cond.zeros_like(), CountingUNet()
    out = guided_prediction(unet, x, t, cond, uncond, 7.5, "standard")
    assert unet.calls == [2 * x.shape[0]]
    e_c, e_u = unet(x, t, **cond.kwargs())[0], unet(x, t, **uncond.kwargs())[0]
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u))


def test_lcm_form_is_standard_with_w_plus_one_and_per_sample_scale(inputs):
    x, t, cond = inputs
    uncond, unet = cond.zeros_like(), CountingUNet()
    w = torch.tensor([3.0, 6.5, 10.0, 15.0])
    lcm = guided_prediction(unet, x, t, cond, uncond, w, "lcm")
    torch.testing.assert_close(lcm, guided_prediction(unet, x, t, cond, uncond, w + 1, "standard"))
    for i in range(4):  # per-sample scale == running each sample with its own float scale
        one = guided_prediction(
            unet, x[i : i + 1], t[i : i + 1], cond.index(i), uncond.index(i), float(w[i]), "lcm"
        )
        torch.testing.assert_close(one[0], lcm[i])


def test_trivial_guidance_runs_a_single_forward(inputs):
    x, t, cond = inputs
    unet = CountingUNet()
    plain = unet(x, t, **cond.kwargs())[0]
    for uncond, scale, form in [
        (None, 5.0, "standard"),
        (cond.zeros_like(), 1.0, "standard"),
        (cond.zeros_like(), 0.0, "lcm"),
    ]:
        unet.calls.clear()
        assert torch.equal(guided_prediction(unet, x, t, cond, uncond, scale, form), plain)
        assert unet.calls == [x.shape[0]]
    with pytest.raises(ValueError):
        guided_prediction(unet, x, t, cond, cond.zeros_like(), 2.0, "imagen")


def test_unet_cond_kwargs_zeros_cat_index_to(inputs):
    _, _, cond = inputs
    kw = cond.kwargs()
    assert set(kw) == {"encoder_hidden_states", "added_cond_kwargs", "timestep_cond"}
    assert set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    assert set(UNetCond(cond.encoder_hidden_states).kwargs()) == {"encoder_hidden_states"}  # SD 1.5
    z = cond.zeros_like()
    assert not z.encoder_hidden_states.any() and not z.text_embeds.any()
    assert torch.equal(z.time_ids, cond.time_ids) and torch.equal(z.timestep_cond, cond.timestep_cond)
    both = z.cat(cond)
    assert both.batch_size == 8 and torch.equal(both.index(slice(4, 8)).text_embeds, cond.text_embeds)
    assert torch.equal(cond.repeat(2).encoder_hidden_states[2], cond.encoder_hidden_states[1])
    half = cond.to(dtype=torch.bfloat16)
    assert half.encoder_hidden_states.dtype == torch.bfloat16 and half.text_embeds.dtype == torch.bfloat16
    # SDXL micro-conditioning stays exact: 1365 px would round to 1368 in bf16
    odd = UNetCond(cond.encoder_hidden_states, cond.text_embeds, torch.full_like(cond.time_ids, 1365.0))
    assert odd.to(dtype=torch.bfloat16).time_ids.dtype == torch.float32
    assert (odd.to(dtype=torch.bfloat16).time_ids == 1365).all()
    with pytest.raises(ValueError):
        cond.cat(UNetCond(cond.encoder_hidden_states))
