"""The LCD-LoRA teacher pass two ways (#28's candidate "a separate plain frozen teacher instead of the
adapters-disabled pass"): the UNet that carries the student's LoRA run with its adapters disabled (what lcd.py does:
one UNet in memory), against a plain copy of the base UNet without adapter layers, on bench/reference.py's tiny SDXL
model at the LCD-LoRA step's teacher batch (2B: cond + uncond).

    python bench/teacher_pass.py --out FILE.json [--batch 8] [--side 32] [--rounds 6] [--reps 3] [--threads 1]

Forward only under no_grad, the two alternating (order flipped every round), one warm-up call before each timing;
prints and writes the per-round milliseconds and their medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=8, help="the step's batch B; the teacher pass runs 2B")
    p.add_argument("--side", type=int, default=32, help="latent side (64 px through the 2-block VAE: 32)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--model", default="/tmp/distill-bench-reference/tiny-sdxl-2048", help="built when absent")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers import UNet2DConditionModel
    from reference import build_model
    from unet_call import _inputs as unet_inputs

    from distill.config import LoraConfig
    from distill.models.adapters import adapters_disabled, add_lora

    folder = build_model(Path(a.model))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    plain = copy.deepcopy(unet).requires_grad_(False)
    add_lora(unet, a.rank, None, 0.0, LoraConfig().target_modules)
    n = 2 * a.batch
    args, kw = unet_inputs(unet, n, a.side)  # bench/unet_call.py's SDXL call: latents, t, text and time ids

    @torch.no_grad()
    def disabled():
        with adapters_disabled(unet):
            return unet(*args, **kw).sample

    @torch.no_grad()
    def separate():
        return plain(*args, **kw).sample

    torch.testing.assert_close(disabled(), separate())  # the same teacher either way
    ms = {"adapters_disabled": [], "plain_copy": []}
    runs = [("adapters_disabled", disabled), ("plain_copy", separate)]
    for r in range(a.rounds):
        for name, f in runs if r % 2 == 0 else runs[::-1]:
            f()
            t0 = time.perf_counter()
            for _ in range(a.reps):
                f()
            ms[name].append((time.perf_counter() - t0) / a.reps * 1000)
    result = {"batch": n, "side": a.side, "threads": a.threads, "rank": a.rank, "ms": ms,
              "median_ms": {k: statistics.median(v) for k, v in ms.items()}}
    result["plain_over_disabled"] = result["median_ms"]["plain_copy"] / result["median_ms"]["adapters_disabled"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    for k, v in ms.items():
        print(f"{k:18s} median {result['median_ms'][k]:7.1f} ms  rounds {[round(v_, 1) for v_ in v]}")
    print(f"plain copy / adapters disabled: {result['plain_over_disabled']:.3f}")
    return result


if __name__ == "__main__":
    main()
