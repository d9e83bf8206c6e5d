#!/usr/bin/env bash
# The embedded default end to end on CPU: the shipped tiny-world teacher -> LCM-LoRA distillation -> export
# -> quality benchmark (--quick) -> comparison grid and table. Called by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACC=${ACC:-.venv/bin/accelerate}
RUN=${RUN:-runs/demo_lcm_lora}
export HF_HUB_OFFLINE=1 ACCELERATE_USE_CPU=1
rm -rf "$RUN"
$ACC launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py +experiment=lcm_lora_tiny output_dir="$RUN" "$@"
$PY bench/quality.py --quick --runs "$RUN" --out "$RUN/quality.json" --grid "$RUN/quality_grid.png"
echo
echo "run folder:        $RUN"
echo "validation grid:   $(ls "$RUN"/samples/*.png | tail -1)"
echo "exported LoRA:     $RUN/export/lora/pytorch_lora_weights.safetensors"
echo "quality table:     $RUN/quality.md (json: $RUN/quality.json)"
echo "comparison grid:   $RUN/quality_grid.png"
