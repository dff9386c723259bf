"""Byte progress bars (tqdm on stderr) for transfers above a few MB; quiet below.

Set TQDM_DISABLE=1 to silence them. Off a terminal (pod logs) the bar is written as a plain
line every 15 s and once at the end.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

MIN_BYTES = 8 << 20


class Progress:
    """A thread-safe byte counter that shows a bar when `total` is at least MIN_BYTES."""

    def __init__(self, total: int, desc: str) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if total >= MIN_BYTES:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, mininterval=0.5 if tty else 15.0,
                             file=sys.stderr if tty else _Lines(), dynamic_ncols=tty,
                             ncols=None if tty else 110)

    def update(self, n: int) -> None:
        """Count `n` more bytes (negative when a client rewinds for a retry)."""
        if self._bar is not None and n:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lines:
    """A stderr for tqdm off a terminal: each refresh becomes one log line, not a '\\r'."""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            sys.stderr.write(s + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


class ProgressReader:
    """A read-only file object that counts the bytes read into a Progress (for GCS uploads),
    rewinding the count when the client seeks back to retry."""

    def __init__(self, fh: Any, progress: Progress) -> None:
        self._fh = fh
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._progress.update(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        before = self._fh.tell()
        pos = self._fh.seek(offset, whence)
        self._progress.update(pos - before)
        return pos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)
