"""What every step of one job shares (`pipeline.run_job`): the spec, the work folders, the
stop request and the phase timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.errors import Preempted
from sft_job.spec import JobSpec


@dataclass
class Timings:
    """Seconds spent in each phase (logged in summary.json; bench/ reads them)."""

    start: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now


@dataclass
class JobContext:
    """One run of a spec on this rank: `work` is its local scratch (`lease.workdir`), `stop`
    the signal watch (`preempt.watch`)."""

    spec: JobSpec
    work: Path
    rank: int
    stop: Any
    allow_changed: bool = False
    timings: Timings = field(default_factory=Timings)

    @property
    def stage(self) -> Path:
        """Rank 0's staging folder of what is uploaded to output.uri."""
        return self.work / "out"

    @property
    def mine(self) -> Path:
        """This rank's own downloads (data, resume), never shared."""
        return self.work / f"rank{self.rank}"

    @property
    def metrics_path(self) -> Path:
        return self.stage / "metrics" / "metrics.jsonl"

    def check_stop(self, phase: str) -> None:
        """Before training a stop request ends the run (75): nothing to checkpoint yet."""
        if self.stop.requested:
            raise Preempted(f"preempted by {self.stop.signame} during {phase}, before training "
                            "started: nothing to checkpoint; rerun to start again")
