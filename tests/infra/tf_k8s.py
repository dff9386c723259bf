"""What k8s/ asks of the cluster, for tests/infra/test_terraform.py: ServiceAccounts and the
accelerator pod templates of the rendered overlays and self-contained manifests, and whether a
GKE node pool can hold them."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
TPU_SELECTOR = "cloud.google.com/gke-tpu-topology"
GPU_SELECTOR = "cloud.google.com/gke-accelerator"

# What common.md fixes, used when k8s/ does not exist yet (k8s/ wins when it does).
CONVENTION_KSA = ("sft-job", "sft-job")  # namespace, ServiceAccount
CONVENTION_TPU = [  # topology, chips per pod, pods per slice
    {"topology": "2x4", "chips": 8, "pods": 1},
    {"topology": "4x4", "chips": 4, "pods": 4},
]


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
            pytest.skip("kubectl is not installed: cannot render the k8s/ overlays to compare")
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


def expected_ksa(needs: K8sNeeds | None) -> tuple[str, str]:
    """(namespace, name) of the job's ServiceAccount: from k8s/, else from common.md."""
    if needs is None:
        return CONVENTION_KSA
    assert needs.pod_service_accounts, "k8s/ exists but no pod template names a serviceAccountName"
    assert len(needs.pod_service_accounts) == 1, needs.pod_service_accounts
    (name,) = needs.pod_service_accounts
    namespaces = {ns for ns, sa in needs.service_accounts if sa == name}
    assert len(namespaces) == 1, f"k8s/ ServiceAccount {name}: namespaces {namespaces}"
    return namespaces.pop(), name


def expected_tpu(needs: K8sNeeds | None) -> list[dict[str, Any]]:
    """TPU slice shapes k8s/ schedules: topology, chips per pod, pods per slice."""
    if needs is None:
        return CONVENTION_TPU
    shapes = []
    for pod in needs.pods:
        if TPU_SELECTOR in pod.node_selector:
            assert pod.node_selector.get("cloud.google.com/gke-tpu-accelerator") == \
                "tpu-v5-lite-podslice", pod
            shape = {"topology": pod.node_selector[TPU_SELECTOR],
                     "chips": int(pod.limits["google.com/tpu"]), "pods": pod.pods}
            if shape not in shapes:
                shapes.append(shape)
    assert shapes, "k8s/ exists but has no TPU pod template (nodeSelector gke-tpu-topology)"
    return shapes


def pool_for(pod: Any, values: dict[str, Any]) -> tuple[str, str, float]:
    """(pool, machine type, storage GiB) of the pool a k8s/ pod template lands on."""
    sel = pod.node_selector
    if TPU_SELECTOR in sel:
        chips = int(pod.limits["google.com/tpu"])
        for name, p in values["tpu_pools"].items():
            if p["topology"] == sel[TPU_SELECTOR] and p["chips_per_host"] == chips:
                return name, p["machine_type"], p["disk_size_gb"] * 1e9 / 2**30
        pytest.fail(f"{pod.source}: no TPU pool for {sel}")
    gpus = int(pod.limits.get("nvidia.com/gpu", 0))
    for name, p in values["gpu_pools"].items():
        if p["accelerator"] == sel[GPU_SELECTOR] and p["accelerator_count"] >= gpus:
            disk = p["local_ssd_count"] * 375 if p["local_ssd_count"] else p["disk_size_gb"]
            return name, p["machine_type"], disk * 1e9 / 2**30
    pytest.fail(f"{pod.source}: no GPU pool with {sel[GPU_SELECTOR]} x{gpus}: "
                f"{values['gpu_pools']}")


