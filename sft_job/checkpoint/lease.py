"""A run owns its output: the lease object `output.uri/_LEASE`.

    {"owner": "<uuid>", "job": ..., "run_hash": ..., "host": ..., "pid": ..., "heartbeat": <unix s>}

Taken (rank 0, after the cheap checks, before anything is written to output.uri) with the
store's conditional create (storage/conditional.py), renewed by a heartbeat thread every quarter
of `output.lease_timeout_seconds`, deleted when the run ends, however it ends. Another run finding
a fresh lease stops at once with exit 2 naming the owner; a rerun of the same job (same spec
hash: a pod restarted after its node died) waits for the old lease to end or expire instead. A
lease is abandoned when its heartbeat is older than the timeout, when it has not changed for
that long while watched (clocks may disagree), or when its owner was a process of this host
that no longer exists; an abandoned lease is taken over with a conditional replace, so two
runs taking it over at once cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.errors import OutputInUse, SftJobError
from sft_job.spec import JobSpec
from sft_job.storage import conditional
from sft_job.uri import is_remote, split_uri

log = logging.getLogger(__name__)

LEASE = "_LEASE"
_held: list[Lease] = []  # the lease this process holds (rank 0 of a run), for release/check
_WORK_LOCKS: list[Any] = []  # open lock files of work folders, held for the process's life


class Lease:
    """A held lease: its object, our record, the tag of our last write, the heartbeat thread."""

    def __init__(self, uri: str, record: dict[str, Any], tag: str, timeout: float) -> None:
        self.uri, self.record, self.tag, self.timeout = uri, record, tag, timeout
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                self.record["heartbeat"] = time.time()
                new = conditional.put_if(self.uri, _body(self.record), self.tag)
                if new is None:
                    cur = conditional.read_tagged(self.uri)
                    other = _parse(cur[0]) if cur else None
                    if other and other.get("owner") == self.record["owner"]:  # our retried write
                        self.tag = cur[1]  # type: ignore[index]
                        continue
                    self.lost = describe(other) if other else "nobody (it was deleted)"
                    log.error("lost the lease on %s to %s", self.uri, self.lost)
                    return
                self.tag = new
            except SftJobError as e:  # a storage hiccup: the next beat tries again
                log.warning("lease heartbeat failed (%s); retrying", e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.lost is None:
            try:
                conditional.delete_if(self.uri, self.tag)
            except SftJobError as e:
                log.warning("could not delete the lease %s (%s); it expires after %.0fs",
                            self.uri, e, self.timeout)
        for d in self.record.get("_created", []):  # folders made for it, if still empty
            with contextlib.suppress(OSError):
                Path(d).rmdir()


def _body(record: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in record.items() if not k.startswith("_")},
                      indent=1).encode()


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("owner"), str) else None


def describe(rec: dict[str, Any]) -> str:
    """The owner of a lease record, for messages."""
    return (f"job '{rec.get('job')}' (spec hash {rec.get('run_hash')}) on host "
            f"{rec.get('host')}, pid {rec.get('pid')}, started {rec.get('started')}")


def _dead_here(rec: dict[str, Any]) -> bool:
    """The owner was a process of this host that is gone."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def acquire(spec: JobSpec) -> Lease:
    """Take the lease on spec.output.uri (see the module docstring); OutputInUse (exit 2)."""
    uri = storage.join(spec.output.uri, LEASE)
    timeout = float(spec.output.lease_timeout_seconds)
    me = {"owner": uuid.uuid4().hex, "job": spec.name, "run_hash": spec.run_hash(),
          "host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "heartbeat": time.time(), "timeout_s": timeout, "_created": _missing_dirs(uri)}
    waited_for = None
    seen_tag, seen_at = None, time.monotonic()
    deadline = time.monotonic() + timeout * 1.25
    while True:
        cur = conditional.read_tagged(uri)
        if cur is None or _abandoned(cur, seen_tag, seen_at, timeout, me):
            tag = conditional.put_if(uri, _body(me), cur[1] if cur else None)
            if tag is None:
                continue  # another run wrote first: look again
            if cur is not None:
                log.warning("took over the abandoned lease on %s (%s)", spec.output.uri,
                            describe(_parse(cur[0]) or {}))
            lease = Lease(uri, me, tag, timeout)
            _held.append(lease)
            return lease
        other = _parse(cur[0])
        if cur[1] != seen_tag:
            seen_tag, seen_at = cur[1], time.monotonic()
        if other is not None and other.get("owner") == me["owner"]:
            continue  # our own create, retried by the client after it had succeeded
        same_job = other is None or other.get("run_hash") == me["run_hash"]
        if same_job and time.monotonic() < deadline:
            if waited_for != cur[1]:
                log.info("output %s is leased by %s: waiting for that run to end or its lease "
                         "to expire (%.0fs)", spec.output.uri,
                         describe(other) if other else "an unreadable lease", timeout)
                waited_for = cur[1]
            time.sleep(min(5.0, timeout / 8))
            continue
        age = time.time() - float(other.get("heartbeat", 0)) if other else float("nan")
        raise OutputInUse(
            f"output.uri: {spec.output.uri} is in use by another run: "
            f"{describe(other) if other else 'an unreadable lease'} (heartbeat {age:.0f}s ago); "
            "wait for it to end or use another output.uri (the lease of a run that died expires "
            f"after output.lease_timeout_seconds={timeout:.0f})")


def _abandoned(cur: tuple[bytes, str], seen_tag: str | None, seen_at: float, timeout: float,
               me: dict[str, Any]) -> bool:
    other = _parse(cur[0])
    unchanged_for = time.monotonic() - seen_at if cur[1] == seen_tag else 0.0
    if other is None:  # unreadable: a lease being written, or garbage left behind
        return unchanged_for > min(10.0, timeout)
    if other.get("owner") == me["owner"]:
        return False
    stale = time.time() - float(other.get("heartbeat") or 0) > timeout
    return stale or unchanged_for > timeout or _dead_here(other)


def _missing_dirs(uri: str) -> list[str]:
    """The local folders the lease's creation will make (deepest first), to remove them again
    when the run leaves nothing else there."""
    if is_remote(uri):
        return []
    out = []
    for p in Path(split_uri(uri)[2]).parents:
        if p.exists():
            break
        out.append(str(p))
    return out


def check() -> None:
    """Raise OutputInUse if this process lost its lease (another run took the output over)."""
    for lease in _held:
        if lease.lost:
            raise OutputInUse(f"output.uri: this run lost its lease on the output to "
                              f"{lease.lost} (its heartbeat stalled past "
                              f"output.lease_timeout_seconds); stopping without writing more")


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Release whatever lease was taken inside, however the block ends."""
    try:
        yield
    finally:
        while _held:
            _held.pop().release()


def workdir(spec: JobSpec, rank: int) -> Path:
    """Local scratch for this job ($SFT_JOB_WORKDIR, else the system temp dir), keyed by the
    job, its spec hash and its output (two outputs never share one), locked per rank: a second
    process of the same job on the same output on this machine stops (exit 2) before touching
    it."""
    from sft_job.storage.cache import job_workdir
    from sft_job.storage.local import os_error

    path = job_workdir(spec.name, spec.run_hash(), spec.output.uri)
    lock = path / f".lock-rank{rank}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        f = lock.open("a+")
    except OSError as e:
        raise os_error(e, f"SFT_JOB_WORKDIR {path}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise OutputInUse(f"output.uri: {spec.output.uri}: this job is already running on this "
                          f"machine (pid {pid}, work folder {path})") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _WORK_LOCKS.append(f)
    return path
