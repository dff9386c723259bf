"""Storage failures become one clear line and the right exit code: 3 for missing buckets,
denied access and absent credentials, 75 for outages; no secret is ever printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import AccessError, TransientError
from sft_job.storage import join
from tests.servers import fault_proxy, free_port, use_env

SECRET = "sekrit-Zq8v-do-not-print"


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_missing_bucket(kind: str, request: pytest.FixtureRequest, small: Path,
                        tmp_path: Path) -> None:
    request.getfixturevalue(f"{kind}_bucket")  # env pointed at the server
    uri = f"{kind}://no-such-bucket-x1/run"
    for action in (lambda: storage.list_keys(uri), lambda: storage.put_dir(small, uri),
                   lambda: storage.get(join(uri, "a.json"), tmp_path / "a"),
                   lambda: storage.read_text(join(uri, "job.yaml")),
                   lambda: storage.probe(uri, write=True)):
        with pytest.raises(AccessError, match="bucket 'no-such-bucket-x1' does not exist"):
            action()


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_denied_is_access_error(kind: str, request: pytest.FixtureRequest,
                                monkeypatch: pytest.MonkeyPatch, small: Path) -> None:
    uri = request.getfixturevalue(f"{kind}_bucket")
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[kind])
    with fault_proxy(server.url) as proxy:
        use_env(monkeypatch, proxy.env_for(server))
        proxy.match = r"^(DELETE|PUT|POST) "  # not the GCS client's background bucket GETs
        proxy.fail_next(1, "deny")
        with pytest.raises(AccessError, match="access denied") as err:
            storage.put_dir(small, join(uri, "out"))
    assert err.value.exit_code == 3
    assert "storage.objectAdmin" in str(err.value) or "s3:PutObject" in str(err.value)


def test_no_aws_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                            tmp_path: Path) -> None:
    use_env(monkeypatch, {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                          "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
                          "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                          "AWS_CONFIG_FILE": str(tmp_path / "none"),
                          "AWS_WEB_IDENTITY_TOKEN_FILE": None,
                          "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
                          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
                          "AWS_EC2_METADATA_DISABLED": "true"})
    with pytest.raises(AccessError, match="no usable AWS credentials"):
        storage.probe(join(s3_bucket, "data"))
    with pytest.raises(AccessError, match="no usable AWS credentials"):
        storage.list_keys(s3_bucket)


def test_no_google_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_env(monkeypatch, {"STORAGE_EMULATOR_HOST": None,
                          "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing-key.json")})
    with pytest.raises(AccessError, match="no usable Google credentials"):
        storage.probe("gs://some-bucket/data")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if k != "SFT_JOB_DEBUG"}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "sft_job", *args], env=full,
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_bucket_exits_3_with_one_line(s3: Any) -> None:
    env = {**s3.env, "AWS_SECRET_ACCESS_KEY": SECRET}
    r = _cli(["validate", "s3://no-such-bucket-x2/jobs/job.yaml"], env)
    assert r.returncode == 3, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == ["error: s3://no-such-bucket-x2/jobs/job.yaml: bucket 'no-such-bucket-x2' "
                     "does not exist; create it or fix the URI (and the endpoint/region)"]
    assert SECRET not in r.stdout + r.stderr


def test_cli_unreachable_endpoint_exits_75(s3: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**s3.env, "AWS_ENDPOINT_URL_S3": dead, "AWS_SECRET_ACCESS_KEY": SECRET,
           "SFT_JOB_STORAGE_MAX_ATTEMPTS": "2"}
    r = _cli(["validate", "s3://bucket/jobs/job.yaml"], env)
    assert r.returncode == 75, r.stderr
    assert "cannot reach S3" in r.stderr and "s3://bucket/jobs/job.yaml" in r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_output_endpoint_reaches_child_processes(s3: Any, s3_bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`output.s3_endpoint_url` is exported as boto3's own AWS_ENDPOINT_URL_S3 at job start:
    it wins over a wrong one in the environment, here and in a process started afterwards
    (the checkpoint uploader is spawned the same way, and inherits the environment)."""
    use_env(monkeypatch, {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",
                          "SFT_JOB_STORAGE_MAX_ATTEMPTS": "1"})
    with pytest.raises(TransientError, match="cannot reach S3"):
        storage.list_keys(s3_bucket)
    storage.export_s3_endpoint(s3.url)
    storage.write_text(join(s3_bucket, "a.txt"), "x")
    code = f"from sft_job import storage; print(storage.read_text({join(s3_bucket, 'a.txt')!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "x", r.stderr
