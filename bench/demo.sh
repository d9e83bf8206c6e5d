#!/usr/bin/env bash
# The embedded default end to end on CPU: the shipped tiny-world teacher -> its own guided DDIM trajectories from
# prompts alone -> segmented consistency distillation of a LoRA on them (PCM + MLCM's trajectory-state data,
# `+experiment=mlcm_tiny`) -> export -> quality benchmark (--quick) -> the student's rows beside the teacher's DDIM
# at the same step counts, and who won. Called by `make demo`; EXP=lcm_lora_tiny bash bench/demo.sh runs another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACC=${ACC:-.venv/bin/accelerate}
EXP=${EXP:-mlcm_tiny}
RUN=${RUN:-runs/demo_$EXP}
export HF_HUB_OFFLINE=1 ACCELERATE_USE_CPU=1
rm -rf "$RUN"
start=$(date +%s)
$ACC launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py +experiment="$EXP" output_dir="$RUN" "$@"
$PY bench/quality.py --quick --runs "$RUN" --out "$RUN/quality.json" --grid "$RUN/quality_grid.png"
echo
echo "wall time:         $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s (training, export and bench)"
echo "run folder:        $RUN"
echo "validation grid:   $(ls "$RUN"/samples/*.png | tail -1)"
echo "exported LoRA:     $RUN/export/lora/pytorch_lora_weights.safetensors (model card: $RUN/export/README.md)"
echo "quality table:     $RUN/quality.md (json: $RUN/quality.json)"
echo "comparison grid:   $RUN/quality_grid.png"
