# Images: <REGISTRY>/sft-job-{cpu,cuda,tpu}:<TAG>, their locks and their checks (images/README.md).
# docker builds where a Docker engine answers, buildah otherwise (ENGINE=docker|buildah forces one).
REGISTRY ?= localhost
ENGINE ?=
# buildah storage: vfs works without fuse or overlay support; keep it out of the repository.
BUILDAH_FLAGS ?= --storage-driver vfs --root /var/tmp/buildah/root --runroot /var/tmp/buildah/run
# registry: the digest-pinned FROM; debootstrap: a Debian 12 base made here (cpu and tpu only).
BASE ?= registry
# Where the torch CPU wheel lies when the PyTorch CPU index cannot be reached (buildah only).
WHEELS_DIR ?= $(wildcard /opt/wheels)
# An extra index for the torch CPU wheel when compiling the CPU lock (e.g. the PyTorch CPU index).
CPU_TORCH_INDEX ?=
CUDA_BUILD_ARGS ?=
IMAGE_OUT ?= $(CURDIR)/out

LOCK_VENV ?= .venv-lock
IMAGE_HWS := cpu cuda tpu
PUSH_HWS ?= $(IMAGE_HWS)
DOCKERFILES := $(foreach hw,$(IMAGE_HWS),images/$(hw)/Dockerfile)
# What image-cpu-check reads back from the built image: user, entrypoint, workdir, healthcheck, revision.
IMAGE_CONFIG_FMT = {{.Docker.Config.User}} {{.Docker.Config.Entrypoint}} {{.Docker.Config.WorkingDir}} \
  {{.Docker.Config.Healthcheck.Test}} {{index .Docker.Config.Labels "org.opencontainers.image.revision"}}
IMAGE_ENV = ENGINE="$(ENGINE)" BUILDAH_FLAGS="$(BUILDAH_FLAGS)" BASE="$(BASE)"

# uv compiles the locks; pip (another resolver) verifies them. The stamp names the pins.
LOCK_TOOLS := uv==0.13.9 pip==26.3
LOCK_STAMP := $(LOCK_VENV)/.installed-$(subst ==,-,$(subst $() ,_,$(LOCK_TOOLS)))

$(LOCK_STAMP):
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q $(LOCK_TOOLS)
	@touch $@

locks: $(LOCK_STAMP) ## Recompile images/*/requirements.lock from pyproject.toml (uv, network)
	for hw in $(IMAGE_HWS); do WHEELS_DIR="$(WHEELS_DIR)" CPU_TORCH_INDEX="$(CPU_TORCH_INDEX)" \
	  images/locks.sh compile $$hw; done

locks-verify: $(LOCK_STAMP) ## Check with pip that every locked pin and hash resolves for its image's platform
	for hw in $(IMAGE_HWS); do WHEELS_DIR="$(WHEELS_DIR)" CPU_TORCH_INDEX="$(CPU_TORCH_INDEX)" \
	  images/locks.sh verify $$hw; done

image-cpu: ## Build <REGISTRY>/sft-job-cpu:<TAG> (on a machine with no registry: BASE=debootstrap)
	$(IMAGE_ENV) WHEELS_DIR="$(WHEELS_DIR)" images/build.sh cpu $(REGISTRY)/sft-job-cpu:$(TAG)

image-cuda: ## Build <REGISTRY>/sft-job-cuda:<TAG> (CUDA_BUILD_ARGS="--build-arg FLASH_ATTN=on")
	$(IMAGE_ENV) BUILD_ARGS="$(CUDA_BUILD_ARGS)" images/build.sh cuda $(REGISTRY)/sft-job-cuda:$(TAG)

image-tpu: ## Build <REGISTRY>/sft-job-tpu:<TAG>
	$(IMAGE_ENV) images/build.sh tpu $(REGISTRY)/sft-job-tpu:$(TAG)

push-images: ## Push the images (PUSH_HWS="cpu cuda tpu"): make push-images REGISTRY=us-docker.pkg.dev/p/r TAG=v1
	@[[ "$(REGISTRY)" != localhost ]] || { echo "set REGISTRY=<registry/path> to push" >&2; exit 2; }
	for hw in $(PUSH_HWS); do \
	  ref=$(REGISTRY)/sft-job-$$hw:$(TAG); \
	  if [[ "$(ENGINE)" == buildah ]] || ! docker info >/dev/null 2>&1; then \
	    buildah $(BUILDAH_FLAGS) push $$ref; else docker push $$ref; fi; \
	done

docker-smoke: ## Run the smoke job in the CPU image, network off, into ./out/smoke; check the merged model
	ENGINE="$(ENGINE)" BUILDAH_FLAGS="$(BUILDAH_FLAGS)" images/smoke.sh $(REGISTRY)/sft-job-cpu:$(TAG) $(IMAGE_OUT)

image-cpu-check: ## Build the CPU image here with buildah (debootstrap base) and run docker-smoke in it (heavy)
	$(MAKE) image-cpu ENGINE=buildah BASE=debootstrap TAG=$(TAG)
	$(MAKE) docker-smoke ENGINE=buildah TAG=$(TAG)
	@cfg=$$(buildah $(BUILDAH_FLAGS) inspect --format '$(IMAGE_CONFIG_FMT)' $(REGISTRY)/sft-job-cpu:$(TAG)); \
	  echo "image config: $$cfg"; [[ $$cfg == "1000:1000 [sft-job] /app [NONE] "?* ]]
	buildah $(BUILDAH_FLAGS) images --format '{{.Name}}:{{.Tag}} {{.Size}}' $(REGISTRY)/sft-job-cpu:$(TAG)

image-tpu-check: ## Build the TPU image here (buildah, debootstrap base); torch-xla must compute on PJRT CPU in it (heavy)
	$(MAKE) image-tpu ENGINE=buildah BASE=debootstrap TAG=$(TAG)
	ENGINE=buildah BUILDAH_FLAGS="$(BUILDAH_FLAGS)" images/tpu-check.sh $(REGISTRY)/sft-job-tpu:$(TAG)
	buildah $(BUILDAH_FLAGS) images --format '{{.Name}}:{{.Tag}} {{.Size}}' $(REGISTRY)/sft-job-tpu:$(TAG)

images-lint: tools ## hadolint, trivy config and checkov on the three Dockerfiles
	$(TOOLS)/hadolint $(DOCKERFILES)
	$(TRIVY) config --skip-check-update --quiet --exit-code 1 images
	$(TOOLS)/checkov -d images --framework dockerfile --compact --quiet --skip-download

lint: images-lint

.PHONY: locks locks-verify image-cpu image-cuda image-tpu push-images docker-smoke image-cpu-check \
	image-tpu-check images-lint
