"""The run's memory: an append-only JSON Lines log of finished requests, `OUT.synth-journal`.

Line 1 is a header (the generation's fingerprint: model, topics, template, system message);
each further line is one finished request: its topic, number, the pairs parsed from the answer
and the parse rejects. Everything else (what to keep, how many rows each topic still needs) is
recomputed by replaying it, so a rerun continues where the last one stopped and never asks
twice for a finished request. The suffix `.synth-journal` is not a data suffix, so a data
prefix holding both files still reads as one data file.

Local output: the journal sits next to it and every line is flushed and fsynced as it is
written. Bucket output: the journal is written under the work dir and uploaded at start (which
also proves the bucket is writable before any request is paid for), every `checkpoint_seconds`
and on every exit; a rerun on another machine downloads it. A line cut off by a kill is
dropped on the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from sft_job.errors import DataError, SpecError

log = logging.getLogger(__name__)

SUFFIX = ".synth-journal"
VERSION = 1


class Journal:
    def __init__(self, out_uri: str, workdir: Path, checkpoint_seconds: float = 30.0) -> None:
        from sft_job.uri import is_remote, split_uri

        self.uri = out_uri + SUFFIX
        self.out_uri = out_uri
        self.remote = is_remote(out_uri)
        if self.remote:
            self.dir = workdir / "synth" / hashlib.sha256(out_uri.encode()).hexdigest()[:16]
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / "journal.jsonl"
        else:
            self.path = Path(split_uri(self.uri)[2])
        self.checkpoint_seconds = checkpoint_seconds
        self._last_upload = 0.0
        self._upload_lock = threading.Lock()  # one upload at a time (workers call from threads)
        self._file: Any = None

    def open(self, fingerprint: dict[str, Any], restart: bool = False) -> list[dict[str, Any]]:
        """Start or resume: the finished-request entries so far (none on a fresh start)."""
        lines = [] if restart else self._best_copy()
        if not lines:
            self._refuse_foreign_output(restart)
            lines = [{"kind": "header", "version": VERSION, "fingerprint": fingerprint,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        else:
            self._check_header(lines[0], fingerprint)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                       encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self.checkpoint(force=True)
        return lines[1:]

    def append(self, entry: dict[str, Any]) -> None:
        """Record one finished request durably (flushed and fsynced)."""
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def due(self) -> bool:
        return self.remote and time.monotonic() - self._last_upload >= self.checkpoint_seconds

    def checkpoint(self, force: bool = False) -> None:
        """Upload a snapshot of the journal (bucket output only) if forced or due; a call that
        is not forced returns at once while another upload runs."""
        if not self.remote or not (force or self.due()):
            return
        if not self._upload_lock.acquire(blocking=force):
            return
        try:
            from sft_job import storage

            self._last_upload = time.monotonic()
            snap = self.dir / "journal.snapshot"
            shutil.copyfile(self.path, snap)  # appends go on while the snapshot uploads
            storage.put_file(snap, self.uri)
        finally:
            self._upload_lock.release()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _best_copy(self) -> list[dict[str, Any]]:
        """The longest of the local and the uploaded journal (same run, one is a prefix)."""
        local = _read(self.path) if self.path.is_file() else []
        if not self.remote:
            return local
        from sft_job import storage

        if not storage.exists(self.uri):
            return local
        dl = self.dir / "journal.download"
        storage.get(self.uri, dl)
        uploaded = _read(dl)
        if local and uploaded and local[0] != uploaded[0]:
            log.warning("the local journal %s belongs to another run; using %s", self.path, self.uri)
            return uploaded
        return local if len(local) >= len(uploaded) else uploaded

    def _check_header(self, header: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        if header.get("kind") != "header" or header.get("version") != VERSION:
            raise DataError(f"{self.uri}: not a synth journal of this version; "
                            "pass --restart to start over")
        old = header.get("fingerprint", {})
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed:
            raise SpecError(f"{self.uri} was written with a different {', '.join(changed)}; "
                            "rerun with the same settings to continue, or pass --restart to "
                            "discard it and start over")

    def _refuse_foreign_output(self, restart: bool) -> None:
        from sft_job import storage

        if not restart and storage.exists(self.out_uri):
            raise SpecError(f"{self.out_uri} exists but has no {SUFFIX} next to it, so it was not "
                            "made by `data synth`; choose another --out, or pass --restart to "
                            "overwrite it")


def _read(path: Path) -> list[dict[str, Any]]:
    """Parse a journal file; a cut-off last line is dropped, damage elsewhere is an error."""
    raw = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(raw):
                log.warning("%s: dropping the cut-off last line %d", path, i)
                break
            raise DataError(f"{path}:{i}: the journal is damaged (invalid JSON); "
                            "pass --restart to start over") from None
    return out
