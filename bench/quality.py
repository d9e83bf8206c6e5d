"""Quality on the tiny world: the teacher at 50..1 DDIM steps and every distilled student at its step counts.

    python bench/quality.py [--quick] [--runs RUN_OR_EXPORT_DIR ...] --out FILE.json [--grid FILE.png]

Metrics per row (same prompts and per-sample seeded noise in every row):
  fd        Frechet distance of the evaluator's features, generated vs held-out real images (lower is better)
  attr_acc  fraction of images whose colour, shape and background all match the prompt (prompt adherence)
  mse_t50   mean per-sample pixel MSE to the teacher's 50-step DDIM image from the same noise and prompt
The teacher samples with DDIM, `trailing` spacing, CFG scale 5 (standard form; `--teacher-guidance 5 3` adds rows at
other scales; the 50-step reference of mse_t50 is always the first scale). Students sample the way their export's
sampler spec says (distill.sampler: LCMScheduler, TCDScheduler, Euler or DDIM trailing), using the exported (fused) UNet; `--student-guidance 3 5`
samples students that take a guidance (w) input (w = scale - 1) or were distilled CFG-free at those CFG scales instead of the card's, and
`--student-sampler lcm 0 0.3` consistency and segmented students with LCMScheduler or TCDScheduler at those gammas (eta).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.data.synthetic import ATTRIBUTES, caption  # noqa: E402
from distill.diffusion import NoiseSchedule, UNetCond, seeded_noise  # noqa: E402
from distill.evaluate import load_evaluator, mse_to_reference, real_reference, save_grid  # noqa: E402
from distill.models import decode_latents, encode_prompts, load_components  # noqa: E402
from distill.sampler import SamplerSpec  # noqa: E402

TEACHER_STEPS = [50, 25, 8, 4, 2, 1]
QUICK_TEACHER_STEPS = [50, 8, 4, 2, 1]
GUIDANCE = 5.0


def all_prompts() -> list[str]:
    return [caption(dict(color=c, shape=s, background=b)) for c in ATTRIBUTES["color"]
            for s in ATTRIBUTES["shape"] for b in ATTRIBUTES["background"]]


def find_exports(path: Path) -> list[Path]:
    """A run folder (export/ and, for staged methods, stages/*/export/) or an export folder itself."""
    if (path / "export.json").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("stages/*/export/export.json"))
    if (path / "export" / "export.json").exists() and not found:
        found.append(path / "export")
    if not found:
        raise SystemExit(f"--runs {path}: no export.json in it, in export/ or in stages/*/export/ "
                         "(export a run with python -m distill.export --run RUN_DIR)")
    return found


class Bench:
    def __init__(self, teacher: str, n: int, n_ref: int, batch: int = 250):
        self.comps = load_components(teacher)
        self.schedule = NoiseSchedule.from_config(self.comps.scheduler_config)
        self.evaluator = load_evaluator()
        self.reference = real_reference(n_ref)
        prompts = all_prompts()
        self.prompts = [prompts[i % len(prompts)] for i in range(n)]
        emb, pooled = encode_prompts(self.comps, prompts)
        idx = torch.tensor([i % len(prompts) for i in range(n)])
        res = 32
        sdxl = self.comps.arch == "sdxl"
        self.cond = UNetCond(encoder_hidden_states=emb[idx], text_embeds=pooled[idx] if sdxl else None,
                             time_ids=torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32) if sdxl else None)
        self.seeds = list(range(n))
        unet = self.comps.unet
        scale = 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        self.noise = seeded_noise(self.seeds, (n, unet.config.in_channels, res // scale, res // scale), "cpu", torch.float32)
        self.batch = batch

    def generate(self, fn) -> tuple[torch.Tensor, float]:
        """Run a latent sampler chunk by chunk (per-sample seeds keep it batch-size independent); decode."""
        t0 = time.time()
        out = []
        for i in range(0, len(self.seeds), self.batch):
            sl = slice(i, i + self.batch)
            lat = fn(self.noise[sl], self.cond.index(sl), self.seeds[sl])
            out.append(decode_latents(self.comps, lat))
        return torch.cat(out), time.time() - t0

    def metrics(self, images: torch.Tensor, reference_images: torch.Tensor | None) -> dict:
        from distill.evaluate import frechet_distance

        acc = self.evaluator.attribute_accuracy(images, self.prompts)
        row = {"fd": round(frechet_distance(self.evaluator.features(images), self.reference), 3),
               "attr_acc": round(acc["all"], 4), **{f"acc_{k}": round(v, 4) for k, v in acc.items() if k != "all"}}
        if reference_images is not None:
            row["mse_t50"] = round(mse_to_reference(images, reference_images), 5)
        return row

    def teacher_rows(self, steps_list: list[int], guidance: float = GUIDANCE):
        unet = self.comps.unet
        spec = SamplerSpec("ddim", tuple(steps_list), guidance)
        for steps in steps_list:
            imgs, secs = self.generate(lambda z, c, s: spec.sample(unet, z, c, self.schedule, steps, s,
                                                                   uncond=c.zeros_like()))
            yield {"model": "teacher", "method": f"ddim-trailing-cfg{guidance:g}", "guidance": guidance, "steps": steps,
                   "seconds": round(secs, 1)}, imgs

    def student_rows(self, export_dir: Path, guidance: float | None = None, sampler: str = "card",
                     spec_of: Path | None = None, only_steps: list[int] | None = None,
                     step_counts: list[int] | None = None):
        """Rows of an export sampled by its sampler spec (or by the spec of the export `spec_of`: a chain's stages
        sampled as its final card says); `guidance` overrides a w-input student's scale, `sampler` a consistency
        student's scheduler (lcm, or a TCD gamma); `only_steps` keeps those of the spec's step counts, `step_counts`
        replaces them."""
        from distill.export import load_export, read_export

        info, spec = read_export(export_dir)
        if spec_of is not None:
            spec = read_export(spec_of)[1]
        pipe = load_export(export_dir, self.comps.path)
        unet = pipe.unet.float().eval()
        w_dim = unet.config.time_cond_proj_dim  # set: the UNet takes the guidance w as an input
        cfg_scale = w_dim is not None or bool(info.get("cfg_free"))  # a w input, or the pipeline's own CFG
        if step_counts:  # other step counts than the card's (a 4-step DMD2 student at 1 and 2 steps)
            spec = replace(spec, steps=tuple(int(k) for k in step_counts))
        if guidance is not None and cfg_scale:
            spec = replace(spec, guidance_scale=float(guidance))
        if sampler != "card" and (spec.consistency or spec.kind == "ddim"):  # a segmented student too (its x0)
            spec = (replace(spec, kind="lcm", eta=None, etas={}) if sampler == "lcm"
                    else replace(spec, kind="tcd", eta=float(sampler), etas={}))
        base = info.get("method", "?") + (f"-cfg{spec.guidance_scale:g}" if cfg_scale else "")
        for steps in spec.steps:
            if only_steps is not None and steps not in only_steps:
                continue
            method = base  # a TCD student's gamma at this step count (a unified LoRA's card names one per count)
            if spec.consistency:
                method += "-lcm" if spec.kind == "lcm" else f"-tcd{spec.eta_at(steps):g}"
            imgs, secs = self.generate(lambda z, c, s, steps=steps: spec.sample(unet, z, c, self.schedule, steps, s,
                                                                                w_dim=w_dim, uncond=c.zeros_like()))
            yield {"model": str(export_dir), "method": method, "guidance": spec.guidance_scale, "steps": steps,
                   "seconds": round(secs, 1)}, imgs


def markdown(rows: list[dict]) -> str:
    reward = any("reward" in r for r in rows)
    head = "| model | method | steps | FD (lower better) | attr_acc | colour | shape | background | MSE to teacher-50 |"
    head += " reward |\n" if reward else "\n"
    head += "|---|---|---|---|---|---|---|---|---|" + ("---|\n" if reward else "\n")
    for r in rows:
        head += (f"| {r['model']} | {r['method']} | {r['steps']} | {r['fd']:.2f} | {r['attr_acc']:.3f} | "
                 f"{r.get('acc_color', 0):.3f} | {r.get('acc_shape', 0):.3f} | {r.get('acc_background', 0):.3f} | "
                 f"{r.get('mse_t50', float('nan')):.4f} |" + (f" {r.get('reward', float('nan')):.3f} |\n" if reward
                                                              else "\n"))
    return head


def beats(student: dict, teacher: dict) -> bool:
    """A student row beats a teacher row only when it is better on BOTH FD and attribute accuracy."""
    return student["fd"] < teacher["fd"] and student["attr_acc"] > teacher["attr_acc"]


def verdict(rows: list[dict]) -> str:
    """Each student row beside the teacher's DDIM row at the same step count (first guidance), and who won: a
    student wins only when it is better on BOTH FD and attribute accuracy."""
    teacher = {}
    for r in rows:
        if r["model"] == "teacher":
            teacher.setdefault(r["steps"], r)
    lines = ["| student | steps | student FD / attr | teacher DDIM FD / attr | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        t = teacher.get(r["steps"])
        if r["model"] == "teacher" or t is None:
            continue
        fd, acc = r["fd"] < t["fd"], r["attr_acc"] > t["attr_acc"]
        word = ("student wins (FD and accuracy)" if beats(r, t) else "teacher wins (FD and accuracy)" if not (fd or acc)
                else "split: student better on " + ("FD" if fd else "accuracy") + " only")
        lines.append(f"| {r['model']} | {r['steps']} | {r['fd']:.2f} / {r['attr_acc']:.3f} | "
                     f"{t['fd']:.2f} / {t['attr_acc']:.3f} | {word} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def mean_reward(model, images: torch.Tensor, prompts: list[str], batch: int = 250) -> float:
    """The reward model's mean score of the images against their prompts."""
    with torch.no_grad():
        scores = [model(images[i:i + batch], prompts[i:i + batch]) for i in range(0, len(images), batch)]
    return float(torch.cat(scores).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and teacher step counts (< 5 min on 2 CPU cores)")
    p.add_argument("--runs", nargs="*", default=[], help="run folders or export folders of students")
    p.add_argument("--out", required=True, help="JSON output; a markdown table is written beside it (.md)")
    p.add_argument("--grid", default=None, help="comparison grid PNG (default: beside --out)")
    p.add_argument("--teacher", default="distill:tiny-world")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=None,
                   help=f"DDIM step counts of the teacher rows (default {TEACHER_STEPS}, quick {QUICK_TEACHER_STEPS}; "
                        "50 must be among them: it is mse_t50's reference)")
    p.add_argument("--teacher-guidance", type=float, nargs="+", default=[GUIDANCE],
                   help="CFG scales of the teacher rows (the first one's 50-step images are mse_t50's reference)")
    p.add_argument("--student-guidance", type=float, nargs="+", default=None,
                   help="CFG scales at which to sample students that take a w input or were distilled CFG-free "
                        "(default: their export's)")
    p.add_argument("--student-sampler", nargs="+", default=["card"],
                   help="consistency (LCD) and segmented (PCM: a DDIM card) students: card (the export's "
                        "scheduler), lcm (LCMScheduler), or a gamma in [0, 1] (TCDScheduler's eta)")
    p.add_argument("--sampler-of", default=None, help="sample every student with this export's sampler spec "
                   "(e.g. a Hyper-SD run's export: its stages at the unified card's TCD steps and etas)")
    p.add_argument("--student-steps", type=int, nargs="+", default=None,
                   help="sample every student at these step counts instead of its card's (its sampler picks the "
                        "timesteps: a DMD2 4-step student at 1 step is its first step, from pure noise at 999)")
    p.add_argument("-n", type=int, default=None, help="generated samples per row (default 1000, quick 240)")
    p.add_argument("--reward", default=None, help="also score every row with this reward model (a folder or "
                   "distill:tiny-reward, distill/models/reward.py): its mean over the row's images and prompts")
    args = p.parse_args(argv)
    n = args.n or (240 if args.quick else 1000)
    teacher_steps = args.teacher_steps or (QUICK_TEACHER_STEPS if args.quick else TEACHER_STEPS)
    if 50 not in teacher_steps:
        p.error("--teacher-steps must include 50 (the reference images of mse_t50)")
    torch.manual_seed(0)
    bench = Bench(args.teacher, n=n, n_ref=1000 if args.quick else 2000)
    if args.reward:
        from distill.models.reward import load_reward

        reward_model = load_reward(args.reward, key="--reward")
    rows, columns, labels = [], [], []
    t50 = None
    show = list(range(0, min(n, 24), 3))  # up to 8 distinct prompts for the grid

    def add(row, imgs):
        nonlocal t50
        if row["model"] == "teacher" and row["steps"] == 50 and t50 is None:
            t50 = imgs
        row.update(bench.metrics(imgs, t50))
        if args.reward:
            row["reward"] = round(mean_reward(reward_model, imgs, bench.prompts), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["steps"] <= 4 or row["model"] == "teacher" and row["steps"] == 50 and len(labels) == 0:
            columns.append(imgs[show])
            tag = "teacher" if row["model"] == "teacher" else Path(row["model"]).parent.name
            label = f"{tag[:14]} {row['steps']}"
            if len(args.teacher_guidance) > 1 if row["model"] == "teacher" else args.student_guidance:
                label += f" cfg{row['guidance']:g}"
            if row["model"] != "teacher" and len(args.student_sampler) > 1:
                label += " " + row["method"].rsplit("-", 1)[-1]
            labels.append(label)

    for g in args.teacher_guidance:
        for row, imgs in bench.teacher_rows(teacher_steps, g):
            add(row, imgs)
    for run in args.runs:
        for export_dir in find_exports(Path(run)):
            for g in args.student_guidance or [None]:
                for sampler in args.student_sampler:
                    spec_of = Path(args.sampler_of) if args.sampler_of else None
                    rows_of = bench.student_rows(export_dir, g, sampler, spec_of, step_counts=args.student_steps)
                    for row, imgs in rows_of:
                        add(row, imgs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"n": n, "teacher": args.teacher, "guidance": args.teacher_guidance[0], "spacing": "trailing", "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    table = markdown(rows)
    out.with_suffix(".md").write_text(table)
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    save_grid(columns, grid, row_labels=[bench.prompts[i] for i in show], col_labels=labels, scale=3)
    print(table)
    versus = verdict(rows)
    if versus:
        print("Student against the teacher's DDIM at the same step count:\n" + versus)
        out.with_suffix(".md").write_text(table + "\n" + versus)
    print(f"wrote {out}, {out.with_suffix('.md')}, {grid}")
    return result


if __name__ == "__main__":
    main()
