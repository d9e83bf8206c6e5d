"""DeepSpeed ZeRO-3 helpers (scale-out, issue 9).

Under ZeRO-3 the trained module's parameters are partitioned across ranks: each rank holds a slice and the full
tensors exist only inside a forward (DeepSpeed's hooks gather them, on every rank at once) or inside
`deepspeed.zero.GatheredParameters`. Three rules follow, and this module holds the tools for them:

- Frozen parts (teacher, VAE, text encoders) are loaded whole on every rank: Accelerate registers the stage-3 config
  with transformers, which would otherwise build them partitioned (`no_zero3_init`). Only what trains is partitioned
  (by `accelerator.prepare`).
- Code that reads whole weights outside a forward (EMA update, export) gathers them first, on every rank
  (`gathered`); a check that can work on slices (the trainer's non-finite check) reads each rank's `ds_tensor` and
  all-reduces the verdict.
- A forward of a partitioned module runs on every rank or on none (validation samples on all ranks, rank 0 saves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from accelerate import Accelerator


def zero3_enabled(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and int(plugin.zero_stage or 0) == 3


def is_partitioned(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of these parameters is a ZeRO-3 partitioned parameter."""
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def no_zero3_init(accelerator: Accelerator) -> Iterator[None]:
    """Load models whole, even with a ZeRO-3 config active (transformers' `from_pretrained` otherwise partitions
    them at construction: a frozen text encoder would hold empty tensors on every rank)."""
    if not zero3_enabled(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # as Accelerate left it


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Full (read-only) parameters inside the block when they are ZeRO-3 partitioned; a no-op otherwise. Every rank
    must enter it together (it all-gathers); changes made inside are discarded."""
    params = list(params)
    if not is_partitioned(params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
