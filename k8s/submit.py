"""Render a kustomize overlay with a job spec from jobs/, then apply it (or print it).

    python k8s/submit.py apply gpu-lora --job jobs/x.yaml --registry R --tag T --dry-run
    python k8s/submit.py facts jobs/x.yaml          # name, grace period, output, for TPU VMs
    python k8s/submit.py lint-render out/k8s-lint   # every overlay, for the linters

`make submit-gpu`, `make submit-tpu-gke`, `make submit-tpu` and `make k8s-lint` call this with
the settings of cluster.env. kustomize only reads files inside a kustomization's folder, so the
spec cannot be referenced from jobs/ directly: each submission gets a generated kustomization
in out/k8s/<name>/ that takes the overlay as its resource, replaces the overlay's example spec
(`configMapGenerator` with `behavior: replace`) with a copy of JOB, and patches what depends on
the spec: the workload's name, its grace period, the image registry and tag. The folder stays
behind as the record of what was submitted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # sft_job from this checkout when it is not installed
    sys.path.append(str(REPO))
OVERLAYS = REPO / "k8s" / "overlays"
NAMESPACE = "sft-job"
CONTAINER = "sft-job"
SPEC_CONFIGMAP = "sft-job-spec"
WORKLOAD_KINDS = ("Job", "JobSet")


class SubmitError(Exception):
    """A problem the user can fix (bad spec, unknown overlay, kubectl failure)."""


def grace_seconds(stop_budget_seconds: int) -> int:
    """The least pod grace period for a spec: its stop budget plus a margin for the step in
    flight, process exit and log flush (30 s, or a fifth of the budget when that is more)."""
    return stop_budget_seconds + max(30, stop_budget_seconds // 5)


def workload_name(spec_name: str) -> str:
    """A Kubernetes name for the spec's `name`: DNS-label characters, short enough that pod
    hostnames (<job>-<index>, <jobset>-slice-0-<index>) stay within 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec_name.lower()).strip("-")[:50].rstrip("-")
    return name or "sft-job"


def parse_job_spec(text: str, source: str) -> Any:
    """Validate a job spec with sft-job's own parser (no storage access); SubmitError if bad."""
    try:
        from sft_job.errors import SpecError
        from sft_job.specload import parse_spec
    except ImportError as e:
        raise SubmitError(f"cannot import sft_job ({e}): run with the project venv "
                          "(make venv; .venv/bin/python k8s/submit.py ...)") from None
    try:
        return parse_spec(text, source)
    except SpecError as e:
        raise SubmitError(f"invalid job spec: {e}") from None


def kustomize_text(path: Path) -> str:
    """The output of `kubectl kustomize PATH`."""
    kubectl = os.environ.get("KUBECTL", "kubectl")
    try:
        return subprocess.run([kubectl, "kustomize", str(path)], check=True, text=True,
                              capture_output=True).stdout
    except FileNotFoundError:
        raise SubmitError(f"{kubectl} not found: install kubectl (it bundles kustomize)") from None
    except subprocess.CalledProcessError as e:
        raise SubmitError(f"kubectl kustomize {path} failed: {e.stderr.strip()}") from None


def load_docs(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a multi-document YAML text."""
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` as a list of documents."""
    return load_docs(kustomize_text(path))


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (inline patches) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(data: Any) -> str:
    """YAML for the files this script writes."""
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False)


def find(docs: list[dict[str, Any]], kind: str, prefix: str = "") -> list[dict[str, Any]]:
    """Documents of one kind whose name starts with prefix."""
    return [d for d in docs if d.get("kind") == kind
            and d["metadata"]["name"].startswith(prefix)]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one Job or JobSet of a rendered overlay."""
    found = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    if len(found) != 1:
        raise SubmitError(f"expected one Job or JobSet, found {len(found)}")
    return found[0]


def pod_templates(work: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(JSON pointer, pod template) of every pod template in a Job or JobSet."""
    if work["kind"] == "Job":
        return [("/spec/template", work["spec"]["template"])]
    return [(f"/spec/replicatedJobs/{i}/template/spec/template", rj["template"]["spec"]["template"])
            for i, rj in enumerate(work["spec"]["replicatedJobs"])]


def embedded_spec(docs: list[dict[str, Any]]) -> str:
    """The job spec text in the rendered spec ConfigMap."""
    maps = find(docs, "ConfigMap", SPEC_CONFIGMAP)
    if len(maps) != 1:
        raise SubmitError(f"expected one {SPEC_CONFIGMAP} ConfigMap, found {len(maps)}")
    return maps[0]["data"]["job.yaml"]


def jobset_templates_as_jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each JobSet replicatedJobs[].template as the batch/v1 Job JobSet will create, so that
    Kubernetes schema validators and scanners, which skip the JobSet CRD, check them."""
    jobs = []
    for js in find(docs, "JobSet"):
        for rj in js["spec"]["replicatedJobs"]:
            meta = {"name": f"{js['metadata']['name']}-{rj['name']}-0",
                    "namespace": js["metadata"].get("namespace", NAMESPACE)}
            jobs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                         "spec": rj["template"]["spec"]})
    return jobs


# ---------------------------------------------------------------- rendering


@dataclass
class Rendered:
    """One rendered submission: where its files are and what it creates."""

    overlay: str
    name: str
    kind: str
    docs: list[dict[str, Any]]
    directory: Path
    nodes: int

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.yaml"


def overlay_dir(overlay: str) -> Path:
    """k8s/overlays/<overlay>, or an error listing the overlays."""
    path = OVERLAYS / overlay
    if not (path / "kustomization.yaml").is_file():
        names = sorted(p.name for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
        raise SubmitError(f"unknown overlay {overlay!r}: one of {', '.join(names)}")
    return path


def _image_entries(work: dict[str, Any], registry: str | None, tag: str | None,
                   digest: str | None) -> list[dict[str, str]]:
    entries = []
    for _, tpl in pod_templates(work):
        for c in tpl["spec"]["containers"]:
            name = c["image"].split("@")[0].rsplit(":", 1)[0]
            entry = {"name": name}
            if registry:
                entry["newName"] = f"{registry.rstrip('/')}/{name.rsplit('/', 1)[-1]}"
            if digest:
                entry["digest"] = digest
            elif tag:
                entry["newTag"] = tag
            if len(entry) > 1 and entry not in entries:
                entries.append(entry)
    return entries


def _nodes_ops(work: dict[str, Any], nodes: int) -> list[dict[str, Any]]:
    """JSON patch ops that make a multinode Indexed Job run on `nodes` pods."""
    spec = work["spec"]
    containers = spec["template"]["spec"]["containers"]
    ci = next(i for i, c in enumerate(containers) if c["name"] == CONTAINER)
    env = containers[ci].get("env", [])
    ei = next((i for i, e in enumerate(env) if e["name"] == "NNODES"), None)
    if work["kind"] != "Job" or spec.get("completionMode") != "Indexed" or ei is None:
        raise SubmitError("NODES only applies to the multinode overlay (an Indexed Job "
                          "whose pods read NNODES)")
    return [
        {"op": "replace", "path": "/spec/completions", "value": nodes},
        {"op": "replace", "path": "/spec/parallelism", "value": nodes},
        {"op": "replace", "path": f"/spec/template/spec/containers/{ci}/env/{ei}/value",
         "value": str(nodes)},
    ]


def _workload_patch(work: dict[str, Any], name: str, budget: int,
                    nodes: int | None) -> dict[str, Any]:
    ops: list[dict[str, Any]] = [{"op": "replace", "path": "/metadata/name", "value": name}]
    need = grace_seconds(budget)
    for pointer, tpl in pod_templates(work):
        # Never lower an overlay's grace period, only raise it to what the spec needs.
        if tpl["spec"].get("terminationGracePeriodSeconds", 30) < need:
            ops.append({"op": "add", "path": f"{pointer}/spec/terminationGracePeriodSeconds",
                        "value": need})
    if nodes is not None:
        ops += _nodes_ops(work, nodes)
    target = {"kind": work["kind"], "name": work["metadata"]["name"]}
    return {"target": target, "patch": dump(ops)}


def _sa_patch(gcp_sa: str | None, aws_role_arn: str | None) -> dict[str, Any] | None:
    notes = {}
    if gcp_sa:
        notes["iam.gke.io/gcp-service-account"] = gcp_sa
    if aws_role_arn:
        notes["eks.amazonaws.com/role-arn"] = aws_role_arn
    if not notes:
        return None
    patch = {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "sft-job", "annotations": notes}}
    return {"patch": dump(patch)}


def render(overlay: str, job: Path | None = None, *, registry: str | None = None,
           tag: str | None = None, digest: str | None = None, nodes: int | None = None,
           gcp_sa: str | None = None, aws_role_arn: str | None = None,
           out_dir: Path = REPO / "out" / "k8s") -> Rendered:
    """Render `overlay` with the spec file `job` (default: the overlay's example spec) into
    out_dir/<name>/ and return the result. The spec is validated first."""
    base_docs = kustomize(overlay_dir(overlay))
    work = workload(base_docs)
    if job is not None:
        if not job.is_file():
            raise SubmitError(f"{job}: spec file not found")
        text = job.read_text(encoding="utf-8")
        spec = parse_job_spec(text, str(job))
    else:
        spec = parse_job_spec(embedded_spec(base_docs), f"k8s/overlays/{overlay} example spec")
    name = workload_name(spec.name)
    directory = out_dir / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)

    kz: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay_dir(overlay), directory)],
    }
    if job is not None:
        (directory / "job.yaml").write_text(text, encoding="utf-8")
        kz["configMapGenerator"] = [{"name": SPEC_CONFIGMAP, "behavior": "replace",
                                     "files": ["job.yaml"]}]
    images = _image_entries(work, registry, tag, digest)
    if images:
        kz["images"] = images
    patches = [_workload_patch(work, name, spec.output.stop_budget_seconds, nodes)]
    sa = _sa_patch(gcp_sa, aws_role_arn)
    if sa:
        patches.append(sa)
    kz["patches"] = patches
    header = (f"# Generated by k8s/submit.py: overlay {overlay}, spec "
              f"{job if job is not None else 'the overlay example'}. Rebuild, don't edit.\n")
    (directory / "kustomization.yaml").write_text(header + dump(kz))

    text_out = kustomize_text(directory)
    docs = load_docs(text_out)
    final = workload(docs)
    if job is not None and embedded_spec(docs) != text:
        raise SubmitError("the rendered ConfigMap does not hold the given spec")
    count = nodes or (final["spec"].get("parallelism", 1) if final["kind"] == "Job" else sum(
        rj["template"]["spec"].get("parallelism", 1) for rj in final["spec"]["replicatedJobs"]))
    rendered = Rendered(overlay, name, final["kind"], docs, directory, count)
    rendered.manifest.write_text(text_out)
    return rendered


# ---------------------------------------------------------------- commands


def _kubectl(context: str | None) -> list[str]:
    cmd = [os.environ.get("KUBECTL", "kubectl")]
    return [*cmd, f"--context={context}"] if context else cmd


def follow_commands(r: Rendered, context: str | None) -> list[list[str]]:
    """kubectl commands to watch a submission: status, then logs of all its pods."""
    k = [*_kubectl(context), "-n", NAMESPACE]
    if r.kind == "JobSet":
        selector = f"jobset.sigs.k8s.io/jobset-name={r.name}"
        status = [*k, "get", "jobset", r.name]
    else:
        selector = f"batch.kubernetes.io/job-name={r.name}"
        status = [*k, "get", "job", r.name]
    if r.nodes > 1:
        logs = [*k, "logs", "-f", "-l", selector, "--prefix", f"--max-log-requests={r.nodes}"]
    else:
        logs = [*k, "logs", "-f", f"job/{r.name}"]
    return [status, logs, [*k, "get", "pods", "-l", selector]]


def _display(path: Path) -> str:
    """A path as the user should see it: relative when under the current folder."""
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


def cmd_apply(args: argparse.Namespace) -> int:
    """Render, then print (--dry-run) or run `kubectl apply`, then print how to follow."""
    r = render(args.overlay, Path(args.job) if args.job else None, registry=args.registry,
               tag=args.tag, digest=args.digest, nodes=args.nodes, gcp_sa=args.gcp_sa,
               aws_role_arn=args.aws_role_arn, out_dir=Path(args.out_dir))
    manifest = _display(r.manifest)
    apply = [*_kubectl(args.context), "apply", "-f", manifest]
    print(f"# {r.kind} {NAMESPACE}/{r.name} from k8s/overlays/{r.overlay} "
          f"with {args.job or 'its example spec'}; rendered to {manifest}")
    if args.dry_run:
        print(f"# --- {manifest}")
        print(r.manifest.read_text(), end="")
        print("# --- DRY_RUN: would run")
        print("+ " + shlex.join(apply))
    else:
        print("+ " + shlex.join(apply), flush=True)
        if subprocess.run(apply).returncode != 0:
            raise SubmitError(
                f"kubectl apply failed. A {r.kind} cannot be changed once created: if "
                f"{r.name} exists from an earlier submission, delete it first "
                f"(kubectl -n {NAMESPACE} delete {r.kind.lower()} {r.name}) or rename the spec.")
    print("# follow it with:")
    for c in follow_commands(r, args.context):
        print("  " + shlex.join(c))
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    """Print what the TPU VM path needs from a spec, as shell-readable KEY=value lines."""
    path = Path(args.job)
    if not path.is_file():
        raise SubmitError(f"{path}: spec file not found")
    spec = parse_job_spec(path.read_text(encoding="utf-8"), str(path))
    budget = spec.output.stop_budget_seconds
    print(f"SPEC_NAME={workload_name(spec.name)}")
    print(f"STOP_BUDGET_SECONDS={budget}")
    print(f"GRACE_SECONDS={grace_seconds(budget)}")
    print(f"OUTPUT_URI={spec.output.uri}")  # where make submit-tpu's watch looks for _SUCCESS
    return 0


def cmd_lint_render(args: argparse.Namespace) -> int:
    """Render every overlay to OUT/<overlay>.yaml, plus OUT/<overlay>.jobset-jobs.yaml with
    the Jobs a JobSet will create, for kubernetes-validate, checkov and trivy."""
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(OVERLAYS.iterdir()):
        if not (path / "kustomization.yaml").is_file():
            continue
        text = kustomize_text(path)
        (out / f"{path.name}.yaml").write_text(text)
        docs = load_docs(text)
        jobs = jobset_templates_as_jobs(docs)
        if jobs:
            (out / f"{path.name}.jobset-jobs.yaml").write_text(
                yaml.safe_dump_all(jobs, sort_keys=False))
        print(out / f"{path.name}.yaml")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: `apply`, `facts` or `lint-render`."""
    p = argparse.ArgumentParser(prog="k8s/submit.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="render an overlay with a spec and kubectl apply it")
    a.add_argument("overlay", help="a folder of k8s/overlays, e.g. gpu-lora")
    a.add_argument("--job", default="", help="job spec file (default: the overlay's example)")
    a.add_argument("--registry", default="", help="image registry, e.g. REGION-docker.pkg.dev/P/R")
    a.add_argument("--tag", default="", help="image tag")
    a.add_argument("--digest", default="", help="image digest sha256:... (wins over --tag)")
    a.add_argument("--nodes", type=int, default=None, help="multinode: number of nodes")
    a.add_argument("--gcp-sa", default="", help="GKE Workload Identity service account email")
    a.add_argument("--aws-role-arn", default="", help="EKS IRSA role ARN")
    a.add_argument("--context", default="", help="kubectl context (default: current)")
    a.add_argument("--out-dir", default=str(REPO / "out" / "k8s"), help="where renders go")
    a.add_argument("--dry-run", action="store_true", help="print, don't apply")
    a.set_defaults(func=cmd_apply)
    f = sub.add_parser("facts", help="KEY=value facts of a spec for the TPU VM scripts")
    f.add_argument("job")
    f.set_defaults(func=cmd_facts)
    lr = sub.add_parser("lint-render", help="render every overlay for the linters")
    lr.add_argument("out")
    lr.set_defaults(func=cmd_lint_render)
    args = p.parse_args(argv)
    if getattr(args, "nodes", None) is not None and args.nodes < 1:
        p.error("--nodes must be at least 1")
    try:
        return args.func(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
