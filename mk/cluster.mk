# Cluster side: submit jobs to Kubernetes (kustomize overlays in k8s/, rendered by k8s/submit.py)
# and to TPU VMs (gcloud, scripts/tpu-vm/tpu.sh); lint the manifests. Every submit target takes
# DRY_RUN=1: it prints the exact commands and rendered manifests and touches no cloud.
#   make submit-gpu JOB=jobs/x.yaml [GPU_OVERLAY=gpu-full-deepspeed|multinode NODES=4]
#   make submit-tpu-gke JOB=jobs/x.yaml [TPU_GKE_OVERLAY=tpu-v5e-multihost]
#   make submit-tpu JOB=jobs/x.yaml [TPU_ACCELERATOR=v5litepod-16] [WATCH=0]; make tpu-watch;
#   make tpu-logs; make tpu-delete

# Settings: KEY=value lines of cluster.local.env (yours or Terraform's, not committed), then of
# cluster.env (defaults), each read as KEY ?= value: the command line, the environment and
# earlier makefiles win. Values cannot hold spaces.
CLUSTER_SETTINGS ?= cluster.local.env cluster.env
_settings := $(if $(wildcard $(CLUSTER_SETTINGS)),$(shell cat $(wildcard $(CLUSTER_SETTINGS)) | \
	sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)=\([^[:space:]]*\)[[:space:]]*$$/\1?=\2/p'))
$(foreach kv,$(_settings),$(eval $(kv)))

# TAG (images and submissions): evaluated once, so a commit landing mid-build does not rename
# the image under a later step; after the settings, which may set it.
ifeq ($(origin TAG),undefined)
TAG := $(shell git describe --tags --dirty --always 2>/dev/null || echo dev)
endif
DIGEST ?=
DRY_RUN ?=
K8S_PY ?= $(BIN)/python
K8S_LINT_DIR ?= out/k8s-lint
# Where submissions are rendered (one folder per job name, kept as the record).
K8S_OUT ?= out/k8s
# Validated against the oldest Kubernetes with podFailurePolicy GA and the newest bundled.
K8S_VERSIONS ?= 1.31.0 1.37.0
TPU_WORKER ?= 0

_dry := $(filter 1 true yes,$(DRY_RUN))
# k8s/submit.py validates specs with sft_job.spec, so it runs in the project venv. Not a
# prerequisite: that would reinstall the venv whenever pyproject.toml changes.
_venv = @test -x $(K8S_PY) || { echo "error: $(K8S_PY) not found: run make venv" >&2; exit 1; }
_opt = $(if $(2),$(1) '$(2)')
K8S_ARGS = $(call _opt,--job,$(JOB)) $(call _opt,--registry,$(REGISTRY)) \
	$(call _opt,--tag,$(TAG)) $(call _opt,--digest,$(DIGEST)) \
	$(call _opt,--context,$(KUBE_CONTEXT)) $(call _opt,--gcp-sa,$(GCP_SA)) \
	$(call _opt,--aws-role-arn,$(AWS_ROLE_ARN)) $(call _opt,--out-dir,$(K8S_OUT)) $(if $(_dry),--dry-run)
TPU_ENV = DRY_RUN='$(_dry)' PYTHON='$(K8S_PY)' PROJECT='$(PROJECT)' ZONE='$(ZONE)' \
	TPU_NAME='$(TPU_NAME)' TPU_ACCELERATOR='$(TPU_ACCELERATOR)' TPU_RUNTIME='$(TPU_RUNTIME)' \
	TPU_SPOT='$(TPU_SPOT)' TPU_WORKER='$(TPU_WORKER)' GCP_SA='$(GCP_SA)' \
	HF_TOKEN_SECRET='$(HF_TOKEN_SECRET)' JOB='$(or $(JOB),k8s/overlays/tpu-v5e-single/spec.yaml)' \
	WATCH='$(WATCH)' MAX_RECOVERIES='$(MAX_RECOVERIES)' MAX_HOURS='$(MAX_HOURS)' \
	IMAGE='$(REGISTRY)/sft-job-tpu$(if $(DIGEST),@$(DIGEST),:$(TAG))'

submit-gpu: ## Render k8s/overlays/GPU_OVERLAY with JOB and kubectl apply it (DRY_RUN=1)
	$(_venv)
	$(if $(filter gpu-% multinode,$(GPU_OVERLAY)),,$(error GPU_OVERLAY=$(GPU_OVERLAY): use gpu-lora, gpu-full-deepspeed or multinode))
	@$(K8S_PY) k8s/submit.py apply $(GPU_OVERLAY) $(K8S_ARGS) $(call _opt,--nodes,$(NODES))

submit-tpu-gke: ## Render k8s/overlays/TPU_GKE_OVERLAY (TPU v5e on GKE) with JOB and apply it
	$(_venv)
	$(if $(filter tpu-%,$(TPU_GKE_OVERLAY)),,$(error TPU_GKE_OVERLAY=$(TPU_GKE_OVERLAY): use tpu-v5e-single or tpu-v5e-multihost))
	@$(K8S_PY) k8s/submit.py apply $(TPU_GKE_OVERLAY) $(K8S_ARGS)

submit-tpu: ## Create a TPU v5e queued resource, run the TPU image with JOB on all workers, and (WATCH=1) recover it from preemption until done
	$(_venv)
	@$(TPU_ENV) bash scripts/tpu-vm/tpu.sh submit

tpu-watch: ## Watch a submitted TPU VM run (JOB) and recover it from preemption until done
	$(_venv)
	@$(TPU_ENV) bash scripts/tpu-vm/tpu.sh watch

tpu-logs: ## Follow the job's logs on TPU VM worker TPU_WORKER (0; or all)
	@$(TPU_ENV) bash scripts/tpu-vm/tpu.sh logs

tpu-delete: ## Delete the TPU queued resource TPU_NAME and its VMs
	@$(TPU_ENV) bash scripts/tpu-vm/tpu.sh delete

k8s-lint: | tools ## yamllint, kubernetes-validate --strict, checkov, trivy on k8s/ and every overlay
	$(_venv)
	$(TOOLS)/yamllint --strict -c k8s/.yamllint.yaml k8s
	$(K8S_PY) k8s/submit.py lint-render $(K8S_LINT_DIR) >/dev/null
	cp k8s/lora-job.yaml $(K8S_LINT_DIR)/
	for v in $(K8S_VERSIONS); do \
		$(TOOLS)/kubernetes-validate --strict --quiet --no-warn -k $$v $(K8S_LINT_DIR)/*.yaml \
		|| exit 1; done
	$(TOOLS)/checkov --config-file k8s/.checkov.yaml -d $(K8S_LINT_DIR)
	$(TRIVY) config --skip-check-update --quiet --exit-code 1 \
		--ignorefile k8s/.trivyignore $(K8S_LINT_DIR)
	@echo "k8s-lint: ok ($(K8S_LINT_DIR))"

.PHONY: submit-gpu submit-tpu-gke submit-tpu tpu-watch tpu-logs tpu-delete k8s-lint
