"""The run lease (checkpoint/lease.py) and its compare-and-swap (storage/conditional.py), on a
local folder, moto's S3 server and the GCS emulator.

The conditions themselves (a second create and a stale replace lose) are checked on the local
filesystem (O_EXCL, flock) and S3 (If-None-Match / If-Match, which moto implements); the GCS
emulator ignores ifGenerationMatch, so on gs:// only the lease's sequential behaviour (read,
then write) is checked here, not the race itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sft_job.checkpoint import lease
from sft_job.errors import OutputInUse, SpecError
from sft_job.spec import JobSpec
from sft_job.storage import conditional, join

TIMEOUT = 10  # the smallest lease_timeout_seconds: a heartbeat every 2.5 s


def spec(out: str, name: str = "job-a", lr: float = 1e-4) -> JobSpec:
    return JobSpec.model_validate({
        "name": name, "model": {"base": "builtin:tiny-llama"}, "data": {"train": "x.jsonl"},
        "train": {"learning_rate": lr},
        "output": {"uri": out, "lease_timeout_seconds": TIMEOUT}})


def record(out: str, **fields: object) -> None:
    base = {"owner": "someone-else", "job": "other", "run_hash": "0" * 16, "host": "elsewhere",
            "pid": 1, "started": "2026-01-01T00:00:00Z", "heartbeat": time.time()}
    assert conditional.put_if(join(out, lease.LEASE), json.dumps({**base, **fields}).encode(),
                              None)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_compare_and_swap(backend: str, request: pytest.FixtureRequest, tmp_path) -> None:
    out = str(tmp_path / "out") if backend == "file" else request.getfixturevalue("s3_bucket")
    uri = join(out, "obj")
    first = conditional.put_if(uri, b"one", None)
    assert first and conditional.put_if(uri, b"two", None) is None  # exists: create loses
    second = conditional.put_if(uri, b"three", first)
    assert second and conditional.put_if(uri, b"four", first) is None  # stale tag loses
    assert conditional.read_tagged(uri) == (b"three", second)
    assert not conditional.delete_if(uri, first)
    assert conditional.delete_if(uri, second) and conditional.read_tagged(uri) is None


def test_no_compare_and_swap_on_the_hub() -> None:
    """The Hub has no conditional writes: a clear SpecError (exit 2), not a KeyError."""
    for call in (lambda u: conditional.read_tagged(u), lambda u: conditional.put_if(u, b"x", None),
                 lambda u: conditional.delete_if(u, "t")):
        with pytest.raises(SpecError, match=r"^hf://org/name/_LEASE: conditional writes need "
                                            r"a local path, s3:// or gs://$") as err:
            call("hf://org/name/_LEASE")
        assert err.value.exit_code == 2


def test_lease_excludes_another_job_and_is_released(root: str) -> None:
    with lease.scope():
        held = lease.acquire(spec(root))
        body = json.loads(conditional.read_tagged(join(root, lease.LEASE))[0])
        assert body["owner"] == held.record["owner"] and body["pid"] == os.getpid()
        with pytest.raises(OutputInUse) as ei:
            lease.acquire(spec(root, name="job-b"))
        assert ei.value.exit_code == 2
        assert "in use by another run: job 'job-a'" in str(ei.value)
        assert socket.gethostname() in str(ei.value)
    assert conditional.read_tagged(join(root, lease.LEASE)) is None
    with lease.scope():
        lease.acquire(spec(root, name="job-b"))  # free again


def test_stale_lease_is_taken_over(root: str, caplog: pytest.LogCaptureFixture) -> None:
    record(root, heartbeat=time.time() - 10 * TIMEOUT)
    with lease.scope():
        held = lease.acquire(spec(root, name="job-b"))
        assert json.loads(conditional.read_tagged(join(root, lease.LEASE))[0])["owner"] == \
            held.record["owner"]
    assert "took over the abandoned lease" in caplog.text


def test_lease_of_a_dead_process_here_is_taken_over_at_once(tmp_path) -> None:
    out = str(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    record(out, host=socket.gethostname(), pid=int(dead.stdout))  # fresh heartbeat
    t0 = time.monotonic()
    with lease.scope():
        lease.acquire(spec(out))
    assert time.monotonic() - t0 < 2


def test_rerun_of_the_same_job_waits_for_the_old_lease(tmp_path) -> None:
    out = str(tmp_path / "out")
    mine = spec(out)
    record(out, run_hash=mine.run_hash(), heartbeat=time.time() - TIMEOUT + 2)
    t0 = time.monotonic()
    with lease.scope():
        lease.acquire(mine)  # a pod restarted after its node died: waits ~2 s, then takes it
    assert 1.5 < time.monotonic() - t0 < 10


def test_heartbeat_renews_and_notices_a_takeover(tmp_path) -> None:
    out = str(tmp_path / "out")
    uri = join(out, lease.LEASE)
    with lease.scope():
        held = lease.acquire(spec(out))
        first = json.loads(conditional.read_tagged(uri)[0])["heartbeat"]
        time.sleep(TIMEOUT / 4 + 1)
        assert json.loads(conditional.read_tagged(uri)[0])["heartbeat"] > first
        lease.check()  # still ours
        conditional.put_if(uri, b'{"owner": "thief", "job": "x"}', conditional.read_tagged(uri)[1])
        time.sleep(TIMEOUT / 4 + 1)
        assert held.lost and "job 'x'" in held.lost
        with pytest.raises(OutputInUse, match="lost its lease"):
            lease.check()
    assert conditional.read_tagged(uri)[0].startswith(b'{"owner": "thief"')  # not ours to delete
