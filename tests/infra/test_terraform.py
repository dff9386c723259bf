"""Terraform: fmt, checkov and trivy on terraform/; the GCP module read with python-hcl2 (and its
locals evaluated by terraform) and checked against k8s/; the AWS module validated with the
provider mirror and applied to a moto server, then read back with boto3 and destroyed.

    .venv/bin/python -m pytest tests/infra/test_terraform.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tf_helpers import (
    BUCKET,
    MIRROR,
    OIDC_ARN,
    REPO,
    TERRAFORM,
    TF_ROOT,
    AwsStack,
    evaluate_gcp_locals,
    load_hcl,
    one,
    terraform,
    tf_env,
    tool,
)
from tf_k8s import GPU_SELECTOR as GPU
from tf_k8s import (
    MACHINES,
    K8sNeeds,
    allocatable,
    expected_ksa,
    expected_tpu,
    k8s_needs,
    pool_for,
    quantity,
)
from tf_k8s import TPU_SELECTOR as TPU

needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed")
GCP_TFVARS = 'project_id = "my-proj-123"\nmaster_authorized_networks = { ci = "10.0.0.0/8" }\n'


# ---------------------------------------------------------------------------------------------
# Formatting and scanners, both modules.

@needs_terraform
def test_terraform_fmt(tmp_path: Path) -> None:
    proc = terraform(["fmt", "-check", "-recursive", "-diff", str(TF_ROOT)], REPO,
                     tf_env(tmp_path), check=False)
    assert proc.returncode == 0, f"run `make tf-fmt`:\n{proc.stdout}"


def test_checkov_passes() -> None:
    checkov = tool("checkov")
    if not checkov:
        pytest.skip("checkov not in .venv-tools: run `make tools`")
    proc = subprocess.run([str(checkov), "--config-file", str(TF_ROOT / ".checkov.yaml"),
                           "-d", str(TF_ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = [int(n) for n in re.findall(r"Passed checks: (\d+)", proc.stdout)]
    assert passed and sum(passed) > 100, proc.stdout  # it really scanned both modules


def test_trivy_passes() -> None:
    trivy = tool("trivy")
    if not trivy:
        pytest.skip("trivy not in .venv-tools: run `make tools`")
    proc = subprocess.run([str(trivy), "config", "--skip-check-update", "--exit-code", "1",
                           "--format", "json", str(TF_ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout).get("Results") or []
    scanned = {r["Target"] for r in results}
    assert {"gcp/main.tf", "aws/main.tf"} <= {t.split("terraform/")[-1] for t in scanned}, scanned


def test_every_skipped_check_is_justified() -> None:
    """A skip without a reason next to it fails: checkov `ID: reason`, trivy a comment above."""
    count = 0
    for path in sorted(TF_ROOT.rglob("*.tf")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "checkov:skip" in line:
                count += 1
                m = re.search(r"checkov:skip=(CKV2?_[A-Z]+_\d+):\s*(.+)", line)
                assert m and len(m.group(2)) >= 30, f"{path}:{i + 1}: skip needs a reason"
            if "trivy:ignore" in line:
                count += 1
                same_line = line.split("trivy:ignore:", 1)[1].split(maxsplit=1)
                reason = same_line[1] if len(same_line) > 1 else lines[i - 1] if i else ""
                assert len(reason.strip("# ")) >= 30, \
                    f"{path}:{i + 1}: trivy:ignore needs a reason on its line or the one above"
    assert count > 0


# ---------------------------------------------------------------------------------------------
# GCP: python-hcl2 for the resources, terraform itself for variables and locals (no provider).

@pytest.fixture(scope="module")
def gcp() -> dict[str, Any]:
    return load_hcl(TF_ROOT / "gcp")


@pytest.fixture(scope="module")
def gcp_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if TERRAFORM is None:
        pytest.skip("terraform is not installed")
    proc, values = evaluate_gcp_locals(tmp_path_factory.mktemp("gcp-locals"), GCP_TFVARS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return values


@pytest.fixture(scope="module")
def needs() -> K8sNeeds | None:
    return k8s_needs()


def test_gcp_cluster_has_workload_identity_and_release_channel(gcp: dict[str, Any]) -> None:
    cluster = gcp["resource"]["google_container_cluster"]["this"]
    assert one(cluster["workload_identity_config"])["workload_pool"] == \
        "${var.project_id}.svc.id.goog"
    assert one(cluster["release_channel"])["channel"] == "${var.release_channel}"
    assert cluster["location"] == "${local.location}"
    assert cluster["remove_default_node_pool"] is True
    assert one(cluster["private_cluster_config"])["enable_private_nodes"] is True
    assert gcp["variable"]["release_channel"]["default"] in ("RAPID", "REGULAR", "STABLE")
    for pool in gcp["resource"]["google_container_node_pool"].values():
        meta = one(one(pool["node_config"])["workload_metadata_config"])
        assert meta["mode"] == "GKE_METADATA"  # pods see Workload Identity, not the node's SA


def test_gcp_accelerator_pools_are_spot_and_scale_from_zero(gcp: dict[str, Any],
                                                            gcp_values: dict[str, Any]) -> None:
    pools = gcp["resource"]["google_container_node_pool"]
    assert set(pools) == {"system", "gpu", "tpu"}
    assert gcp_values["spot"] is True
    for name in ("gpu", "tpu"):
        assert one(pools[name]["node_config"])["spot"] == "${var.spot}", name
        autoscaling = one(pools[name]["autoscaling"])
        assert autoscaling["total_min_node_count"] == 0, name
        assert pools[name]["initial_node_count"] == 0, name
    assert "spot" not in one(pools["system"]["node_config"])  # cluster services stay on-demand


def test_gcp_gpu_pools_install_the_driver(gcp: dict[str, Any]) -> None:
    accel = one(one(gcp["resource"]["google_container_node_pool"]["gpu"]["node_config"])
                ["guest_accelerator"])
    assert accel["type"] == "${each.value.accelerator}"
    assert accel["count"] == "${each.value.accelerator_count}"
    assert one(accel["gpu_driver_installation_config"])["gpu_driver_version"] == "LATEST"


def test_gcp_tpu_pools_match_k8s(gcp: dict[str, Any], gcp_values: dict[str, Any],
                                 needs: K8sNeeds | None) -> None:
    pools = gcp_values["tpu_pools"]
    for shape in expected_tpu(needs):
        match = [name for name, p in pools.items()
                 if p["topology"] == shape["topology"] and p["chips_per_host"] == shape["chips"]]
        assert match, f"no TPU pool for k8s/ shape {shape}: terraform has {pools}"
        pool = pools[match[0]]
        assert pool["machine_type"] == f"ct5lp-hightpu-{shape['chips']}t", (shape, pool)
        assert pool["hosts"] == shape["pods"], f"k8s/ runs {shape['pods']} pods per slice"
        assert pool["multi_host"] is (shape["pods"] > 1)
    # A multi-host pool is placed COMPACT with the slice topology; a single-host one is not.
    tpu = gcp["resource"]["google_container_node_pool"]["tpu"]
    placement = one(tpu["dynamic"])["placement_policy"]
    assert placement["for_each"] == "${each.value.multi_host ? [each.value.topology] : []}"
    assert one(placement["content"]) == {"type": "COMPACT",
                                         "tpu_topology": "${placement_policy.value}"}
    assert one(tpu["node_config"])["machine_type"] == "${each.value.machine_type}"


def test_gcp_pools_fit_the_k8s_pods(gcp_values: dict[str, Any], needs: K8sNeeds | None) -> None:
    """Every accelerator pod template of k8s/ has a pool whose nodes can hold it."""
    if needs is None:
        pytest.skip("k8s/ does not exist yet: nothing to fit")
    accel = [p for p in needs.pods if {TPU, GPU} & set(p.node_selector)]
    assert accel, "k8s/ has no GPU or TPU pod template"
    for pod in accel:
        pool, machine, storage_gib = pool_for(pod, gcp_values)
        assert machine in MACHINES, f"add {machine}'s shape to tf_helpers.MACHINES"
        cpu, mem = allocatable(machine)
        req = {**pod.limits, **pod.requests}
        where = f"{pod.source} on pool {pool} ({machine})"
        assert quantity(req.get("cpu", 0)) <= cpu, f"{where}: cpu {req.get('cpu')} > {cpu:.1f}"
        assert quantity(req.get("memory", 0)) <= mem, f"{where}: memory {req.get('memory')}"
        # Kubelet keeps ~10% for eviction and the system some more: 80% is what pods may use.
        eph = quantity(req.get("ephemeral-storage", 0)) / 2**30
        assert eph <= 0.8 * storage_gib, f"{where}: ephemeral {eph:.0f}Gi on {storage_gib:.0f}GiB"


def test_gcp_workload_identity_matches_k8s_service_account(
        gcp: dict[str, Any], gcp_values: dict[str, Any], needs: K8sNeeds | None) -> None:
    namespace, name = expected_ksa(needs)
    assert gcp_values["workload_identity_member"] == \
        f"serviceAccount:my-proj-123.svc.id.goog[{namespace}/{name}]"
    binding = gcp["resource"]["google_service_account_iam_member"]["job_workload_identity"]
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == "${local.workload_identity_member}"
    assert binding["service_account_id"] == "${google_service_account.job.name}"


def test_gcp_buckets_are_protected(gcp: dict[str, Any]) -> None:
    buckets = gcp["resource"]["google_storage_bucket"]
    assert set(buckets) == {"data", "runs"}
    for name, bucket in buckets.items():
        assert bucket["uniform_bucket_level_access"] is True, name
        assert bucket["public_access_prevention"] == "enforced", name
        assert bucket["force_destroy"] is False, name
        assert one(bucket["versioning"])["enabled"] is True, name
    rules = [(one(r["action"])["type"], one(r["condition"]))
             for r in buckets["runs"]["lifecycle_rule"]]
    conditions = {k for action, cond in rules if action == "Delete" for k in cond}
    # Rotated-out checkpoints (noncurrent versions) and those of finished runs (customTime).
    assert {"days_since_noncurrent_time", "days_since_custom_time"} <= conditions, rules
    assert ("Delete", {"days_since_noncurrent_time": "${var.checkpoint_noncurrent_days}",
                       "with_state": "ARCHIVED"}) in rules
    assert any(action == "AbortIncompleteMultipartUpload" for action, _ in rules)


def test_gcp_job_identity_is_least_privilege(gcp: dict[str, Any]) -> None:
    job = "serviceAccount:${google_service_account.job.email}"
    grants = {(b["bucket"], b["role"]) for b in
              gcp["resource"]["google_storage_bucket_iam_member"].values() if b["member"] == job}
    assert grants == {("${google_storage_bucket.data.name}", "roles/storage.objectViewer"),
                      ("${google_storage_bucket.runs.name}", "roles/storage.objectUser")}
    for rtype, resources in gcp["resource"].items():
        if rtype.startswith(("google_project_iam", "google_artifact_registry_repository_iam")):
            members = [r.get("member", r.get("members")) for r in resources.values()]
            assert job not in members, f"{rtype} grants the job account a wider role"
    (nodes,) = gcp["resource"]["google_project_iam_member"].values()
    assert nodes["role"] == "roles/container.defaultNodeServiceAccount"


@needs_terraform
@pytest.mark.parametrize(("tfvars", "message"), [
    ('tpu_pools = { x = { machine_type = "ct5lp-hightpu-8t", topology = "4x4" } }',
     "does not fit the machine type"),
    ('tpu_pools = { x = { machine_type = "ct5lp-hightpu-4t", topology = "4x4", max_slices = 2 } }',
     "multi-host pool asks for max_slices"),
    ('tpu_pools = { x = { machine_type = "ct5lp-hightpu-4t", topology = "3x3" } }',
     "v5e topologies"),
    ('gpu_pools = { x = { machine_type = "a2-highgpu-1g", accelerator = "nvidia-l4", '
     'accelerator_count = 1 } }', "matching machine_type"),
    ('master_authorized_networks = { all = "0.0.0.0/0" }', "0.0.0.0/0 is refused"),
    ('location_type = "global"', "zonal or regional"),
])
def test_gcp_variables_reject_bad_shapes(tmp_path: Path, tfvars: str, message: str) -> None:
    base = GCP_TFVARS if "master_authorized" not in tfvars else 'project_id = "my-proj-123"\n'
    proc, _ = evaluate_gcp_locals(tmp_path, base + tfvars + "\n")
    assert proc.returncode != 0
    assert message in " ".join((proc.stdout + proc.stderr).split()), proc.stderr


def test_gcp_cluster_is_zonal_by_default(gcp_values: dict[str, Any]) -> None:
    assert gcp_values["location"] == "us-central1-a"


@needs_terraform
def test_gcp_regional_cluster_and_multi_slice_pools(tmp_path: Path) -> None:
    proc, values = evaluate_gcp_locals(tmp_path, GCP_TFVARS + 'location_type = "regional"\n' + (
        'tpu_pools = {\n  a = { machine_type = "ct5lp-hightpu-8t", topology = "2x4", max_slices = 3 }\n'
        '  b = { machine_type = "ct5lp-hightpu-4t", topology = "8x8" }\n}\n'))
    assert proc.returncode == 0, proc.stderr
    assert values["location"] == "us-central1"
    assert values["tpu_pools"]["a"] | {"disk_size_gb": 0} == {
        "machine_type": "ct5lp-hightpu-8t", "topology": "2x4", "chips_per_host": 8, "hosts": 1,
        "multi_host": False, "max_nodes": 3, "disk_size_gb": 0}
    assert (values["tpu_pools"]["b"]["hosts"], values["tpu_pools"]["b"]["max_nodes"]) == (16, 16)


def test_outputs_feed_the_cluster_settings(gcp: dict[str, Any]) -> None:
    """`make tf-settings` writes the `settings` output; its keys are those make submit-* reads."""
    gcp_keys = set(gcp["output"]["settings"]["value"])
    aws_keys = set(load_hcl(TF_ROOT / "aws")["output"]["settings"]["value"])
    assert {"PROJECT", "ZONE", "GKE_CLUSTER", "KUBE_CONTEXT", "REGISTRY", "GCP_SA"} <= gcp_keys
    assert {"REGISTRY", "AWS_ROLE_ARN", "DATA_BUCKET", "RUNS_BUCKET"} <= aws_keys
    cluster_env = REPO / "cluster.env"
    if cluster_env.exists():  # the settings file of mk/cluster.mk: the keys must be its keys
        known = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", cluster_env.read_text(), re.M))
        informational = {"DATA_BUCKET", "RUNS_BUCKET"}
        assert (gcp_keys | aws_keys) - informational <= known, (gcp_keys | aws_keys) - known


def test_settings_merge_keeps_user_lines() -> None:
    spec = importlib.util.spec_from_file_location("tf_settings", TF_ROOT / "settings.py")
    assert spec and spec.loader
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    old = "# mine\nTAG=v1\nREGISTRY=old\n"
    new = settings.merge(old, {"REGISTRY": "r/x", "GCP_SA": "a@b"})
    assert new.splitlines()[:2] == ["# mine", "TAG=v1"]
    assert "REGISTRY=r/x" in new and "REGISTRY=old" not in new and "GCP_SA=a@b" in new
    assert settings.merge(new, {"REGISTRY": "r/y"}).count("REGISTRY=") == 1
    with pytest.raises(ValueError):
        settings.merge("", {"REGISTRY": "has space"})


# ---------------------------------------------------------------------------------------------
# AWS: validate with the provider mirror, then apply to moto, read back, destroy.

_no_mirror = f"no AWS provider mirror at {MIRROR} (see /work/shared/NOTES.md)"


@pytest.fixture(scope="module", autouse=True)
def _aws_stack_started(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Start the moto apply as soon as this module starts, if a selected test needs it."""
    wanted = any({"aws_stack", "aws_started"} & set(item.fixturenames)
                 and item.module is request.module for item in request.session.items)
    if not wanted or TERRAFORM is None or not MIRROR.is_dir():
        yield None
        return
    stack = AwsStack(tmp_path_factory.mktemp("tf-aws"))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def aws_stack(aws_started: AwsStack) -> AwsStack:
    """The stack once applied."""
    if aws_started.destroyed:
        pytest.fail("the moto stack was already destroyed (test order changed?)")
    aws_started.wait()
    return aws_started


@pytest.fixture
def aws_started(_aws_stack_started: AwsStack | None) -> AwsStack:
    """The stack whose init/validate/apply runs in the background (not waited for)."""
    if TERRAFORM is None:
        pytest.skip("terraform is not installed")
    if not MIRROR.is_dir():
        pytest.skip(_no_mirror)
    assert _aws_stack_started is not None
    return _aws_stack_started


def test_aws_init_and_validate(aws_started: AwsStack) -> None:
    """`terraform init -backend=false` from the provider mirror, then `terraform validate`
    (the stack's own steps, run before its apply)."""
    aws_started.wait("validate")
    assert "The configuration is valid" in aws_started.logs["validate"].stdout
    assert "hashicorp/aws v5.100.0" in aws_started.logs["init"].stdout


def test_aws_bucket_as_declared(aws_stack: AwsStack) -> None:
    s3 = aws_stack.client("s3")
    key_arn = aws_stack.outputs["kms_key_arn"]
    (rule,) = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms",
                                                          "KMSMasterKeyID": key_arn}
    assert rule["BucketKeyEnabled"] is True
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
    assert block == dict.fromkeys(("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                                   "RestrictPublicBuckets"), True)
    controls = s3.get_bucket_ownership_controls(Bucket=BUCKET)["OwnershipControls"]["Rules"]
    assert controls == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    assert set(rules) == {"abort-incomplete-uploads", "expire-noncurrent-versions",
                          "expire-old-checkpoints"}
    assert all(r["Status"] == "Enabled" for r in rules.values())
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"] == \
        {"DaysAfterInitiation": 1}
    assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"] == \
        {"NoncurrentDays": 7}
    assert rules["expire-old-checkpoints"]["Filter"] == \
        {"Tag": {"Key": "sft-job-kind", "Value": "checkpoint"}}
    assert rules["expire-old-checkpoints"]["Expiration"] == {"Days": 30}
    (deny,) = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])["Statement"]
    assert deny["Effect"] == "Deny" and deny["Action"] == "s3:*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def _role_policy(aws_stack: AwsStack) -> dict[str, Any]:
    iam = aws_stack.client("iam")
    (attached,) = iam.list_attached_role_policies(RoleName="sft-job-job")["AttachedPolicies"]
    version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
    doc = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)
    document = doc["PolicyVersion"]["Document"]
    return json.loads(document) if isinstance(document, str) else document


def test_aws_irsa_role_as_declared(aws_stack: AwsStack, needs: K8sNeeds | None) -> None:
    namespace, name = expected_ksa(needs)
    iam = aws_stack.client("iam")
    role = iam.get_role(RoleName="sft-job-job")["Role"]
    assert role["Arn"] == aws_stack.outputs["role_arn"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    (stmt,) = trust["Statement"]
    issuer = OIDC_ARN.split("oidc-provider/")[1]
    assert stmt["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert stmt["Principal"] == {"Federated": OIDC_ARN}
    assert stmt["Condition"] == {"StringEquals": {
        f"{issuer}:sub": f"system:serviceaccount:{namespace}:{name}",
        f"{issuer}:aud": "sts.amazonaws.com"}}
    statements = {s["Sid"]: s for s in _role_policy(aws_stack)["Statement"]}
    arn = f"arn:aws:s3:::{BUCKET}"
    as_set = lambda v: {v} if isinstance(v, str) else set(v)  # noqa: E731
    assert {k: (as_set(s["Action"]), as_set(s["Resource"])) for k, s in statements.items()} == {
        "ListBucket": ({"s3:ListBucket"}, {arn}),
        "ReadData": ({"s3:GetObject"}, {f"{arn}/data/*"}),
        "ReadWriteRuns": ({"s3:GetObject", "s3:PutObject", "s3:PutObjectTagging",
                           "s3:DeleteObject", "s3:AbortMultipartUpload",
                           "s3:ListMultipartUploadParts"}, {f"{arn}/runs/*"}),
        "UseBucketKey": ({"kms:Decrypt", "kms:GenerateDataKey"},
                         {aws_stack.outputs["kms_key_arn"]}),
    }
    assert all(s["Effect"] == "Allow" for s in statements.values())


def test_aws_irsa_policy_is_enforced(aws_stack: AwsStack) -> None:
    """With moto checking IAM, the pods' role reads data/, writes runs/, and nothing else."""
    s3 = aws_stack.client("s3")
    # moto ignores Condition blocks in bucket policies, so the TLS-only Deny (read back above)
    # denies every object request on this plain-HTTP endpoint: remove it to test the role alone.
    s3.delete_bucket_policy(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=b"{}\n")
    creds = aws_stack.client("sts").assume_role_with_web_identity(
        RoleArn=aws_stack.outputs["role_arn"], RoleSessionName="pod",
        WebIdentityToken="service-account-token")["Credentials"]
    pod = aws_stack.client("s3", aws_access_key_id=creds["AccessKeyId"],
                           aws_secret_access_key=creds["SecretAccessKey"],
                           aws_session_token=creds["SessionToken"])
    aws_stack.set_auth(True)
    try:
        assert pod.get_object(Bucket=BUCKET, Key="data/train.jsonl")["Body"].read() == b"{}\n"
        pod.put_object(Bucket=BUCKET, Key="runs/r1/checkpoints/step-1/x", Body=b"1",
                       Tagging="sft-job-kind=checkpoint")
        assert pod.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["KeyCount"] == 1
        pod.delete_object(Bucket=BUCKET, Key="runs/r1/checkpoints/step-1/x")
        for denied in (lambda: pod.put_object(Bucket=BUCKET, Key="data/x", Body=b"1"),
                       lambda: pod.delete_object(Bucket=BUCKET, Key="data/train.jsonl"),
                       lambda: pod.put_object(Bucket=BUCKET, Key="elsewhere", Body=b"1"),
                       lambda: pod.delete_bucket(Bucket=BUCKET),
                       lambda: pod.put_bucket_policy(Bucket=BUCKET, Policy="{}")):
            with pytest.raises(Exception, match=r"AccessDenied|Forbidden|403"):
                denied()
    finally:
        aws_stack.set_auth(False)
        # Empty the bucket here: moto 5.2.5 fails ('FakeDeleteMarker' object has no attribute
        # 'dispose') when the provider's force_destroy removes a delete marker one by one.
        listing = s3.list_object_versions(Bucket=BUCKET)
        versions = listing.get("Versions", []) + listing.get("DeleteMarkers", [])
        if versions:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [
                {"Key": v["Key"], "VersionId": v["VersionId"]} for v in versions]})


def test_aws_registry_and_outputs(aws_stack: AwsStack) -> None:
    ecr = aws_stack.client("ecr")
    repos = {r["repositoryName"]: r for r in ecr.describe_repositories()["repositories"]}
    assert {"sft-job/sft-job-cuda", "sft-job/sft-job-cpu"} <= set(repos)
    for name in ("sft-job/sft-job-cuda", "sft-job/sft-job-cpu"):
        repo = repos[name]
        assert repo["imageTagMutability"] == "IMMUTABLE"
        assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repo["encryptionConfiguration"] == {
            "encryptionType": "KMS", "kmsKey": aws_stack.outputs["kms_key_arn"]}
        rules = json.loads(ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
        assert len(rules["rules"]) == 2
    registry = aws_stack.outputs["registry"]
    assert registry == "123456789012.dkr.ecr.us-east-1.amazonaws.com/sft-job"
    assert aws_stack.outputs["settings"] == {
        "REGISTRY": registry, "AWS_ROLE_ARN": aws_stack.outputs["role_arn"],
        "DATA_BUCKET": f"s3://{BUCKET}/data/", "RUNS_BUCKET": f"s3://{BUCKET}/runs/"}


def test_aws_outputs_reach_make(aws_stack: AwsStack, tmp_path: Path) -> None:
    """What `make tf-settings` does (terraform output | settings.py), then make reads the file
    as mk/cluster.mk does for `make submit-*`."""
    out = terraform(["output", "-json", "settings"], aws_stack.work, aws_stack.env).stdout
    settings_file = tmp_path / "cluster.local.env"
    settings_file.write_text("TAG=mine\n")
    subprocess.run(["python3", str(TF_ROOT / "settings.py"), str(settings_file)], input=out,
                   text=True, check=True, capture_output=True)
    probe = "_tf_probe: ; @echo $(REGISTRY) $(AWS_ROLE_ARN) $(TAG)"
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "--eval", probe, "_tf_probe",
                           f"CLUSTER_SETTINGS={settings_file}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [aws_stack.outputs["registry"], aws_stack.outputs["role_arn"],
                                   "mine"]


def test_aws_destroy_removes_everything(aws_stack: AwsStack) -> None:
    proc = aws_stack.destroy()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert "Destroy complete! Resources: 16 destroyed." in proc.stdout
    assert BUCKET not in [b["Name"] for b in aws_stack.client("s3").list_buckets()["Buckets"]]
    assert not [r for r in aws_stack.client("iam").list_roles()["Roles"]
                if r["RoleName"] == "sft-job-job"]
    assert not aws_stack.client("ecr").describe_repositories()["repositories"]
