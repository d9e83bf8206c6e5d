"""Pieces every adversarial method shares: non-saturating losses in logits and gradient isolation that holds
under gradient checkpointing."""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters that do not require grad while held: backward flows through the module's activations (to the
    generator) but leaves its parameters' .grad untouched.

    Hold it over the forward AND the backward (Method.phase_scope does): non-reentrant gradient checkpointing
    recomputes a block during backward, and autograd saves different tensors for a frozen and a trainable weight
    (an addmm saves its input only when the weight needs grad), so flags restored before backward make the
    recompute disagree with the forward (torch.utils.checkpoint.CheckpointError)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def d_loss(l_real: Tensor, l_fake: Tensor) -> Tensor:
    """Non-saturating discriminator loss in logits: softplus(-l_real) + softplus(l_fake)."""
    return F.softplus(-l_real).mean() + F.softplus(l_fake).mean()


def g_loss(l_fake: Tensor) -> Tensor:
    """Non-saturating generator loss in logits: softplus(-l_fake)."""
    return F.softplus(-l_fake).mean()
