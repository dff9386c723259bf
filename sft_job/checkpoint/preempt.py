"""SIGTERM/SIGINT -> a flag the trainer checks at each step boundary.

The first signal only sets the flag: the current optimizer step finishes, a checkpoint is saved,
uploaded and committed, and the job exits 75. A second signal exits at once with 75; whatever
upload was in flight never gets its commit marker, so no reader ever takes it for a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sft_job.errors import EXIT_RETRY

log = logging.getLogger(__name__)


@dataclass
class StopFlag:
    """Set by the signal handler; `at` is when (monotonic), for the stop budget."""

    requested: bool = False
    at: float | None = None
    signame: str = ""

    def seconds_since(self) -> float:
        return 0.0 if self.at is None else time.monotonic() - self.at


@contextmanager
def watch() -> Iterator[StopFlag]:
    """Install the handlers for the duration of training (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if flag.requested:
            log.error("second %s: exiting now without waiting for the checkpoint upload "
                      "(an unfinished upload is never marked committed)", name)
            os._exit(EXIT_RETRY)
        flag.requested, flag.at, flag.signame = True, time.monotonic(), name
        log.warning("%s received: before training, exit 75 now; during training, finish the "
                    "step, checkpoint, upload, exit 75; once training is done, the finish "
                    "completes (exit 0)", name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def agree(flag: bool) -> bool:
    """True on every rank if any rank wants to stop (an all-reduce MAX); one process: itself."""
    return bool(agree_max([int(flag)])[0])


def agree_max(values: list[int]) -> list[int]:
    """The element-wise maximum of `values` over all ranks (one all-reduce; every rank must
    call it at the same point, so it is also a barrier); one process: `values`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    import torch

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
