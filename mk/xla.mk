# torch-xla on this machine's CPU (PJRT_DEVICE=CPU): the job's TPU code path in CI (tests/xla/).
# torch-xla 2.9.0 needs torch 2.9.0, which PyPI has only as the CUDA build (~4 GB download,
# ~7.5 GB on disk), so it lives in its own venv. Its pins are the TPU image's lock
# (images/tpu/requirements.lock, hash-checked, --no-deps: pip never picks a torch itself),
# minus the TPU-only runtime (libtpu, tpu-info: with libtpu installed `backend: auto` would
# pick tpu on a CPU machine).
XLA_VENV ?= .venv-xla
XLA_BIN := $(XLA_VENV)/bin
XLA_LOCK ?= images/tpu/requirements.lock
XLA_SKIP ?= libtpu tpu-info
# The test runner, pinned like .venv's (its remaining deps, packaging and pygments, are locked).
XLA_TEST_DEPS ?= pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0
XLA_NICE ?= nice -n 10
XLA_PYTEST_ARGS ?=
# sft-job dependencies that images/tpu/requirements.lock does not hold yet (added to
# pyproject.toml after the lock was compiled; harmless once `make locks` has caught up).
XLA_EXTRA_DEPS ?= httpx==0.28.1 httpcore==1.0.9
XLA_LOCKED := $(XLA_VENV)/.locked
XLA_STAMP := $(XLA_VENV)/.installed

# Two stamps: a failure after the 4 GB install does not download it again (only a new lock
# redoes it; `rm -rf .venv-xla` forces it).
$(XLA_LOCKED): $(XLA_LOCK)
	rm -rf $(XLA_VENV)
	$(PY) -m venv $(XLA_VENV)
	$(XLA_BIN)/pip install -q -U pip==26.3
	awk -v skip="$(XLA_SKIP)" 'BEGIN { n = split(skip, s, " "); for (i = 1; i <= n; i++) drop[s[i]] = 1 } \
	  /^[^ #]/ { name = $$1; sub(/[=\[].*/, "", name); off = (name in drop) } !off' \
	  $(XLA_LOCK) > $(XLA_VENV)/requirements.txt
	$(XLA_NICE) $(XLA_BIN)/pip install -q --no-deps --require-hashes -r $(XLA_VENV)/requirements.txt
	@touch $@

$(XLA_STAMP): $(XLA_LOCKED) pyproject.toml mk/xla.mk
	$(XLA_BIN)/pip install -q --no-deps $(XLA_EXTRA_DEPS) $(XLA_TEST_DEPS)
	$(XLA_BIN)/pip install -q --no-deps -e .
	$(XLA_BIN)/pip check
	$(XLA_BIN)/python -c 'import torch, torch_xla; assert torch.__version__.startswith("2.9.0"), torch.__version__'
	@touch $@

venv-xla: $(XLA_STAMP) ## Create .venv-xla: torch 2.9.0 + torch-xla 2.9.0 (CPU PJRT) + the TPU image's pins

# .venv (plain torch 2.13) reloads the saved models: made when missing, used as it is otherwise.
test-xla: $(XLA_STAMP) ## Run the TPU code path on XLA:CPU (1 device and a 4-device FSDPv2 mesh)
	test -x $(BIN)/python || $(MAKE) venv
	SFT_JOB_MAIN_PYTHON=$(CURDIR)/$(BIN)/python $(XLA_BIN)/python -m pytest tests/xla -m xla \
	  -p no:cacheprovider $(XLA_PYTEST_ARGS)

.PHONY: venv-xla test-xla
