"""CPU time per UNet call: the teacher against smaller (KD) students, paired.

    python bench/unet_call.py --out FILE.json [--teacher distill:tiny-world] [--students EXPORT_OR_RUN ...]
                              [--plan mid_block=none up_transformer_layers=0,null] [--batch 64] [--rounds 30]

One call = one no-grad forward of batch B (default 64: the cond + uncond batch of a 32-image CFG sampling step) on the
tiny world's 8x8 latents, as a DDIM sampling step makes it. Rounds alternate teacher and students (each round times
every network once, in a rotating order), so a machine shared with other jobs slows all of them alike; the medians
and their ratio to the teacher's are reported, with the parameter counts. `--plan` builds a student from the teacher
by a removal plan (distill.models.student) instead of, or besides, trained exports (timing needs no trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from distill.models import load_components  # noqa: E402
from distill.models.student import StudentPlan, build_student  # noqa: E402


def _parse_plan(items: list[str]) -> StudentPlan:
    kw: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in ("down_transformer_layers", "up_transformer_layers"):
            kw[key] = [None if v == "null" else int(v) for v in value.split(",")]
        elif key == "layers_per_block":
            kw[key] = int(value)
        else:
            kw[key] = value
    return StudentPlan(**kw)


def _inputs(unet, batch: int, side: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    kw = {"encoder_hidden_states": torch.randn(batch, 77, c.cross_attention_dim, generator=g)}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch)}
    x = torch.randn(batch, c.in_channels, side, side, generator=g)
    return (x, torch.full((batch,), 499)), kw


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default="distill:tiny-world")
    p.add_argument("--students", nargs="*", default=[], help="export folders (or run folders with export/)")
    p.add_argument("--plan", nargs="*", default=None, help="removal plan KEY=VALUE items (see module doc)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    comps = load_components(args.teacher, parts=("unet",))
    nets = {"teacher": comps.unet.eval()}
    if args.plan is not None:
        nets["plan"] = build_student(dict(comps.unet.config), comps.unet.state_dict(), _parse_plan(args.plan))[0].eval()
    for s in args.students:
        folder = Path(s) / "unet" if (Path(s) / "unet").is_dir() else Path(s) / "export" / "unet"
        nets[s] = UNet2DConditionModel.from_pretrained(str(folder)).float().eval()
    side = int(comps.unet.config.sample_size)
    inputs = _inputs(comps.unet, args.batch, side)
    times: dict[str, list[float]] = {k: [] for k in nets}
    names = list(nets)
    with torch.no_grad():
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                nets[name](*inputs[0], **inputs[1])
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["teacher"])
    n_t = sum(q.numel() for q in nets["teacher"].parameters())
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        n = sum(q.numel() for q in nets[name].parameters())
        rows.append({"model": name, "parameters": n, "param_ratio": round(n / n_t, 4), "ms_per_call": round(1e3 * med, 2),
                     "time_ratio": round(med / base, 3), "iqr_ms": round(1e3 * (statistics.quantiles(ts, n=4)[2]
                                                                                  - statistics.quantiles(ts, n=4)[0]), 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"batch": args.batch, "latent": side, "threads": args.threads, "rounds": args.rounds,
              "load_avg": os.getloadavg()[0], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = "| model | parameters | x teacher | ms per call | x teacher |\n|---|---|---|---|---|\n"
    md += "".join(f"| {r['model']} | {r['parameters']:,} | {r['param_ratio']:.3f} | {r['ms_per_call']:.1f} | "
                  f"{r['time_ratio']:.3f} |\n" for r in rows)
    out.with_suffix(".md").write_text(md)
    return result


if __name__ == "__main__":
    main()
