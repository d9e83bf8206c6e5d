"""Paired step throughput: diffusers' LCM-LoRA SDXL example script (run unmodified) against distill, same model,
same shards, same settings.

    python bench/reference.py --out FILE.json [--reference-script PATH] [--rounds 3] [--steps 20] [--warmup 5]
                              [--variants reference,distill_readme,distill_threads2,distill_latents] [--work DIR]

The reference is `examples/consistency_distillation/train_lcm_distill_lora_sdxl_wds.py` from a diffusers checkout
(default location `bench/.reference/`, git-ignored: `git show HEAD:examples/consistency_distillation/...` from a
diffusers clone; it is never imported, only run as `python SCRIPT ...`). The script imports torchvision (its
requirements.txt), which distill does not need: put it in `SCRIPT_DIR/site` (`pip install --no-deps --target
bench/.reference/site torchvision==<the build for the installed torch>`), added to PYTHONPATH for the reference only.
Where only a CUDA build of torchvision is at hand (as on this project's CI machine), its C extension does not load
on CPU torch and torchvision 0.28's `_meta_registrations.py` then fails at import on `register_fake("torchvision::nms")`;
guarding those two decorators with `torchvision.extension._has_ops()` lets the pure-Python transforms the script
uses (PIL resize, crop, to_tensor, normalize, RandomCrop.get_params) run. Both sides train LCM-LoRA on:
- the same tiny SDXL-architecture pipeline folder, built here (`distill/models/tiny.py` builders): UNet channels
  (32, 64), cross-attention 2048 from two 2-layer CLIP text encoders of widths 768 + 1280 (the script hard-codes
  77 x 2048 / 1280 zero embeddings for the unconditional branch), a 2-block VAE (64 px -> 32 x 32 latents);
- the same shards: a copy of the tiny world's shards whose json carries neutral metadata (width = height =
  original_width = original_height = 1024, pwatermark 0). The script keeps only samples with json width and height
  >= 700 and pwatermark <= 0.5, so the tiny world's 32 x 32 json would filter every sample away (training hangs
  at 0%); both sides read the copy, so both get original_size (1024, 1024);
- 64 px, batch 8, LoRA rank 8 (alpha 8), fp32, AdamW, one DataLoader worker (the script's WebLoader has
  persistent_workers=True, which needs >= 1), `--max_train_steps` / `trainer.max_steps` = --steps.
The fair fp32 variant: the script runs its teacher under `torch.autocast(device)`, on CPU bf16, unless the teacher
path contains "playground" (its own switch for Playground models); the pipeline folder is named `...-playground` so
the script runs fp32 like distill, with no edit. `--reference-autocast` names the folder otherwise (bf16 teacher).

Variants (each a fresh process, so start-up is not timed):
- reference: `python SCRIPT ...` with OMP_NUM_THREADS=2 (torch's own default on 2 physical cores);
- distill_readme: the README's launch, `accelerate launch train.py +experiment=lcm_lora_tiny ...` (the launcher
  sets OMP_NUM_THREADS=1; trainer.num_threads=0 sets physical cores / local processes);
- distill_threads2: `accelerate launch --num_cpu_threads_per_process 2 train.py ...` (the best thread setting on
  a 2-core machine, measured before the trainer set its own threads);
- distill_latents: the README launch on precomputed latent shards of the same images (`python -m distill.prepare
  latents`, once): no VAE or text encoders in the step.
- distill_readme_unfused, distill_latents_unfused: the same two with `method.lora.fuse_no_grad=false` (the LoRA
  target pass on PEFT's own path, as the reference runs it, instead of the merged weights).
Step time, the same for both: each side stamps wall time after every optimizer step (the script's TensorBoard
scalar `loss`, logged every step; distill's metrics.jsonl `time`, trainer.log_every_steps=1). step_s =
(t[steps] - t[warmup]) / (steps - warmup): the steady-state step, loader included, start-up and the first
`warmup` steps excluded. The variants run in turn within a round (order rotated each round), `uptime`'s load
averages recorded beside every run; the table reports medians over rounds and the median of the per-round ratios.
Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCRIPT = ROOT / "bench" / ".reference" / "train_lcm_distill_lora_sdxl_wds.py"
TINY_SHARDS = ROOT / "data" / "tiny_world" / "train"
VARIANTS = ["reference", "distill_readme", "distill_threads2", "distill_latents", "distill_readme_unfused",
            "distill_latents_unfused"]

# The tiny SDXL-architecture model of the comparison (the script's hard-coded 2048 / 1280 widths).
BENCH_PRESET = dict(unet_channels=(32, 64), heads=(2, 4), vae_channels=(16, 32), vae_groups=8, text_hidden=768,
                    text_hidden_2=1280, text_layers=2, resolution=64, latent_channels=4, time_embed=8)
NEUTRAL_META = {"width": 1024, "height": 1024, "original_width": 1024, "original_height": 1024, "pwatermark": 0.0}


# -- inputs ------------------------------------------------------------------------------------------------
def build_model(out: Path) -> Path:
    """The comparison's tiny SDXL pipeline as a diffusers folder (built once; `out` is reused when present)."""
    if (out / "model_index.json").exists():
        return out
    from distill.models import tiny

    tiny.PRESETS.setdefault("bench_reference", BENCH_PRESET)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.save_tiny_pipeline(tmp, arch="sdxl", preset="bench_reference", seed=0)
    tmp.rename(out)
    return out


def neutral_shards(src: list[Path], out: Path, max_samples: int | None = None) -> list[Path]:
    """Copies of `src` whose json holds NEUTRAL_META (other keys kept), so the script's size and watermark filter
    passes every sample; `max_samples` per shard keeps a test small."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in src:
        dst = out / path.name
        written.append(dst)
        if dst.exists():
            continue
        keys: list[str] = []
        with tarfile.open(path) as tin, tarfile.open(dst.with_suffix(".tmp"), "w") as tout:
            for member in tin:
                key = member.name.rsplit(".", 1)[0]
                if key not in keys:
                    keys.append(key)
                if max_samples is not None and len(keys) > max_samples:
                    break
                data = tin.extractfile(member).read()
                if member.name.endswith(".json"):
                    data = json.dumps({**json.loads(data), **NEUTRAL_META}).encode()
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime = len(data), member.mtime
                tout.addfile(info, io.BytesIO(data))
        dst.with_suffix(".tmp").rename(dst)
    return written


def latent_shards(image_shards: list[Path], model: Path, out: Path, resolution: int) -> list[Path]:
    """`python -m distill.prepare latents` over the image shards (once)."""
    done = sorted(out.glob("*.tar"))
    if done:
        return done
    pattern = f"{image_shards[0].parent}/{{{image_shards[0].stem}..{image_shards[-1].stem}}}.tar"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "distill.prepare", "latents", "--shards", pattern, "--model", str(model),
                    "--output", str(tmp), "--resolution", str(resolution), "--num-workers", "1"],
                   check=True, cwd=ROOT, env=_env(threads=None))
    tmp.rename(out)
    return sorted(out.glob("*.tar"))


def brace(paths: list[Path]) -> str:
    """A brace pattern over consecutive numbered shard names (one string, as both CLIs take it); the folder for
    other names (distill.prepare's NNNNN-rankRRR.tar: distill reads a folder of shards)."""
    if len(paths) == 1:
        return str(paths[0])
    stems = [p.stem for p in paths]
    if not all(s.isdigit() for s in stems):
        return str(paths[0].parent)
    return f"{paths[0].parent}/{{{stems[0]}..{stems[-1]}}}.tar"


# -- commands ----------------------------------------------------------------------------------------------
def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _accelerate() -> list[str]:
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def reference_command(a, script: Path, model: Path, shards: list[Path], run: Path) -> list[str]:
    return [sys.executable, str(script), "--pretrained_teacher_model", str(model),
            "--train_shards_path_or_url", brace(shards), "--output_dir", str(run), "--resolution", str(a.resolution),
            "--train_batch_size", str(a.batch), "--lora_rank", str(a.rank), "--lora_alpha", str(a.rank),
            "--max_train_steps", str(a.steps), "--max_train_samples", str(max(a.steps * a.batch * 4, 1000)),
            "--mixed_precision", "no", "--dataloader_num_workers", "1", "--learning_rate", "1e-4", "--seed", "0",
            "--report_to", "tensorboard", "--checkpointing_steps", str(10**6), "--validation_steps", str(10**6)]


def distill_command(a, model: Path, shards: list[Path], run: Path, *, latents: bool, threads: int | None,
                    fused: bool = True) -> list[str]:
    launch = _accelerate() + (["launch"] if len(_accelerate()) == 1 else [])
    if threads is not None:
        launch += ["--num_cpu_threads_per_process", str(threads)]
    ov = ["+experiment=lcm_lora_tiny", f"model.pretrained={model}", f"data.shards='{brace(shards)}'",
          f"data.resolution={a.resolution}", f"data.batch_size={a.batch}", f"method.lora.rank={a.rank}",
          f"trainer.max_steps={a.steps}", "trainer.log_every_steps=1", "trainer.validation_prompts=[]",
          "trainer.export_at_end=false", "trainer.progress_bar=false", "logger=none", f"output_dir={run}",
          f"hydra.run.dir={run}/hydra"]
    if latents:
        ov += ["data=wds_latents", "data.num_workers=1"]
    if not fused:
        ov += ["method.lora.fuse_no_grad=false"]
    return launch + ["train.py", *ov]


# -- timing ------------------------------------------------------------------------------------------------
def reference_stamps(run: Path) -> dict[int, float]:
    """Wall time of every logged step from the script's TensorBoard events (scalar `loss`, one per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stamps: dict[int, float] = {}
    for f in sorted(run.rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        if "loss" in ea.Tags().get("scalars", []):
            stamps.update({e.step: e.wall_time for e in ea.Scalars("loss")})
    return stamps


def distill_stamps(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["time"] for r in rows}


def step_seconds(stamps: dict[int, float], steps: int, warmup: int) -> float:
    if steps not in stamps or warmup not in stamps:
        raise RuntimeError(f"missing step stamps (have steps {sorted(stamps)[:3]}..{sorted(stamps)[-3:]})")
    return (stamps[steps] - stamps[warmup]) / (steps - warmup)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_variant(name: str, a, inputs: dict, run: Path) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if name == "reference":
        cmd, env = reference_command(a, a.reference_script, inputs["ref_model"], inputs["shards"], run), _env(2)
        site = a.reference_script.parent / "site"  # the script's own requirement (torchvision), kept out of .venv
        if site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    else:
        latents = name.startswith("distill_latents")
        cmd = distill_command(a, inputs["model"], inputs["latents" if latents else "shards"], run, latents=latents,
                              threads=2 if name == "distill_threads2" else None, fused=not name.endswith("_unfused"))
        env = _env(None)
    load_before, t0 = load_average(), time.time()
    with open(run / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout,
                              check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (run / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{name} exited {proc.returncode}:\n{tail}")
    stamps = reference_stamps(run) if name == "reference" else distill_stamps(run)
    step_s = step_seconds(stamps, a.steps, a.warmup)
    threads = None
    for line in (run / "log.txt").read_text().splitlines():
        if line.startswith("torch threads per process:"):
            threads = int(line.split(":")[1].split()[0])
    return {"variant": name, "step_s": step_s, "samples_per_s": a.batch / step_s, "wall_s": wall,
            "load_before": load_before, "load_after": load_average(), "torch_threads": threads if threads else (
                2 if name == "reference" else None), "command": " ".join(cmd)}


# -- report ------------------------------------------------------------------------------------------------
def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    ref = {r["round"]: r["samples_per_s"] for r in by.get("reference", [])}
    rows = []
    for v in variants:
        sps = [r["samples_per_s"] for r in by[v]]
        ratios = [r["samples_per_s"] / ref[r["round"]] for r in by[v] if r["round"] in ref]
        rows.append({"variant": v, "samples_per_s": sps, "median_samples_per_s": statistics.median(sps),
                     "median_step_ms": 1e3 * statistics.median(r["step_s"] for r in by[v]),
                     "median_paired_ratio": statistics.median(ratios) if ratios else None,
                     "torch_threads": by[v][0]["torch_threads"]})
    return rows


def write_md(result: dict, out: Path) -> None:
    s = result["settings"]
    lines = [f"# Paired step throughput vs diffusers' LCM-LoRA SDXL script ({result['date']})", "",
             f"Machine: {result['machine']}. {s['rounds']} rounds, {s['steps']} steps each, step time from step "
             f"{s['warmup']} to {s['steps']}; batch {s['batch']}, {s['resolution']} px, LoRA rank {s['rank']}, fp32.",
             "", "| variant | torch threads | samples/s per round | median samples/s | median step ms | "
             "median paired ratio vs reference |", "|---|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"x{r['median_paired_ratio']:.2f}" if r["median_paired_ratio"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['torch_threads']} | {' / '.join(f'{v:.2f}' for v in r['samples_per_s'])} "
                     f"| {r['median_samples_per_s']:.2f} | {r['median_step_ms']:.0f} | {ratio} |")
    lines += ["", "| round | variant | samples/s | load average before | after |", "|---:|---|---:|---|---|"]
    lines += [f"| {r['round']} | {r['variant']} | {r['samples_per_s']:.2f} | {r['load_before']} | {r['load_after']} |"
              for r in result["runs"]]
    out.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--reference-script", type=Path, default=DEFAULT_SCRIPT)
    p.add_argument("--reference-autocast", action="store_true", help="let the script's bf16 teacher autocast run")
    p.add_argument("--variants", default=",".join(VARIANTS[:4]))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--source", type=Path, default=TINY_SHARDS, help="folder of image shards to copy")
    p.add_argument("--source-shards", type=int, default=4, help="how many of its shards to copy")
    p.add_argument("--shard-samples", type=int, default=None, help="samples per copied shard (all if unset)")
    p.add_argument("--model", default=None, help="distill's model instead of the built one (distill half only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/distill-bench-reference"))
    p.add_argument("--timeout", type=float, default=900.0)
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    if unknown := set(a.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be in [0, --steps)")
    return a


def prepare_inputs(a) -> dict:
    a.work.mkdir(parents=True, exist_ok=True)
    src = sorted(a.source.glob("*.tar"))[: a.source_shards]
    if not src:
        raise SystemExit(f"no shards in {a.source} (make data writes the tiny world's)")
    tag = f"{a.source_shards}x" + (f"n{a.shard_samples}" if a.shard_samples else "all")
    inputs = {"model": a.model or build_model(a.work / "tiny-sdxl-2048")}
    if a.model and "reference" in a.variants:
        raise SystemExit("--model replaces distill's model only; the reference needs the built one")
    inputs["shards"] = neutral_shards(src, a.work / f"shards-{tag}", a.shard_samples)
    if "reference" in a.variants:
        if not a.reference_script.exists():
            raise SystemExit(f"reference script not found: {a.reference_script} (see this file's docstring)")
        # the same folder under the name that switches the script's teacher autocast off (see the docstring)
        ref = a.work / ("tiny-sdxl-2048-autocast" if a.reference_autocast else "tiny-sdxl-2048-playground")
        if not ref.exists():
            ref.symlink_to(inputs["model"].name)
        inputs["ref_model"] = ref
    if any(v.startswith("distill_latents") for v in a.variants):
        inputs["latents"] = latent_shards(inputs["shards"], inputs["model"], a.work / f"latents-{tag}-r{a.resolution}",
                                          a.resolution)
    return inputs


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    inputs = prepare_inputs(a)
    runs = []
    for rnd in range(1, a.rounds + 1):
        shift = (rnd - 1) % len(a.variants)
        for name in a.variants[shift:] + a.variants[:shift]:  # rotated: drift in load spreads over all variants
            r = run_variant(name, a, inputs, a.work / "runs" / f"r{rnd}_{name}")
            r["round"] = rnd
            runs.append(r)
            print(f"round {rnd} {name}: {r['samples_per_s']:.2f} samples/s (load {r['load_before']})", flush=True)
            a.work.joinpath("runs.partial.json").write_text(json.dumps(runs, indent=2))  # survives a later failure
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(a).items()},
              "machine": f"{platform.node()}: {os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}, "
                         f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
              "rows": summarize(runs, a.variants), "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    write_md(result, a.out.with_suffix(".md"))
    return result


if __name__ == "__main__":
    main()
