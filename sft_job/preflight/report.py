"""What `validate` found: the problems (each with its kind, which decides the exit code), the
warnings and the facts, and the report printed on stdout."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from sft_job.errors import (
    EXIT_ACCESS,
    EXIT_RETRY,
    EXIT_SPEC,
    AccessError,
    SftJobError,
    SpecError,
    TransientError,
)


class PreflightFailed(SftJobError):
    """validate found problems; the exit code says which kind."""


@dataclass
class Report:
    problems: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def problem(self, where: str, message: str, kind: str = "spec") -> None:
        self.problems.append({"where": where, "message": message, "kind": kind})

    def error(self, where: str, err: SftJobError) -> None:
        """Record a caught SftJobError, its kind from its class (access/transient decide the
        exit code)."""
        kind = ("access" if isinstance(err, AccessError) else
                "transient" if isinstance(err, TransientError) else
                "spec" if isinstance(err, SpecError) else "data")
        self.problem(where, str(err).removeprefix(f"{where}: "), kind)

    def has(self, where: str) -> bool:
        return any(p["where"] == where for p in self.problems)

    def failure(self, prefix: str) -> PreflightFailed:
        """One-line error for the problems found; exit 2, or 3 when all are access problems,
        or 75 when they are access/transient with at least one transient."""
        kinds = {p["kind"] for p in self.problems}
        one = self.problems[0] if len(self.problems) == 1 else None
        text = (f"{one['where']}: {one['message']}" if one else
                f"{len(self.problems)} problems: "
                + "; ".join(f"{p['where']}: {p['message']}" for p in self.problems))
        err = PreflightFailed(f"{prefix}{text}".replace("\n", " "))
        err.exit_code = (EXIT_ACCESS if kinds == {"access"} else
                         EXIT_RETRY if kinds <= {"access", "transient"} else EXIT_SPEC)
        return err


def print_report(rep: Report) -> None:
    """The report on stdout: access, data, tokenizer, tokens and samples, memory, then the
    warnings, what was skipped, the problems and the result."""
    out = sys.stdout
    print("sft-job validate", file=out)
    for k, v in rep.facts.get("credentials", {}).items():
        print(f"  access   {k}: ok ({v})", file=out)
    _print_rows(rep)
    t = rep.facts.get("tokenizer")
    if t:
        print(f"  tokenizer eos {t['eos']!r}, pad {t['pad']!r}"
              f"{' (= EOS, still trained: labels come from positions)' if t['pad_is_eos'] else ''}"
              f", bos {t['bos']!r}; chat template: {t['chat_template']}", file=out)
    _print_tokens(rep.facts.get("data", {}))
    mem = rep.facts.get("memory")
    if mem:
        print(f"  memory   ~{mem['total_gb']:.2f} GB per device ({mem['breakdown_gb']})", file=out)
    for w in rep.warnings:
        print(f"  warning  {w}", file=out)
    if rep.skipped:
        print(f"  skipped  {', '.join(rep.skipped)}: fix the problems below first", file=out)
    for p in rep.problems:
        print(f"  PROBLEM  {p['where']}: {p['message']}", file=out)
    print("  result   " + ("OK: the job would run" if not rep.problems
                           else f"{len(rep.problems)} problem(s)"), file=out)


def _print_rows(rep: Report) -> None:
    """The row counts of the training and eval data, and the first malformed rows."""
    out = sys.stdout
    for label, section in (("data", rep.facts.get("data", {})),
                           ("eval", rep.facts.get("eval_data", {}))):
        if not section:
            continue
        print(f"  {label:<8} {section['format']} format, {section['rows']} rows, "
              f"{section['usable']} usable, {section['malformed']} malformed, "
              f"{section['empty_responses']} empty responses, {section['duplicates']} "
              "duplicates", file=out)
        for m in section["malformed_examples"]:
            print(f"           malformed {m}", file=out)


def _print_tokens(d: dict[str, Any]) -> None:
    """Token lengths, packing efficiency and the samples of the training data."""
    out = sys.stdout
    if "tokens" in d:
        t = d["tokens"]
        print(f"  tokens   min {t['min']} / median {t['median']} / p95 {t['p95']} / max "
              f"{t['max']}; {d['truncated']} truncated, {d['dropped_prompt_too_long']} "
              "dropped (prompt too long)", file=out)
    if "efficiency" in d:
        e = d["efficiency"]
        print(f"  packing  useful/slots: packed {e['packed']:.1%}, pad-to-longest "
              f"{e['longest']:.1%}, pad-to-max {e['max']:.1%}", file=out)
    for i, s in enumerate(d.get("samples", []), 1):
        print(f"  sample {i} ({s['tokens']} tokens, {s['trained_tokens']} trained; "
              "[[masked]] is prompt, the rest is trained):", file=out)
        print("    " + s["text"].replace("\n", "\n    "), file=out)
