# Terraform: terraform/gcp (GKE, Spot GPU and TPU v5e pools, Artifact Registry, GCS buckets,
# Workload Identity) and terraform/aws (S3, IRSA role, ECR). See terraform/README.md.
#   make tf-lint                          fmt -check, checkov, trivy (offline)
#   make tf-validate-aws                  init -backend=false + validate with a provider mirror
#   make tf-plan CLOUD=gcp                then tf-apply: writes the outputs to cluster.local.env
#   make tf-settings CLOUD=aws            outputs -> cluster.local.env, read by make submit-*
TF ?= terraform
CLOUD ?= gcp
TF_DIR = terraform/$(CLOUD)
# Optional -var-file for plan/apply/destroy (terraform/<cloud>/terraform.tfvars is read anyway).
TF_VARS ?=
# Provider mirror for offline init (the aws provider only; see /work/shared/NOTES.md).
TF_MIRROR ?= /opt/tf-plugins
TF_SETTINGS_FILE ?= $(firstword $(CLUSTER_SETTINGS) cluster.local.env)

_tf_cloud = $(if $(filter gcp aws,$(CLOUD)),,$(error CLOUD=$(CLOUD): use gcp or aws))
_tf_var_file = $(if $(TF_VARS),-var-file=$(abspath $(TF_VARS)))

tf-fmt: ## Format terraform/ in place
	TF_CLI_CONFIG_FILE=/dev/null $(TF) fmt -recursive terraform

tf-lint: | tools ## terraform fmt -check, checkov and trivy config on terraform/ (offline)
	TF_CLI_CONFIG_FILE=/dev/null $(TF) fmt -check -recursive -diff terraform
	$(TOOLS)/checkov --config-file terraform/.checkov.yaml -d terraform
	$(TRIVY) config --skip-check-update --quiet --exit-code 1 terraform
	@echo "tf-lint: ok"

tf-validate-aws: ## terraform init -backend=false + validate terraform/aws against TF_MIRROR (no network)
	@test -d $(TF_MIRROR) || { echo "error: no provider mirror at $(TF_MIRROR) (set TF_MIRROR)" >&2; exit 1; }
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	printf 'provider_installation {\n  filesystem_mirror {\n    path    = "%s"\n    include = ["registry.terraform.io/hashicorp/aws"]\n  }\n}\n' \
		'$(TF_MIRROR)' > "$$tmp/cli.tfrc"; \
	cp terraform/aws/*.tf "$$tmp/"; \
	export TF_CLI_CONFIG_FILE="$$tmp/cli.tfrc"; \
	$(TF) -chdir="$$tmp" init -backend=false -input=false -no-color >/dev/null; \
	$(TF) -chdir="$$tmp" validate -no-color

tf-plan: ## terraform init + plan terraform/CLOUD (gcp or aws) into tfplan (cloud credentials needed)
	$(_tf_cloud)
	$(TF) -chdir=$(TF_DIR) init -input=false
	$(TF) -chdir=$(TF_DIR) plan -input=false $(_tf_var_file) -out=tfplan

tf-apply: ## Apply the tfplan of tf-plan, then write the outputs to the cluster settings (tf-settings)
	$(_tf_cloud)
	$(TF) -chdir=$(TF_DIR) apply -input=false tfplan
	rm -f $(TF_DIR)/tfplan
	$(MAKE) --no-print-directory tf-settings CLOUD=$(CLOUD)

tf-destroy: ## terraform destroy terraform/CLOUD (GCP: set deletion_protection=false and apply first)
	$(_tf_cloud)
	$(TF) -chdir=$(TF_DIR) destroy $(_tf_var_file)

tf-settings: ## Write terraform/CLOUD outputs as KEY=value lines into cluster.local.env (read by make submit-*)
	$(_tf_cloud)
	$(TF) -chdir=$(TF_DIR) output -json settings | $(PY) terraform/settings.py $(TF_SETTINGS_FILE)

.PHONY: tf-fmt tf-lint tf-validate-aws tf-plan tf-apply tf-destroy tf-settings
