#!/usr/bin/env bash
# One prepared GPU check (H200 class, under 8 minutes): LCD-LoRA, full LCD and a PAD adversarial LoRA step at the
# real SDXL size (1024 px, bf16, each experiment's gradient checkpointing), samples/s, peak memory, MFU against a
# measured bf16 matmul peak, and LCD's teacher DDIM step in bf16 vs fp32; appends a table to bench/RESULTS.md.
# The Python is bench/gpu_check.py (its docstring says what is measured).
#
#   bash bench/gpu.sh [gpu_check.py options, e.g. --steps 5 --batch 4]
#
# Needs the project's virtual environment (`make install`, which needs the package registries) with a CUDA build
# of torch. The GPU machine is assumed offline: this script builds .venv with `make install` ONLY when .venv is
# missing, and installs nothing else; all models are built locally with random weights. PY=/path/to/python
# overrides the interpreter. Without a CUDA device it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "bench/gpu.sh: $PY is missing: building .venv with make install (needs the package registries)"
  make install
  PY=.venv/bin/python
fi
if ! version=$("$PY" -c 'import sys, torch; print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 1)')
then
  echo "bench/gpu.sh: no CUDA device visible to torch ($version): nothing to measure, exiting 0"
  exit 0
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# SIGTERM at 450 s (gpu_check.py then writes what it measured), SIGKILL 20 s later: under 8 minutes in all.
status=0
timeout -k 20 450 "$PY" bench/gpu_check.py --out bench/gpu_check.json --results bench/RESULTS.md "$@" || status=$?
echo "bench/gpu.sh: gpu_check.py exited $status; results: bench/gpu_check.json, bench/gpu_check.md, bench/RESULTS.md"
exit "$status"
