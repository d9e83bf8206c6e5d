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


def prepare_engines(acc: Accelerator, modules: dict[str, torch.nn.Module], optimizers: list, names: list[str]):
    """One DeepSpeed engine per trained module, each with the optimizer of its parameters. Accelerate's prepare
    turns every module of one call into the same engine and drives only one engine in `backward`, so a method with
    two models and two optimizers (a GAN: generator and discriminator) is prepared pair by pair here, and the
    trainer runs each engine's backward and step itself. Returns (wrapped modules, optimizers, engine per
    optimizer)."""
    import logging

    owned = {n: {id(p) for p in modules[n].parameters()} for n in modules}
    pairs: dict[str, int] = {}
    for i, opt in enumerate(optimizers):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        owner = [n for n in modules if ids <= owned[n]]
        if len(owner) != 1 or owner[0] in pairs:
            raise ValueError(f"DeepSpeed needs one optimizer per trained module; optimizer {names[i]!r} updates "
                             f"{owner or 'no single module'}")
        pairs[owner[0]] = i
    if set(pairs) != set(modules):
        raise ValueError(f"DeepSpeed needs an optimizer for every trained module: {sorted(set(modules) - set(pairs))}")
    wrapped, optimizers, engines = {}, list(optimizers), [None] * len(optimizers)

    def quiet(record: logging.LogRecord) -> bool:  # Accelerate warns from the 2nd engine on that its backward
        return "wrapped DeepSpeed engine reference" not in record.getMessage()  # drives one: we never call it

    logging.getLogger("accelerate.accelerator").addFilter(quiet)
    try:
        for n in modules:  # in the modules' order: checkpoints name the first one model.safetensors
            i = pairs[n]
            wrapped[n], optimizers[i] = acc.prepare(modules[n], optimizers[i])
            engines[i] = wrapped[n]
    finally:
        logging.getLogger("accelerate.accelerator").removeFilter(quiet)
    return wrapped, optimizers, engines


def engine_backward(engine, loss: torch.Tensor, boundary: bool) -> float | None:
    """Backward of one DeepSpeed engine and, at the accumulation boundary, its step (clipping included, from the
    DeepSpeed config); returns the gradient norm after a step, None between micro-batches. The engine steps inside,
    so the trainer has all ranks agree on the loss's finiteness BEFORE this call: a non-finite loss never reaches
    the weights. A finite loss with a non-finite gradient is seen only after the step: it is counted."""
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss)
    if not boundary:
        return None
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def fill_deepspeed_auto(acc: Accelerator, cfg) -> None:
    """The loader is not prepared, so DeepSpeed's "auto" micro-batch and clipping cannot be inferred from it:
    fill them from the run's config."""
    ds = acc.state.deepspeed_plugin
    if ds is None:
        return
    for key, value in (("train_micro_batch_size_per_gpu", cfg.data.batch_size),
                       ("gradient_clipping", cfg.optim.max_grad_norm)):
        if ds.is_auto(key):
            ds.deepspeed_config[key] = value
