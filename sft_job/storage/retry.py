"""Bounded retries with jittered exponential backoff, and the transfer-then-verify loop.

The S3 and GCS clients retry throttling, 5xx and dropped connections themselves (botocore
`standard` retry mode, google.api_core `Retry`); this module covers what they do not: a
checksum mismatch after a transfer, and the Hub client's calls.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sft_job.storage.checksum import ChecksumError

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

VERIFY_ATTEMPTS = 3  # transfers of one file whose checksum mismatched before we give up


def max_attempts() -> int:
    """Attempts per S3 or Hub request on throttling/5xx/connection errors: env
    SFT_JOB_STORAGE_MAX_ATTEMPTS, else AWS_MAX_ATTEMPTS, else 8."""
    return int(os.environ.get("SFT_JOB_STORAGE_MAX_ATTEMPTS")
               or os.environ.get("AWS_MAX_ATTEMPTS") or "8")


def retry_timeout() -> float:
    """Seconds a GCS call keeps retrying (env SFT_JOB_STORAGE_RETRY_TIMEOUT, 120)."""
    return float(os.environ.get("SFT_JOB_STORAGE_RETRY_TIMEOUT", "120"))


def backoff(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Full-jitter exponential backoff for attempt 1, 2, ... in seconds."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def call(fn: Callable[[], T], transient: Callable[[BaseException], bool],
         attempts: int | None = None, what: str = "") -> T:
    """Call `fn`, retrying up to `attempts` times in all while `transient(error)` is true."""
    attempts = attempts or max_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not transient(err):
                raise
            delay = backoff(attempt)
            log.warning("%s: %s (attempt %d/%d), retrying in %.1fs",
                        what, type(err).__name__, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def transfer_verified(items: list[Item], transfer: Callable[[list[Item]], None],
                      verify: Callable[[Item], None], name: Callable[[Item], str],
                      workers: int = 4) -> None:
    """Transfer `items` (a batch call), verify each in parallel, re-transfer the mismatched ones.

    `verify` raises ChecksumError on a mismatch; after VERIFY_ATTEMPTS transfers the last
    mismatch is raised. Other errors from `transfer`/`verify` propagate at once.
    """
    pending = items
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        transfer(pending)
        failed = _verify_all(pending, verify, workers)
        if not failed:
            return
        names = ", ".join(name(i) for i, _ in failed[:3])
        if attempt == VERIFY_ATTEMPTS:
            raise ChecksumError(f"{names}: checksum still differs after {attempt} transfers "
                                f"({failed[0][1]}); the store or network is corrupting data")
        log.warning("checksum mismatch on %d file(s) (%s), transferring again", len(failed), names)
        pending = [i for i, _ in failed]


def _verify_all(items: Iterable[Item], verify: Callable[[Item], None],
                workers: int) -> list[tuple[Item, ChecksumError]]:
    def one(item: Item) -> tuple[Item, ChecksumError] | None:
        try:
            verify(item)
        except ChecksumError as err:
            return item, err
        return None

    items = list(items)
    if len(items) <= 1:
        results = [one(i) for i in items]
    else:
        with ThreadPoolExecutor(min(workers, len(items))) as pool:
            results = list(pool.map(one, items))
    return [r for r in results if r is not None]
