# distill: `make demo` runs the embedded default end to end; `make test` runs the tests. Each sets itself up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export DISTILL_DATA := $(abspath $(DATA))

.PHONY: install test test-all demo data latents tiny-world lint clean

# A virtual environment with CPU torch 2.13.0 first (an unpinned torch pulls a multi-GB CUDA build), then the
# package with its extras. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,slurm]'
	$(PY) -c 'import deepspeed' 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed --no-build-isolation || echo 'deepspeed not installed: its tests will skip'
	touch $(STAMP)

install: $(STAMP)

# The tiny world's synthetic shards (seeded, about 20 s).
$(DATA)/tiny_world/.done: | $(STAMP)
	$(PY) -m distill.data.synthetic --out $(DATA)/tiny_world
	touch $@

data: $(DATA)/tiny_world/.done

# The tiny world's training shards as precomputed latent shards (data=wds_latents; about 1 min): no VAE or text
# encoder in the step. Used by bench/RESULTS.md's "LCD-LoRA on precomputed latents" recipe.
$(DATA)/tiny_world/latents/.done: $(DATA)/tiny_world/.done
	rm -rf $(DATA)/tiny_world/latents
	$(PY) -m distill.prepare latents --shards '$(DATA)/tiny_world/train/{00000..00019}.tar' --model distill:tiny-world \
		--output $(DATA)/tiny_world/latents --resolution 32 --batch-size 256 --samples-per-shard 2000 --num-workers 1
	touch $@

latents: $(DATA)/tiny_world/latents/.done

test: install
	$(PY) -m pytest -m "not slow" -q -n 2 --timeout 900

test-all: install
	$(PY) -m pytest -q -n 2 --timeout 1800

demo: install data
	bash bench/demo.sh

# Retrain the shipped tiny-world teacher from scratch (VAE, then UNet; about an hour on 2 CPU cores).
tiny-world: install data
	$(PY) train.py +experiment=vae_tiny output_dir=runs/vae_tiny
	$(PY) train.py +experiment=teacher_tiny output_dir=runs/teacher_tiny
	rm -rf distill/assets/tiny/teacher && cp -r runs/teacher_tiny/export/pipeline distill/assets/tiny/teacher

lint: install
	$(VENV)/bin/ruff check distill tests bench train.py

clean:
	rm -rf outputs multirun .pytest_cache
