"""Kubernetes manifests, kustomize overlays and the submit targets (k8s/, mk/cluster.mk).

No cluster can run here: the manifests are rendered with kustomize, validated against the
Kubernetes schemas and scanned, their meaning is checked against the job's own code (CLI,
exit codes, spec), and `make submit-* DRY_RUN=1` is run and its printed commands checked.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import yaml
from k8s_helpers import (
    LORA_JOB,
    OVERLAYS,
    REPO,
    all_manifests,
    container,
    env,
    job_specs,
    load_docs,
    make,
    plus_commands,
    pod_templates,
    rendered,
    submit,
    tool,
    workload,
)
from k8s_jobset_schema import JOBSET

from sft_job import errors
from sft_job.cli import app
from sft_job.specload import parse_spec

K8S_VERSIONS = ("1.31.0", "1.37.0")  # oldest with podFailurePolicy GA; newest bundled
GPU = {"gpu-lora": 1, "gpu-full-deepspeed": 8, "multinode": 8}
# GKE TPU v5e: topology -> (chips, hosts); ct5lp-hightpu-8t = 8 chips/host, -4t = 4.
TPU = {"tpu-v5e-single": ("2x4", 8, 1), "tpu-v5e-multihost": ("4x4", 16, 4)}


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    return all_manifests()


@pytest.fixture(scope="module")
def lint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every rendered overlay, lora-job.yaml and the Jobs a JobSet creates, as files."""
    out = tmp_path_factory.mktemp("k8s-lint")
    assert submit.main(["lint-render", str(out)]) == 0
    (out / "lora-job.yaml").write_text(LORA_JOB.read_text())
    return out


# ---------------------------------------------------------------- schema and scanners


def test_every_overlay_renders_one_workload(manifests: dict[str, list[dict[str, Any]]]) -> None:
    found = sorted(p.parent.name for p in (REPO / "k8s/overlays").glob("*/kustomization.yaml"))
    assert found == sorted(OVERLAYS)
    for name, docs in manifests.items():
        kinds = [d["kind"] for d in docs]
        assert kinds.count("ConfigMap") == 1 and "ServiceAccount" in kinds, name
        assert workload(docs)["kind"] == ("JobSet" if name == "tpu-v5e-multihost" else "Job")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(lint_dir: Path, version: str) -> None:
    """kubernetes-validate --strict on every manifest; the JobSet's Job templates are checked
    as the batch/v1 Jobs JobSet creates (lint-render writes them next to the JobSet)."""
    files = sorted(lint_dir.glob("*.yaml"))
    assert any(f.name.endswith(".jobset-jobs.yaml") for f in files)
    r = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, *map(str, files)],
                       text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = re.findall(r"passed for resource (\S+)", r.stdout + r.stderr)
    assert "job/sft-job-slice-0" in passed                      # the JobSet's Job template
    assert passed.count("job/sft-job") == 5                     # lora-job + 4 Job overlays


def test_kubernetes_validate_catches_a_bad_field(tmp_path: Path) -> None:
    """The validator is really strict: a misspelled Job field fails."""
    docs = rendered("gpu-lora")
    workload(docs)["spec"]["backofLimit"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)], text=True,
                       capture_output=True)
    assert r.returncode != 0 and "backofLimit" in r.stdout + r.stderr


def test_jobset_matches_the_jobset_crd_schema(manifests: dict[str, list[dict[str, Any]]]) -> None:
    js = workload(manifests["tpu-v5e-multihost"])
    jsonschema.validate(js, JOBSET)
    broken = copy.deepcopy(js)
    broken["spec"]["failurePolicy"]["rules"][0]["onJobFailureReasons"] = ["PodFailurePolicyy"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, JOBSET)


def test_yamllint() -> None:
    r = subprocess.run([tool("yamllint"), "--strict", "-c", "k8s/.yamllint.yaml", "k8s"],
                       cwd=REPO, text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _checkov(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("checkov"), "--config-file", str(REPO / "k8s/.checkov.yaml"),
                           "-d", str(directory)], text=True, capture_output=True)


def _trivy(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("trivy"), "config", "--skip-check-update", "--quiet",
                           "--exit-code", "1", "--ignorefile", str(REPO / "k8s/.trivyignore"),
                           str(directory)], text=True, capture_output=True)


def test_checkov_passes(lint_dir: Path) -> None:
    """checkov with the skips of k8s/.checkov.yaml (each justified there) finds nothing."""
    r = _checkov(lint_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", r.stdout), r.stdout


def test_trivy_passes(lint_dir: Path) -> None:
    """trivy config with the ignores of k8s/.trivyignore (each justified there) finds nothing."""
    r = _trivy(lint_dir)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scanners_still_catch_a_privileged_pod(tmp_path: Path) -> None:
    """The skips do not blind the scanners: a privileged, root Job fails both."""
    docs = rendered("gpu-lora")
    tpl = pod_templates(docs)[0]
    tpl["spec"]["securityContext"] = {}
    container(tpl)["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump_all(docs))
    assert _checkov(tmp_path).returncode != 0
    assert _trivy(tmp_path).returncode != 0


# ---------------------------------------------------------------- meaning


def test_embedded_specs_parse(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Every spec in a manifest's ConfigMap is a valid JobSpec. This calls the spec parser
    (sft_job.specload.parse_spec), not `sft-job validate`: validate also probes the buckets and
    the Hub, and these specs name gs:// buckets and Hub models this machine cannot reach.
    test_submit_gpu_spec_passes_sft_job_validate runs the full `sft-job validate` on a spec
    that went through the same ConfigMap path."""
    for name, docs in manifests.items():
        spec = parse_spec(submit.embedded_spec(docs), name)
        assert spec.output.uri.startswith("gs://"), name
        assert spec.data.train.startswith("gs://"), name
    base = (REPO / "k8s/base/spec.yaml").read_text()
    assert submit.embedded_spec(manifests["lora-job.yaml"]) == base
    assert parse_spec(base, "base").method.kind == "lora"
    names = [parse_spec(submit.embedded_spec(d), n).name for n, d in manifests.items()]
    assert len(set(names)) == len(OVERLAYS)        # lora-job.yaml shares gpu-lora's spec
    assert parse_spec(submit.embedded_spec(manifests["gpu-full-deepspeed"]), "x").deepspeed \
        == "zero3"
    assert parse_spec(submit.embedded_spec(manifests["tpu-v5e-multihost"]), "x").backend == "tpu"


def test_container_runs_the_cli(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """No `command` (the image's ENTRYPOINT ["sft-job"] runs), and the args parse as
    `sft-job run /etc/sft-job/job.yaml` with the spec file the ConfigMap mount provides."""
    cli = typer.main.get_command(app)
    for name, docs in manifests.items():
        for tpl in pod_templates(docs):
            c = container(tpl)
            assert "command" not in c, name
            assert c["args"] == ["run", "/etc/sft-job/job.yaml"], name
            ctx = cli.make_context("sft-job", list(c["args"]), resilient_parsing=True)
            cmd_name, sub, rest = cli.resolve_command(ctx, list(c["args"]))
            assert cmd_name == "run" and sub is not None
            sub_ctx = sub.make_context("run", rest, parent=ctx)
            assert sub_ctx.params["spec"] == "/etc/sft-job/job.yaml"
            mount = {m["name"]: m for m in c["volumeMounts"]}["spec"]
            vol = {v["name"]: v for v in tpl["spec"]["volumes"]}["spec"]["configMap"]
            assert mount["mountPath"] == "/etc/sft-job" and mount["readOnly"]
            assert vol["items"] == [{"key": "job.yaml", "path": "job.yaml"}]
            cm = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"]
            assert vol["name"] == cm, name


@pytest.mark.parametrize("hw", ["cuda", "tpu", "cpu"])
def test_images_match_the_pods(hw: str) -> None:
    """The images' ENTRYPOINT is sft-job and their user is the pods' runAsUser."""
    dockerfile = REPO / "images" / hw / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip(f"{dockerfile} not written yet")
    text = dockerfile.read_text()
    assert re.search(r'^ENTRYPOINT \["sft-job"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] == "1000:1000"
    # The pods' root filesystem is read-only: every cache the image names must be on /work.
    env_lines = re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)
    image_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(env_lines)))
    for key in ("SFT_JOB_WORKDIR", "HF_HOME", "XDG_CACHE_HOME"):
        assert image_env[key].startswith("/work"), key


def test_pod_failure_policy_uses_the_job_exit_codes(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    """FailJob on the codes no retry can fix, Ignore on 75 and on disruption, codes taken
    from sft_job.errors (every SftJobError subclass), first rule = DisruptionTarget."""
    codes = {c.exit_code for c in _error_classes()}
    no_retry = sorted(codes - {errors.EXIT_BUG, errors.EXIT_RETRY})
    assert no_retry == [2, 3] and errors.EXIT_RETRY == 75
    for name, docs in manifests.items():
        for spec in job_specs(docs):
            assert spec["template"]["spec"]["restartPolicy"] == "Never"
            rules = spec["podFailurePolicy"]["rules"]
            for r in rules:
                if "onExitCodes" in r:
                    assert r["onExitCodes"]["containerName"] == "sft-job"
                    assert r["onExitCodes"]["operator"] == "In"
            fail = [r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob"]
            assert fail == [no_retry], name
            ignored = [r["onExitCodes"]["values"] for r in rules
                       if r["action"] == "Ignore" and "onExitCodes" in r]
            if workload(docs)["kind"] == "Job":
                assert rules[0] == {"action": "Ignore", "onPodConditions": [
                    {"type": "DisruptionTarget", "status": "True"}]}, name
                assert ignored == [[errors.EXIT_RETRY]], name
                assert spec["backoffLimit"] >= 1
            else:  # a JobSet restarts the whole slice on any other failure
                assert ignored == [] and spec["backoffLimit"] == 0
                fp = workload(docs)["spec"]["failurePolicy"]
                assert fp["maxRestarts"] >= 3
                assert fp["rules"][0]["action"] == "FailJobSet"
                assert fp["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]


def _error_classes() -> list[type[errors.SftJobError]]:
    out, todo = [], [errors.SftJobError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_job_limits(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in manifests.items():
        work = workload(docs)
        assert work["metadata"]["namespace"] == "sft-job"
        ttl = work["spec"]["ttlSecondsAfterFinished"]
        assert 3600 <= ttl <= 30 * 86400, name
        for spec in job_specs(docs):
            assert 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400, name
            assert spec["backoffLimit"] <= 3, name


def test_grace_period_exceeds_the_spec_stop_budget(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    """terminationGracePeriodSeconds > output.stop_budget_seconds of the spec in the
    ConfigMap, plus a margin (30 s or a fifth of the budget) for the step in flight."""
    for name, docs in manifests.items():
        budget = parse_spec(submit.embedded_spec(docs), name).output.stop_budget_seconds
        for tpl in pod_templates(docs):
            grace = tpl["spec"]["terminationGracePeriodSeconds"]
            assert grace >= budget + max(30, budget // 5), (name, grace, budget)


def test_security_and_volumes(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in manifests.items():
        for tpl in pod_templates(docs):
            pod = tpl["spec"]
            assert pod["serviceAccountName"] == "sft-job"
            assert pod["automountServiceAccountToken"] is False
            assert not pod.get("hostNetwork") and not pod.get("hostPID")
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] and psc["runAsUser"] == 1000 and psc["fsGroup"] == 1000
            assert psc["seccompProfile"]["type"] == "RuntimeDefault"
            c = container(tpl)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert res["requests"][key] == res["limits"][key], (name, key)
            vols = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert vols[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
            assert "emptyDir" in vols[mounts["/work"]] and "emptyDir" in vols[mounts["/tmp"]]
            e = env(c)
            assert e["SFT_JOB_WORKDIR"]["value"] == "/work"
            assert e["HF_HOME"]["value"] == "/work/hf"
            assert e["PYTHONUNBUFFERED"]["value"] == "1"
            ref = e["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
            tol = {t["key"] for t in pod["tolerations"]}
            assert "cloud.google.com/gke-spot" in tol
        ns = next(d for d in docs if d["kind"] == "Namespace")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == "sft-job", (name, d["kind"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_accelerators_use_the_documented_names(overlay: str) -> None:
    """GPUs: nvidia.com/gpu and cloud.google.com/gke-accelerator; TPU v5e: google.com/tpu,
    gke-tpu-accelerator tpu-v5-lite-podslice and a topology whose chips the pods request."""
    docs = rendered(overlay)
    for tpl in pod_templates(docs):
        pod, c = tpl["spec"], container(tpl)
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        tol = {t["key"]: t for t in pod["tolerations"]}
        if overlay in GPU:
            assert req["nvidia.com/gpu"] == lim["nvidia.com/gpu"] == GPU[overlay]
            assert "google.com/tpu" not in req
            assert set(pod["nodeSelector"]) == {"cloud.google.com/gke-accelerator"}
            assert tol["nvidia.com/gpu"]["effect"] == "NoSchedule"
            assert re.fullmatch(r".*/sft-job-cuda:\S+", c["image"])
        else:
            topology, chips, hosts = TPU[overlay]
            assert pod["nodeSelector"] == {
                "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                "cloud.google.com/gke-tpu-topology": topology}
            x, y = map(int, topology.split("x"))
            assert x * y == chips
            assert req["google.com/tpu"] == lim["google.com/tpu"] == chips // hosts
            assert "nvidia.com/gpu" not in req
            assert tol["google.com/tpu"]["effect"] == "NoSchedule"
            assert re.fullmatch(r".*/sft-job-tpu:\S+", c["image"])
            assert env(c)["PJRT_DEVICE"]["value"] == "TPU"
    # The example spec is written for this hardware: backend, and what `sft-job validate`
    # sizes memory for (resources.accelerator, resources.devices = devices of all pods).
    spec = parse_spec(submit.embedded_spec(docs), overlay)
    pods = sum(js.get("parallelism", 1) for js in job_specs(docs))
    if overlay in GPU:
        assert spec.backend == "cuda"
        assert spec.resources.accelerator == pod["nodeSelector"]["cloud.google.com/gke-accelerator"]
        assert spec.resources.devices == GPU[overlay] * pods
    else:
        assert spec.backend == "tpu" and spec.resources.accelerator == "tpu-v5e"
        assert spec.resources.devices == TPU[overlay][1]
    if overlay == "tpu-v5e-multihost":
        (spec,) = job_specs(docs)
        assert spec["completions"] == spec["parallelism"] == TPU[overlay][2]
        assert spec["completionMode"] == "Indexed"
        ports = {p["containerPort"] for p in container(pod_templates(docs)[0])["ports"]}
        assert 8471 in ports
        notes = workload(docs)["metadata"]["annotations"]
        assert notes["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
            "cloud.google.com/gke-nodepool"


def test_multinode_rendezvous() -> None:
    """Indexed Job + headless Service: MASTER_ADDR is pod 0's DNS name, NODE_RANK its index,
    NNODES the pod count; the job reads them, the manifest only has to get them right."""
    docs = rendered("multinode")
    work = workload(docs)
    spec, tpl = work["spec"], pod_templates(docs)[0]
    c = container(tpl)
    e = env(c)
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(e["NNODES"]["value"]) >= 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert tpl["spec"]["subdomain"] == svc["metadata"]["name"]
    labels = tpl["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert e["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    names = [x["name"] for x in c["env"]]
    assert names.index("JOB_NAME") < names.index("MASTER_ADDR")  # $(JOB_NAME) expansion
    assert e["MASTER_ADDR"]["value"] == f"$(JOB_NAME)-0.{svc['metadata']['name']}"
    assert e["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    port = int(e["MASTER_PORT"]["value"])
    assert port in {p["port"] for p in svc["spec"]["ports"]}
    assert port in {p["containerPort"] for p in c["ports"]}


def test_lora_job_matches_the_gpu_lora_overlay(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """k8s/lora-job.yaml is the gpu-lora overlay written out: the same objects, field for
    field, except the ConfigMap's content-hash suffix."""

    def normal(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        text = yaml.safe_dump_all(docs)
        text = re.sub(r"sft-job-spec-[a-z0-9]{10}\b", "sft-job-spec", text)
        out = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text)}
        for d in out.values():  # kustomize reorders merged volumes; their order means nothing
            pod = d.get("spec", {}).get("template", {}).get("spec")
            if pod:
                pod["volumes"] = sorted(pod["volumes"], key=lambda v: v["name"])
        return out

    plain, overlay = normal(manifests["lora-job.yaml"]), normal(manifests["gpu-lora"])
    assert plain.keys() == overlay.keys()
    for key in plain:
        assert plain[key] == overlay[key], key


# ---------------------------------------------------------------- make submit-gpu / submit-tpu-gke


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    """A valid spec unlike every example: its own name and a 900 s stop budget."""
    text = (REPO / "k8s/base/spec.yaml").read_text()
    text = text.replace("name: qwen2.5-1.5b-alpaca-lora", "name: test_run.v2")
    text = re.sub(r"stop_budget_seconds: \d+", "stop_budget_seconds: 900", text)
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


@pytest.fixture()
def fake_kubectl(tmp_path: Path) -> tuple[Path, Path]:
    """A kubectl that renders with the real one and records everything else (apply)."""
    log = tmp_path / "kubectl.log"
    script = tmp_path / "kubectl"
    real = subprocess.run(["bash", "-c", "command -v kubectl"], text=True,
                          capture_output=True).stdout.strip()
    script.write_text(f"""#!/usr/bin/env bash
if [[ $1 == kustomize ]]; then exec {real} "$@"; fi
echo "$*" >> {log}
exit ${{FAKE_KUBECTL_RC:-0}}
""")
    script.chmod(0o755)
    return script, log


def _submit_gpu(tmp_path: Path, kubectl: Path, *args: str, check: bool = True):
    return make("submit-gpu", f"K8S_OUT={tmp_path / 'k8s'}", "TAG=t9", "REGISTRY=reg.example/p",
                *args, env_extra={"KUBECTL": str(kubectl)}, check=check)


def test_submit_gpu_dry_run(tmp_path: Path, spec_file: Path,
                            fake_kubectl: tuple[Path, Path]) -> None:
    kubectl, log = fake_kubectl
    r = _submit_gpu(tmp_path, kubectl, "DRY_RUN=1", f"JOB={spec_file}", "KUBE_CONTEXT=gke_ctx",
                    "GCP_SA=sft@p.iam.gserviceaccount.com")
    assert not log.exists(), "a dry run must not call kubectl apply"
    manifest = tmp_path / "k8s/test-run-v2/manifest.yaml"
    (cmd,) = plus_commands(r.stdout)
    assert shlex.split(cmd)[1:] == ["--context=gke_ctx", "apply", "-f", str(manifest)]
    assert manifest.read_text() in r.stdout            # the rendered manifest is printed
    docs = load_docs(manifest)
    job = workload(docs)
    assert job["metadata"]["name"] == "test-run-v2"
    assert submit.embedded_spec(docs) == spec_file.read_text()
    tpl = pod_templates(docs)[0]
    assert container(tpl)["image"] == "reg.example/p/sft-job-cuda:t9"
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 900 + 180
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "sft@p.iam.gserviceaccount.com"}
    assert "kubectl --context=gke_ctx -n sft-job logs -f job/test-run-v2" in r.stdout


def test_submit_gpu_applies_with_kubectl(tmp_path: Path, spec_file: Path,
                                         fake_kubectl: tuple[Path, Path]) -> None:
    kubectl, log = fake_kubectl
    r = _submit_gpu(tmp_path, kubectl, f"JOB={spec_file}", "GPU_OVERLAY=multinode", "NODES=3",
                    "DIGEST=sha256:" + "a" * 64)
    (applied,) = log.read_text().splitlines()
    manifest = tmp_path / "k8s/test-run-v2/manifest.yaml"
    assert applied == f"apply -f {manifest}"
    docs = load_docs(manifest)
    job = workload(docs)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert env(container(pod_templates(docs)[0]))["NNODES"]["value"] == "3"
    assert container(pod_templates(docs)[0])["image"] == \
        "reg.example/p/sft-job-cuda@sha256:" + "a" * 64
    assert "--max-log-requests=3" in r.stdout
    # A failing apply (e.g. the Job exists with another spec) explains itself.
    r = make("submit-gpu", f"K8S_OUT={tmp_path / 'k8s'}", f"JOB={spec_file}", check=False,
             env_extra={"KUBECTL": str(kubectl), "FAKE_KUBECTL_RC": "1"})
    assert r.returncode != 0 and "delete job test-run-v2" in r.stderr


def test_submit_tpu_gke_multihost_dry_run(tmp_path: Path, spec_file: Path,
                                          fake_kubectl: tuple[Path, Path]) -> None:
    kubectl, log = fake_kubectl
    r = make("submit-tpu-gke", "DRY_RUN=1", "TPU_GKE_OVERLAY=tpu-v5e-multihost",
             f"JOB={spec_file}", f"K8S_OUT={tmp_path / 'k8s'}", "TAG=t9", "REGISTRY=reg.example/p",
             env_extra={"KUBECTL": str(kubectl)})
    assert not log.exists()
    docs = load_docs(tmp_path / "k8s/test-run-v2/manifest.yaml")
    js = workload(docs)
    assert js["kind"] == "JobSet" and js["metadata"]["name"] == "test-run-v2"
    jsonschema.validate(js, JOBSET)
    tpl = pod_templates(docs)[0]
    assert container(tpl)["image"] == "reg.example/p/sft-job-tpu:t9"
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 1080
    cm = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"]
    assert {v["name"]: v for v in tpl["spec"]["volumes"]}["spec"]["configMap"]["name"] == cm
    assert "jobset.sigs.k8s.io/jobset-name=test-run-v2" in r.stdout


def test_submit_refuses_bad_input(tmp_path: Path, fake_kubectl: tuple[Path, Path]) -> None:
    kubectl, log = fake_kubectl
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "k8s/base/spec.yaml").read_text().replace("kind: lora", "kind: lorra"))
    r = _submit_gpu(tmp_path, kubectl, f"JOB={bad}", check=False)
    assert r.returncode != 0 and "method.kind" in r.stderr and not plus_commands(r.stdout)
    r = _submit_gpu(tmp_path, kubectl, "GPU_OVERLAY=tpu-v5e-single", "DRY_RUN=1", check=False)
    assert r.returncode != 0 and "GPU_OVERLAY" in r.stderr
    r = _submit_gpu(tmp_path, kubectl, "NODES=2", "DRY_RUN=1", check=False)  # gpu-lora
    assert r.returncode != 0 and "multinode" in r.stderr
    assert not log.exists()


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_job_spec_renders(tmp_path: Path, job: str) -> None:
    """Every spec in jobs/ goes through the generated kustomization into the ConfigMap intact."""
    path = REPO / "jobs" / job
    r = submit.render("gpu-lora", path, registry="r", tag="t", out_dir=tmp_path)
    assert submit.embedded_spec(r.docs) == path.read_text()
    assert workload(r.docs)["metadata"]["name"] == r.name


def test_submit_gpu_spec_passes_sft_job_validate(tmp_path: Path,
                                                 fake_kubectl: tuple[Path, Path]) -> None:
    """The full `sft-job validate` (storage and data probes included) on the spec as the pod
    will read it: jobs/smoke-cpu.yaml, which needs no network, taken back out of the
    ConfigMap that `make submit-gpu DRY_RUN=1` rendered."""
    smoke = REPO / "jobs/smoke-cpu.yaml"
    if not smoke.exists() or not (REPO / ".venv/bin/sft-job").exists():
        pytest.skip("needs jobs/smoke-cpu.yaml and the project venv")
    kubectl, _ = fake_kubectl
    _submit_gpu(tmp_path, kubectl, "DRY_RUN=1", f"JOB={smoke}")
    docs = load_docs(tmp_path / "k8s/smoke-cpu/manifest.yaml")
    mounted = tmp_path / "job.yaml"
    mounted.write_text(submit.embedded_spec(docs))
    r = subprocess.run([str(REPO / ".venv/bin/sft-job"), "validate", str(mounted),
                        "--samples", "1"], cwd=REPO, text=True, capture_output=True,
                       timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                         "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- make submit-tpu (TPU VMs)


def _submit_tpu(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None,
                check: bool = True):
    return make("submit-tpu", "PROJECT=proj-1", "ZONE=us-west4-a", "TAG=t9",
                "REGISTRY=us-docker.pkg.dev/proj-1/sft-job", *args,
                env_extra={"STAGE": str(tmp_path / "stage"), **(env_extra or {})}, check=check)


def _worker_command(cmds: list[str]) -> str:
    (ssh,) = [c for c in cmds if "docker run" in c]
    (opt,) = [a for a in shlex.split(ssh) if a.startswith("--command=")]
    return opt.removeprefix("--command=")


def test_submit_tpu_dry_run(tmp_path: Path, spec_file: Path) -> None:
    r = _submit_tpu(tmp_path, "DRY_RUN=1", f"JOB={spec_file}", "TPU_ACCELERATOR=v5litepod-16",
                    "HF_TOKEN_SECRET=hf-token")
    cmds = plus_commands(r.stdout)
    where = ["--project=proj-1", "--zone=us-west4-a"]
    argv = [shlex.split(c) for c in cmds]
    create = [a for a in argv if a[1:5] == ["compute", "tpus", "queued-resources", "create"]]
    assert len(create) == 1
    c = create[0]
    assert c[5] == "sft-job-v5e" and set(where) <= set(c)
    assert {"--node-id=sft-job-v5e", "--accelerator-type=v5litepod-16",
            "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(c)
    waits = [a for a in argv if a[3:5] == ["queued-resources", "describe"]]
    assert waits and all("--format=value(state.state)" in a for a in waits)
    assert "poll every 30 s" in r.stdout
    (scp,) = [a for a in argv if a[3:5] == ["tpu-vm", "scp"]]
    assert scp[5:7] == [str(tmp_path / "stage/job.yaml"), "sft-job-v5e:/tmp/sft-job/job.yaml"]
    assert "--worker=all" in scp
    assert (tmp_path / "stage/job.yaml").read_text() == spec_file.read_text()
    ssh = [a for a in argv if a[3:5] == ["tpu-vm", "ssh"]]
    assert ssh and all("--worker=all" in a and set(where) <= set(a) for a in ssh)
    remote = _worker_command(cmds)
    image = "us-docker.pkg.dev/proj-1/sft-job/sft-job-tpu:t9"
    assert "docker run -d --name sft-job --privileged --net=host" in remote
    assert "--stop-timeout=1080" in remote                    # from the spec's 900 s budget
    assert "-v /tmp/sft-job/job.yaml:/etc/sft-job/job.yaml:ro" in remote
    assert remote.endswith(f"{image} run /etc/sft-job/job.yaml")
    assert "gcloud secrets versions access latest --secret=hf-token" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)   # valid shell


def test_tpu_logs_and_delete_dry_run() -> None:
    r = make("tpu-logs", "tpu-delete", "DRY_RUN=1", "PROJECT=proj-1", "ZONE=us-west4-a",
             "TPU_WORKER=all")
    logs, delete = map(shlex.split, plus_commands(r.stdout))
    assert logs[1:5] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in logs
    assert "--command=sudo docker logs --follow --tail=200 sft-job" in logs
    assert delete[1:6] == ["compute", "tpus", "queued-resources", "delete", "sft-job-v5e"]
    assert {"--force", "--quiet", "--project=proj-1", "--zone=us-west4-a"} <= set(delete)


def test_tpu_commands_parse_with_gcloud(tmp_path: Path, spec_file: Path) -> None:
    """The printed gcloud commands are accepted by the real gcloud's argument parser: with an
    empty config each one stops at the missing login (exit 1), never at a bad argument
    (exit 2, 'unrecognized arguments'), and a deliberately bad flag shows the difference."""
    gcloud = subprocess.run(["bash", "-c", "command -v gcloud"], text=True,
                            capture_output=True).stdout.strip()
    if not gcloud:
        pytest.skip("gcloud not installed")
    cmds = plus_commands(_submit_tpu(tmp_path, "DRY_RUN=1", f"JOB={spec_file}",
                                     "GCP_SA=sa@proj-1.iam.gserviceaccount.com").stdout)
    cmds += plus_commands(make("tpu-logs", "tpu-delete", "DRY_RUN=1").stdout)
    cfg = tmp_path / "gcloud-config"
    cfg.mkdir()
    env_ = {"CLOUDSDK_CONFIG": str(cfg), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env_, text=True, capture_output=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    unique = list(dict.fromkeys(cmds))
    with ThreadPoolExecutor(4) as pool:  # ~3 s of gcloud start-up each
        results = list(pool.map(lambda c: run(shlex.split(c)), unique))
    for cmd, r in zip(unique, results, strict=True):
        assert r.returncode == 1 and "active account" in r.stderr, (cmd, r.stderr)
    r = run([*shlex.split(cmds[1]), "--no-such-flag"])
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_tpu_worker_command_runs_the_image(tmp_path: Path, spec_file: Path) -> None:
    """Run the remote command here with sudo, docker and gcloud faked: it pulls and starts the
    TPU image once, with the spec mounted and the token passed by name, not by value."""
    remote = _worker_command(plus_commands(_submit_tpu(
        tmp_path, "DRY_RUN=1", f"JOB={spec_file}", "HF_TOKEN_SECRET=hf-token").stdout))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    fakes = {
        "sudo": 'while [[ $1 == -* ]]; do shift; done; echo "sudo $*" >> LOG; '
                '[[ $1 == docker || $1 == gcloud ]] && exec "$@"; exit 0',
        "docker": 'echo "docker $* HF_TOKEN=${HF_TOKEN:-}" >> LOG',
        "gcloud": 'echo "gcloud $*" >> LOG; [[ $1 == secrets ]] && echo s3cret; exit 0',
        "hostname": "echo worker-0",
    }
    for name, body in fakes.items():
        (bin_ / name).write_text("#!/usr/bin/env bash\n" + body.replace("LOG", str(log)) + "\n")
        (bin_ / name).chmod(0o755)
    subprocess.run(["bash", "-c", remote], check=True, env={"PATH": f"{bin_}:/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    runs = [c for c in calls if c.startswith("docker run")]
    assert len(runs) == 1
    argv = shlex.split(runs[0].rsplit(" HF_TOKEN=", 1)[0])
    assert argv[-3:] == ["us-docker.pkg.dev/proj-1/sft-job/sft-job-tpu:t9", "run",
                         "/etc/sft-job/job.yaml"]
    assert runs[0].endswith("HF_TOKEN=s3cret") and "s3cret" not in remote
    assert "-e" in argv and "HF_TOKEN" in argv
    assert any(c.startswith("docker pull us-docker.pkg.dev/") for c in calls)
    assert "gcloud auth configure-docker us-docker.pkg.dev --quiet" in calls


def test_submit_tpu_waits_for_active(tmp_path: Path, spec_file: Path) -> None:
    """Without DRY_RUN, against a fake gcloud: not found -> create -> wait through
    WAITING_FOR_RESOURCES and PROVISIONING -> ACTIVE -> copy the spec -> start the image."""
    log, state = tmp_path / "gcloud.log", tmp_path / "state"
    fake = tmp_path / "gcloud"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ $4 == describe ]]; then                 # one state per call; the last one sticks
  [[ -s {state} ]] || exit 1                  # not found
  head -1 {state}
  if (( $(wc -l < {state}) > 1 )); then tail -n +2 {state} > {state}.n; mv {state}.n {state}; fi
fi
if [[ $4 == create ]]; then printf 'WAITING_FOR_RESOURCES\\nPROVISIONING\\nACTIVE\\n' > {state}; fi
exit 0
""")
    fake.chmod(0o755)
    env_ = {"GCLOUD": str(fake), "TPU_POLL_SECONDS": "0"}
    r = _submit_tpu(tmp_path, f"JOB={spec_file}", "WATCH=0", env_extra=env_)
    verbs = [" ".join(line.split()[2:4]) for line in log.read_text().splitlines()]
    assert verbs[:2] == ["queued-resources describe", "queued-resources create"]
    assert verbs[2:5] == ["queued-resources describe"] * 3
    assert verbs[5:] == ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh"]
    assert "WAITING_FOR_RESOURCES" in r.stdout and "is ACTIVE" in r.stdout
    # Submitting again reuses the ACTIVE slice instead of creating another.
    log.write_text("")
    _submit_tpu(tmp_path, f"JOB={spec_file}", "WATCH=0", env_extra=env_)
    assert "create" not in log.read_text()
    # A slice that fails stops the wait with an error.
    state.write_text("FAILED\n")
    log.write_text("")
    r = _submit_tpu(tmp_path, f"JOB={spec_file}", "WATCH=0", env_extra=env_, check=False)
    assert r.returncode != 0 and "FAILED" in r.stderr and "scp" not in log.read_text()


def test_submit_tpu_checks_the_spec_first(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    r = _submit_tpu(tmp_path, "DRY_RUN=1", f"JOB={bad}", check=False)
    assert r.returncode != 0 and "model" in r.stderr and not plus_commands(r.stdout)


def test_settings_file_feeds_the_targets(tmp_path: Path) -> None:
    """cluster.env holds the defaults (project, zone, accelerator, registry, spec); a
    cluster.local.env beside it (CLUSTER_SETTINGS) overrides them; the command line wins."""
    local = tmp_path / "local.env"
    local.write_text("PROJECT=from-local\nTPU_ACCELERATOR=v5litepod-16\n")
    settings = f"CLUSTER_SETTINGS={local} cluster.env"
    r = make("tpu-delete", "DRY_RUN=1", settings)
    assert "--project=from-local" in r.stdout and "--zone=us-central1-a" in r.stdout
    r = make("tpu-delete", "DRY_RUN=1", settings, "PROJECT=cli")
    assert "--project=cli" in r.stdout
    defaults = dict(line.split("=", 1) for line in (REPO / "cluster.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert {"PROJECT", "ZONE", "TPU_ACCELERATOR", "REGISTRY", "JOB"} <= defaults.keys()
