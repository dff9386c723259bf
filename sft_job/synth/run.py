"""`data synth` top to bottom: plan requests per topic, ask the model, parse, filter, journal,
write the output.

    sft-job data synth --topics jobs/synth/topics.yaml --n 500 --out s3://b/data/interview.jsonl

`--n` rows are split over the topics by weight. Workers ask for `per_request` pairs at a time
for whichever topic is furthest from its quota, until every topic has its rows or has used its
share of `max_requests` (then the run ends short, with a warning). The output is written once,
at the end, so a half-finished run never leaves a file that looks complete; the journal
(journal.py) carries the progress. SIGTERM/SIGINT stop the workers, save the journal and exit
75: run the same command again to continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.errors import DataError, Preempted, SftJobError
from sft_job.synth.client import ChatClient, ClientSettings
from sft_job.synth.dedup import Keeper
from sft_job.synth.journal import Journal
from sft_job.synth.parse import Pair, extract
from sft_job.synth.rows import check_out_uri, check_row, pair_to_row, write_rows
from sft_job.synth.topics import (
    DEFAULT_TEMPLATE,
    Topic,
    check_template,
    fingerprint,
    quotas,
    render,
)

log = logging.getLogger("sft_job.synth")

RAW_KEEP_CHARS = 2000  # answers that gave no pair are kept this long in the journal, for debugging


@dataclass(frozen=True)
class SynthConfig:
    out: str
    n: int
    topics: list[Topic]
    client: ClientSettings
    format: str = "alpaca"
    template: str = DEFAULT_TEMPLATE
    system: str | None = None
    per_request: int = 5
    concurrency: int = 4
    max_requests: int | None = None  # default: 3 x the requests needed if nothing were rejected
    min_chars: int = 10
    max_chars: int = 8000
    near_dup: float = 0.8
    checkpoint_seconds: float = 30.0
    restart: bool = False
    workdir: Path = field(default_factory=lambda: Path("."))


@dataclass
class Progress:
    """What the journal says so far: kept pairs per topic, requests made, rejects by reason."""

    quota: dict[str, int]
    keeper: Keeper
    kept: dict[str, list[Pair]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    # request numbers handed out per topic (finished ones from the journal, then this run's):
    # a resumed run fills the gaps that requests in flight at the stop left, in order
    used_i: dict[str, set[int]] = field(default_factory=dict)
    rejects: Counter[str] = field(default_factory=Counter)
    surplus: int = 0  # valid pairs beyond a topic's quota (unused; another --n may use them)
    cut_off: int = 0  # answers that hit the token limit (finish_reason "length")

    def apply(self, entry: dict[str, Any]) -> None:
        """Replay or record one finished request."""
        topic = entry["topic"]
        self.requests[topic] += 1
        self.used_i.setdefault(topic, set()).add(entry["i"])
        self.rejects.update(entry.get("rejects", {}))
        self.cut_off += entry.get("finish_reason") == "length"
        if topic not in self.quota:
            return
        kept = self.kept.setdefault(topic, [])
        for d in entry["pairs"]:
            if len(kept) >= self.quota[topic]:
                self.surplus += 1
                continue
            reason = self.keeper.offer(Pair.from_json(d))
            if reason:
                self.rejects[reason] += 1
            else:
                kept.append(Pair.from_json(d))

    def total_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())


@dataclass
class Job:
    topic: Topic
    i: int
    ask: int


class Planner:
    """Which request to send next, given progress and requests in flight."""

    def __init__(self, cfg: SynthConfig, progress: Progress) -> None:
        self.cfg, self.p = cfg, progress
        total = cfg.max_requests or 3 * math.ceil(cfg.n / cfg.per_request) + len(cfg.topics)
        self.budget = {t.name: max(1, math.ceil(total * progress.quota[t.name] / cfg.n))
                       for t in cfg.topics if progress.quota[t.name]}
        self.inflight: Counter[str] = Counter()

    def next(self) -> Job | None:
        best, best_gap = None, 0.0
        for t in self.cfg.topics:
            q = self.p.quota[t.name]
            if not q or self.p.requests[t.name] + self.inflight[t.name] >= self.budget[t.name]:
                continue
            ask = min(self.cfg.per_request, q)
            gap = q - len(self.p.kept.get(t.name, [])) - self.inflight[t.name] * ask
            if gap > 0 and gap / q > best_gap:
                best, best_gap = t, gap / q
        if best is None:
            return None
        used = self.p.used_i.setdefault(best.name, set())
        i = next(k for k in range(len(used) + 1) if k not in used)
        used.add(i)
        return Job(best, i, min(self.cfg.per_request, self.p.quota[best.name]))

    def short_topics(self) -> list[str]:
        return [f"{name} ({len(self.p.kept.get(name, []))}/{q} after {self.p.requests[name]} "
                f"requests)" for name, q in self.p.quota.items()
                if len(self.p.kept.get(name, [])) < q]


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Run (or resume) a synth job and write the output; returns the stats."""
    check_out_uri(cfg.out, cfg.format)
    check_template(cfg.template, cfg.topics, "the prompt template")
    progress = Progress(quotas(cfg.topics, cfg.n),
                        Keeper(cfg.min_chars, cfg.max_chars, cfg.near_dup))
    journal = Journal(cfg.out, cfg.workdir, cfg.checkpoint_seconds)
    entries = journal.open(fingerprint(cfg.topics, cfg.template, cfg.system, cfg.client.model),
                           restart=cfg.restart)
    try:
        for e in entries:
            progress.apply(e)
        planner = Planner(cfg, progress)
        if entries:
            log.info("resuming from %s: %d requests done, %d/%d rows kept", journal.uri,
                     len(entries), progress.total_kept(), cfg.n)
        before = len(entries)
        asyncio.run(_generate(cfg, planner, journal))
        journal.checkpoint(force=True)
    except BaseException:
        _save_on_error(journal)
        raise
    finally:
        journal.close()
    return _finish(cfg, progress, planner, requests_now=sum(progress.requests.values()) - before)


def _save_on_error(journal: Journal) -> None:
    """Upload what was done before re-raising the error that stopped the run."""
    try:
        journal.checkpoint(force=True)
    except SftJobError as err:
        log.error("could not upload the journal %s: %s", journal.uri, err)


async def _generate(cfg: SynthConfig, planner: Planner, journal: Journal) -> None:
    """Run the workers until the planner has nothing left; stop cleanly on SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    wake = asyncio.Condition()
    ticker = _Ticker(cfg, planner.p)
    try:
        async with ChatClient(cfg.client) as client:
            workers = {asyncio.create_task(_worker(cfg, planner, journal, client, wake, ticker))
                       for _ in range(cfg.concurrency)}
            stopper = asyncio.create_task(stop.wait())
            try:
                await _until_done(workers, stopper)
            finally:
                stopper.cancel()
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, stopper, return_exceptions=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    ticker.log(force=True)


async def _until_done(workers: set[asyncio.Task[None]], stopper: asyncio.Task[Any]) -> None:
    pending = set(workers)
    while pending:
        done, _ = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            raise Preempted("stopped by a signal; finished requests are in the journal: run the "
                            "same command again to continue")
        for task in done:
            pending.discard(task)
            if task.exception():
                raise task.exception()  # type: ignore[misc]


async def _worker(cfg: SynthConfig, planner: Planner, journal: Journal, client: ChatClient,
                  wake: asyncio.Condition, ticker: _Ticker) -> None:
    while True:
        async with wake:
            job = planner.next()
            while job is None and sum(planner.inflight.values()):
                await wake.wait()  # an answer in flight may fall short: then more is needed
                job = planner.next()
            if job is None:
                return
            planner.inflight[job.topic.name] += 1
        try:
            messages = [{"role": "user", "content": render(cfg.template, job.topic, job.ask, job.i)}]
            if cfg.system:
                messages.insert(0, {"role": "system", "content": cfg.system})
            comp = await client.complete(messages)
            entry = _entry(job, comp.content, comp.finish_reason)
            journal.append(entry)
            planner.p.apply(entry)
        finally:
            async with wake:
                planner.inflight[job.topic.name] -= 1
                wake.notify_all()
        if journal.due():
            await asyncio.to_thread(journal.checkpoint)
        ticker.log()


def _entry(job: Job, content: str | None, finish_reason: str | None) -> dict[str, Any]:
    parsed = extract(content)
    entry: dict[str, Any] = {"kind": "request", "topic": job.topic.name, "i": job.i,
                             "pairs": [p.to_json() for p in parsed.pairs],
                             "rejects": dict(parsed.rejects), "finish_reason": finish_reason,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not parsed.pairs and content:
        entry["raw"] = content[:RAW_KEEP_CHARS]
    return entry


class _Ticker:
    """A progress line every 10 seconds."""

    def __init__(self, cfg: SynthConfig, progress: Progress) -> None:
        self.cfg, self.p, self.last = cfg, progress, time.monotonic()

    def log(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last >= 10:
            self.last = time.monotonic()
            log.info("synth: %d/%d rows kept, %d requests, %d rejected", self.p.total_kept(),
                     self.cfg.n, sum(self.p.requests.values()), sum(self.p.rejects.values()))


def _finish(cfg: SynthConfig, progress: Progress, planner: Planner, requests_now: int
            ) -> dict[str, Any]:
    """Check every row against the format, write the output, and build the stats."""
    pairs = [p for t in cfg.topics for p in progress.kept.get(t.name, [])]
    if not pairs:
        raise DataError(f"no usable rows after {sum(progress.requests.values())} requests "
                        f"(rejected: {_reasons(progress.rejects)}); see the 'raw' answers in "
                        f"{cfg.out}.synth-journal")
    rows = [pair_to_row(p, cfg.format) for p in pairs]
    for i, row in enumerate(rows):
        check_row(row, cfg.format, f"{cfg.out}:row {i}")  # a bug if it fails: parse checks more
    write_rows(rows, cfg.out, cfg.format, cfg.workdir)
    short = planner.short_topics()
    stats = {"out": cfg.out, "format": cfg.format, "kept": len(rows), "asked": cfg.n,
             "requests": sum(progress.requests.values()), "requests_this_run": requests_now,
             "rejected": sum(progress.rejects.values()), "rejects": dict(progress.rejects),
             "duplicates": progress.rejects["duplicate"] + progress.rejects["near_duplicate"],
             "surplus": progress.surplus, "cut_off": progress.cut_off, "short_topics": short}
    if progress.cut_off:
        log.warning("%d answers were cut off by the token limit; raise --max-tokens or lower "
                    "--per-request", progress.cut_off)
    if short:
        log.warning("short of --n: %s; raise --max-requests, lower --near-dup strictness or "
                    "add topics, then rerun to continue", "; ".join(short))
    return stats


def _reasons(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"


def stats_line(stats: dict[str, Any]) -> str:
    """The one-line summary printed at the end."""
    return (f"synth: kept {stats['kept']}/{stats['asked']} rows ({stats['format']}) -> "
            f"{stats['out']} | requests {stats['requests']} ({stats['requests_this_run']} this "
            f"run) | duplicates {stats['duplicates']} | rejected {stats['rejected']}: "
            f"{_reasons(Counter(stats['rejects']))} | surplus {stats['surplus']}"
            + (f" | cut off {stats['cut_off']}" if stats.get("cut_off") else ""))


def stats_json(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=1, sort_keys=True)
