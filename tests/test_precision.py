"""bf16 faithful to the fp32 algorithm (DESIGN, precision rules): only network inputs and weights are cast; solver
steps, LoRA merges and SDXL micro-conditioning stay fp32. bf16 runs on CPU, so all of this is checked here."""

import torch
from safetensors.torch import load_file

from helpers import compose_cfg
from distill.config import validate
from distill.diffusion import NoiseSchedule, UNetCond, guided_ddim_step, to_x0_eps
from distill.diffusion.solvers import ddim_step
from distill.models import load_components
from distill.models.loader import stored_fp32_state

BF16 = torch.bfloat16


def _cond(unet, b: int, g: torch.Generator) -> UNetCond:
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    ids = torch.tensor([[1365.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b)
    return UNetCond(torch.randn(b, 77, c.cross_attention_dim, generator=g), torch.randn(b, pooled, generator=g), ids)


def test_teacher_ddim_step_runs_in_fp32_around_a_bf16_unet():
    comps = load_components("distill:random-sdxl", parts=("unet",), dtype=BF16)
    unet, schedule = comps.unet, NoiseSchedule.from_config(comps.scheduler_config)
    g = torch.Generator().manual_seed(0)
    x_t, cond = torch.randn(2, 4, 16, 16, generator=g), _cond(unet, 2, g)
    t, s, w = torch.tensor([999, 499]), torch.tensor([979, 479]), torch.tensor([3.3, 7.7])
    seen = {}
    unet.register_forward_pre_hook(lambda m, a, kw: seen.update(ids=kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True)
    x_s, _, _ = guided_ddim_step(unet, x_t, t, s, cond, cond.zeros_like(), w, schedule, net_dtype=BF16)
    assert x_s.dtype == torch.float32
    assert seen["ids"].dtype == torch.float32 and (seen["ids"][:, 0] == 1365).all()  # not rounded to 1368
    # the reference: the same bf16 forward, then guidance and the DDIM step in fp32 by hand
    both = cond.zeros_like().cat(cond).to(dtype=BF16)
    out = unet(torch.cat([x_t, x_t]).to(BF16), torch.cat([t, t]), **both.kwargs()).sample.float()
    u, c = out.chunk(2)
    x0, eps = to_x0_eps(c + w.view(-1, 1, 1, 1) * (c - u), x_t, t, schedule)
    torch.testing.assert_close(x_s, ddim_step(x0, eps, s, schedule), rtol=0, atol=1e-6)


def _lcd(extra: list[str]):
    from distill.methods import build_method

    cfg = validate(compose_cfg(["+experiment=lcm_tiny", "+debug=fast", "model.frozen_dtype=bf16", *extra]))
    comps = load_components(cfg.model.pretrained, parts=("unet",), dtype=BF16)
    return cfg, comps, build_method(cfg, comps, torch.device("cpu"))


def test_full_student_starts_from_the_stored_fp32_teacher_and_its_target_runs_under_autocast():
    cfg, comps, method = _lcd(["trainer.mixed_precision=bf16"])
    stored = load_components(cfg.model.pretrained, parts=("unet",)).unet.state_dict()
    student = method.student.state_dict()
    assert all(torch.equal(student[k], v) for k, v in stored.items()), "the student starts from rounded weights"
    assert any(not torch.equal(v.to(BF16).float(), v) for v in stored.values())  # bf16 would have rounded them
    flags = []
    method.ema.model.register_forward_pre_hook(lambda m, a: flags.append(torch.is_autocast_enabled("cpu")))
    from distill.methods.base import Batch

    g = torch.Generator().manual_seed(0)
    batch = Batch(latents=torch.randn(2, 4, 16, 16, generator=g), cond=_cond(comps.unet, 2, g), captions=["", ""],
                  seeds=[0, 1])
    loss = method.losses(batch, "g", 0)["loss"]
    assert torch.isfinite(loss) and flags == [True], flags


def test_lora_merge_onto_a_bf16_base_keeps_the_delta_in_the_fp32_export(tmp_path):
    """A Lightning LoRA stage's deltas (1e-5..1e-4) are below bf16's half-ulp at typical weights: merged and cast
    back to the base's bf16 they vanished. The fused fp32 export must be the stored fp32 base plus the delta."""
    from distill.export import export_student
    from distill.models.adapters import add_lora

    comps = load_components("distill:random-sdxl", parts=("unet",), dtype=BF16)
    unet = comps.unet
    add_lora(unet, 4, 4, 0.0, ["to_q", "to_k", "conv1"])
    g = torch.Generator().manual_seed(0)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 1e-5
    stored = stored_fp32_state(unet, comps)
    assert stored is not None  # the trained copy is bf16: the export reads the base as stored
    fp32_unet = load_components("distill:random-sdxl", parts=("unet",)).unet
    add_lora(fp32_unet, 4, 4, 0.0, ["to_q", "to_k", "conv1"])
    fp32_unet.load_state_dict({k: v.float() for k, v in unet.state_dict().items() if "lora_" in k}, strict=False)
    info = {"method": "lcd-lora", "teacher": comps.path, "scheduler": "LCMScheduler", "steps": [4],
            "guidance_scale": 1.0, "original_inference_steps": 50}
    export_student(unet, tmp_path / "bf16", lora=True, dtype=torch.float32, info=info, base_path=comps.path,
                   lora_base=stored)
    export_student(fp32_unet, tmp_path / "fp32", lora=True, dtype=torch.float32, info=info, base_path=comps.path)
    ours = load_file(str(tmp_path / "bf16" / "unet.safetensors"))
    ref = load_file(str(tmp_path / "fp32" / "unet.safetensors"))
    assert ours.keys() == ref.keys() and all(v.dtype == torch.float32 for v in ours.values())
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-7, msg=k)
    # the delta is really there (and a bf16 round trip of the merge would have lost most of it)
    k = next(k for k in ref if k.endswith("attn1.to_q.weight"))
    base = load_components("distill:random-sdxl", parts=("unet",)).unet.state_dict()[k]
    delta = ours[k] - base
    assert delta.abs().max() > 1e-6
    assert (((base.to(BF16).float() + delta).to(BF16).float() - base.to(BF16).float()) == 0).float().mean() > 0.5
