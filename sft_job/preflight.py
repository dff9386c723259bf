"""Preflight: everything `sft-job validate` checks before a GPU is rented.

    sft-job validate jobs/gpt2-alpaca-lora.yaml --samples 3 --json report.json

Two passes. The cheap one (`fast_checks`, also the first thing `sft-job run` does) needs no
torch, tokenizer or weights: spec combinations, storage access, the base model's files, every
data row read and checked against its format. The full one, only when the cheap one passed:
tokenizer -> token lengths, truncation, packing efficiency -> N samples rendered as training
sees them -> memory estimate. Problems are collected, not raised one by one, so a user sees
everything a pass finds at once; the exit code is 2 (3 when every problem is a storage/Hub
access problem, 75 when the rest are transient storage failures).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.checks import overlap_problems, probe_trainer
from sft_job.environment import missing_packages
from sft_job.errors import (
    EXIT_ACCESS,
    EXIT_RETRY,
    EXIT_SPEC,
    AccessError,
    SftJobError,
    SpecError,
    TransientError,
)
from sft_job.spec import JobSpec


class PreflightFailed(SftJobError):
    """validate found problems; the exit code says which kind."""


FULL_PASS = ("tokenizer", "token lengths", "samples", "memory estimate")


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


def probe_output(uri: str) -> str:
    """Write then delete a small probe object under `uri`: a missing bucket, denied access or
    a path that is a file fails here (exit 3) instead of after training. Returns the
    credential source used (never the secret)."""
    from sft_job.uri import split_uri

    scheme, _, key = split_uri(uri)
    if scheme == "file" and Path(key).exists() and not Path(key).is_dir():
        raise AccessError(f"output.uri: {uri} is a file, not a directory")
    if scheme == "hf":
        raise SpecError(f"output.uri: {uri}: the Hub is not an output location; use "
                        "output.push_to_hub: org/name and a bucket or path for output.uri")
    if scheme == "file":  # no folders created for a check: a temporary one, removed
        return storage.probe(uri, write=True)
    probe = storage.join(uri, f".sft-job-probe-{uuid.uuid4().hex[:8]}")
    storage.write_text(probe, "probe")
    storage.delete_prefix(probe)
    return credential_source(uri)


def credential_source(uri: str) -> str:
    """Which credential chain serves `uri` (a description, never a secret)."""
    return storage.credential_source(uri)


def _probe_input(uri: str, label: str, rep: Report) -> None:
    from sft_job.uri import is_remote

    try:
        if not is_remote(uri):
            if not Path(uri.removeprefix("file://")).expanduser().exists():
                rep.problem(label, f"{uri}: no such file or directory", "data")
            return
        if uri.startswith("hf://"):
            return  # fetched with the Hub client during the data check
        if not storage.list_keys(uri) and not storage.exists(uri):
            rep.problem(label, f"{uri}: no object or prefix found (empty or missing)", "data")
            return
        rep.facts.setdefault("credentials", {})[label] = storage.probe(uri, write=False) \
            if storage.exists(uri) else credential_source(uri)
    except SftJobError as e:
        rep.error(label, e)


def fast_checks(spec: JobSpec, workdir: Path | None = None, probe_out: bool = True,
                data_cache: str | None = None) -> Report:
    """The cheap checks, in seconds and without torch, a tokenizer or model weights: spec
    combinations, storage access (a write probe of output.uri when `probe_out`), the base
    model's files, and every data row read and checked against its format (not when
    `data_cache` holds data prepared from these files and data.* fields: they were read and
    accepted then). `sft-job run` calls this first; raises PreflightFailed (exit 2/3/75)
    naming every problem on one line. Downloads go under `workdir` (a temporary folder,
    removed, when None)."""
    rep = Report()
    storage.export_s3_endpoint(spec.output.s3_endpoint_url)
    for where, module, install in missing_packages(spec):  # this machine runs the job
        rep.problem(where, f"needs the Python package '{module}', which is not installed "
                    f"({install})")
    work = workdir or Path(tempfile.mkdtemp(prefix="sft-job-check-"))
    try:
        _cheap_pass(spec, rep, work, probe_out, data_cache)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if rep.problems:
        raise rep.failure("")
    return rep


def preflight(spec: JobSpec, samples: int = 2, json_out: Path | None = None) -> Report:
    """Run every check; print a report; raise PreflightFailed when the job would fail. The
    full pass (tokenizer, tokens, samples, memory) runs only when the cheap pass found nothing."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # (set again on its import)
    for lib in ("transformers", "bitsandbytes", "trl", "peft", "accelerate"):
        logging.getLogger(lib).setLevel(logging.ERROR)  # their notes are not the report
    rep = Report()
    storage.export_s3_endpoint(spec.output.s3_endpoint_url)
    rep.facts["spec_hash"] = spec.run_hash()
    for where, module, install in missing_packages(spec):  # the job may run elsewhere
        rep.warnings.append(f"{where}: needs the Python package '{module}', not installed here: "
                            f"the machine that runs the job must have it ({install})")
    work = Path(tempfile.mkdtemp(prefix="sft-job-validate-"))
    try:
        _cheap_pass(spec, rep, work, probe_out=True)
        if rep.problems:
            rep.skipped = list(FULL_PASS)
        else:
            tok, meta = _tokenizer(spec, rep)
            if tok is not None:
                _check_tokens(spec, tok, samples, rep, work)
            _estimate_memory(spec, rep, meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(rep)
    if json_out:
        try:
            json_out.write_text(json.dumps({"ok": not rep.problems, **rep.__dict__}, indent=2,
                                           default=str))
        except OSError as e:
            raise SpecError(f"--json {json_out}: cannot write the report ({e.strerror})") from None
    if rep.problems:
        raise rep.failure("validate: the job would fail: ")
    return rep


def _cheap_pass(spec: JobSpec, rep: Report, work: Path, probe_out: bool,
                data_cache: str | None = None) -> None:
    _check_spec(spec, rep)
    _check_storage(spec, rep, probe_out)
    _check_model_files(spec, rep)
    if not (data_cache and not rep.problems and _prepared(spec, data_cache)):
        _scan_data(spec, rep, work)


def _prepared(spec: JobSpec, cache_uri: str) -> bool:
    from sft_job.data.cache import committed_for_data

    try:
        found = committed_for_data(spec.data, cache_uri)
    except SftJobError:
        return False  # the row scan reports what is wrong with the data
    if found:
        import logging

        logging.getLogger("sft_job").info("data: prepared from these files before (%s): "
                                          "skipping the row scan", found)
    return bool(found)


def _check_spec(spec: JobSpec, rep: Report) -> None:
    for problem in overlap_problems(spec):
        rep.problem("output.uri", problem)
    if spec.data.packing and spec.model.trust_remote_code:
        rep.problem("data.packing", "custom model code (trust_remote_code) may not honour "
                    "per-sample position ids, so packed samples could attend to each other; "
                    "set data.packing: false")
    if spec.trainer.fields_set():
        try:
            probe_trainer(spec)
        except SftJobError as e:  # its message starts with the trainer field
            where, _, what = str(e).partition(": ")
            rep.problem(where, what)
    from sft_job.train.trackers import missing

    for msg in missing(spec.train.report_to):
        rep.problem("train.report_to", msg)
    if spec.deepspeed.config_file:
        from sft_job.train.deepspeed import config

        try:
            config(spec)  # exists, parses, agrees with the spec
        except SftJobError as e:
            rep.error("deepspeed", e)


def _check_storage(spec: JobSpec, rep: Report, probe_out: bool = True) -> None:
    _probe_input(spec.data.train, "data.train", rep)
    if spec.data.eval:
        _probe_input(spec.data.eval, "data.eval", rep)
    for label, uri in (("model.base", spec.model.base), ("model.tokenizer", spec.model.tokenizer)):
        if uri and uri.startswith(("s3://", "gs://")):
            _probe_input(uri, label, rep)
    if not probe_out:
        return
    try:
        rep.facts.setdefault("credentials", {})["output.uri"] = probe_output(spec.output.uri)
    except SftJobError as e:
        rep.error("output.uri", e)
    if spec.data.cache_uri:  # a shared prefix elsewhere: written to when the data is prepared
        if spec.data.cache_uri.startswith("hf://"):
            rep.problem("data.cache_uri", "the Hub cannot hold prepared data; use a path or a "
                        "s3:// or gs:// prefix")
            return
        try:
            rep.facts.setdefault("credentials", {})["data.cache_uri"] = \
                probe_output(spec.data.cache_uri)
        except SftJobError as e:
            rep.error("data.cache_uri", e)


def _check_model_files(spec: JobSpec, rep: Report) -> None:
    """The base model's folder, file or prefix holds a config and weights (no download)."""
    from sft_job.models import source

    if rep.has("model.base"):
        return
    try:
        source.parse(spec.model.base).check(spec.model.revision)
    except SftJobError as e:
        rep.error("model.base", e)


def _scan_data(spec: JobSpec, rep: Report, work: Path) -> None:
    """Read every row of data.train (and data.eval, in train's format) and check it against
    its format; tokenizer-free (chat rows are checked with plain ChatML), streamed."""
    from sft_job.data import _cpus
    from sft_job.data.stream import read_source

    relaxed = spec.data.model_copy(update={"on_malformed": "skip"})
    fmt = None
    for label, uri in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if uri is None or rep.has(label):
            continue
        try:  # the run's data step reuses `work` (downloads)
            src = read_source(uri, relaxed, None, work, fmt=fmt,
                              procs=spec.data.num_proc or _cpus())
        except SftJobError as e:
            rep.error(label, e)
            continue
        fmt = fmt or src.format
        rep.facts["data" if label == "data.train" else "eval_data"] = {
            "format": src.format,
            "files": [str(f) for f in src.files],
            "rows": src.examples + src.n_malformed,
            "usable": src.examples,
            "malformed": src.n_malformed,
            "malformed_examples": [f"{m.source}: {m.reason}" for m in src.malformed[:5]],
            "empty_responses": src.empty_responses,
            "duplicates": src.duplicates,
        }
        if src.n_malformed and spec.data.on_malformed == "fail":
            m = src.malformed[0]
            rep.problem(label, f"{src.n_malformed} malformed row(s), first {m.source}: "
                        f"{m.reason} (fix them or set data.on_malformed: skip)", "data")


def _tokenizer(spec: JobSpec, rep: Report) -> tuple[Any, Path | str | None]:
    """The tokenizer, and where it and the config were read from (no weights)."""
    from sft_job.models import source
    from sft_job.models.load import load_tokenizer

    base = spec.model.base
    meta = None
    try:
        meta = source.parse(base).meta_dir(spec.model.revision)
        return load_tokenizer(spec.model, Path(meta), need_chat_template=False), meta
    except SftJobError as e:
        rep.error("model.base", e)
    except OSError as e:
        rep.problem("model.base", f"cannot load the tokenizer of {base}: "
                    f"{str(e).splitlines()[0]}", "access")
    return None, meta


def _check_tokens(spec: JobSpec, tok: Any, n_samples: int, rep: Report, work: Path) -> None:
    """Token lengths, truncation, packing efficiency and samples, with the real tokenizer."""
    import numpy as np

    from sft_job.data import _cpus, all_truncated
    from sft_job.data.prepared import kept_batches, length_facts, split_mask
    from sft_job.data.stream import read_source
    from sft_job.data.tokenize import slot_efficiency, token_stats
    from sft_job.models.chat import ensure_template

    d = rep.facts["data"]
    from sft_job.data.formats import resolve_template

    own = bool(getattr(tok, "chat_template", None))
    rendering = resolve_template(spec.data, tok) if d["format"] in ("alpaca", "prompt-response") \
        else "model" if d["format"] == "chat" else "native"
    template = ("unused" if rendering == "native" else "from the spec" if spec.model.chat_template
                else "the tokenizer's" if own else "ChatML (the tokenizer has none)")
    d["template"] = rendering
    if rendering == "native" and own and d["format"] != "text":
        rep.warnings.append(
            f"data.template: {d['format']} rows are trained in their native format, but the model "
            "ships with its tokenizer's chat template: a server applying that template would "
            "prompt it in a format it was not trained on (use data.template: model, or serve "
            "with the training format: `sft-job generate` does)")
    if template.startswith("ChatML"):
        rep.warnings.append("the tokenizer has no chat template: chat rows are rendered with "
                            "ChatML (set model.chat_template to choose another)")
        ensure_template(tok, warn=False)  # as the run's data step does
    rep.facts["tokenizer"] = {"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token,
                              "pad_is_eos": tok.pad_token_id == tok.eos_token_id,
                              "chat_template": template}
    relaxed = spec.data.model_copy(update={"on_malformed": "skip"})
    try:  # streamed and tokenized in batches, as the run's data step does
        src = read_source(spec.data.train, relaxed, tok, work, fmt=d["format"],
                          arrow=work / "validate" / "tokens.arrow",
                          procs=spec.data.num_proc or _cpus())
    except SftJobError as e:
        rep.error("data.train", e)
        return
    held = split_mask(src.examples, spec.data.eval_fraction, spec.data.seed) \
        if spec.data.eval_fraction and src.examples > 1 else None
    train = np.ones(src.examples, dtype=bool) if held is None else ~held
    st = token_stats(src.raw_lengths[train], src.trained[train], spec.data.max_length)
    if len(st.raw_lengths):
        d["tokens"] = length_facts(st.raw_lengths)
    d["truncated"] = st.truncated
    d["dropped_prompt_too_long"] = st.dropped_no_target
    if not len(st.lengths):
        rep.problem("data.max_length", f"every row's prompt fills max_length="
                    f"{spec.data.max_length} tokens: nothing to train on; raise data.max_length",
                    "data")
        return
    cut = all_truncated(st, src.format, spec.data.max_length)
    if cut:
        rep.problem("data.max_length", cut, "data")
    bs, ml = spec.train.batch_size, spec.data.max_length
    d["efficiency"] = {m: round(slot_efficiency(st.lengths, bs, ml, m), 4)
                       for m in ("packed", "longest", "max")}
    batches = kept_batches(src.arrow, train & (src.trained > 0))
    stops, first = _check_stops(batches, tok, ml, rep, n_samples)
    d["samples"] = [_render(r, tok, stops) for r in first]


def _check_stops(batches: Any, tok: Any, max_length: int, rep: Report, n_first: int
                 ) -> tuple[set[int], list[dict[str, list[int]]]]:
    """Every trained span ends with exactly one stop token (EOS or the chat template's
    end-of-turn token) and nothing after it: `...<|im_end|>\\n<|im_end|>` is refused, as is a
    row whose last reply has no stop (the model would not learn to stop). Reads the rows a
    batch at a time; returns the stop ids and the first `n_first` rows."""
    from sft_job.data.formats import special_tokens
    from sft_job.data.prepared import stop_counts
    from sft_job.models.chat import END_OF_TURN

    specials = set(special_tokens(tok))
    stops = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in (*END_OF_TURN, "</s>")
                                  if t in specials}
    unstopped = doubled = 0
    first: list[dict[str, list[int]]] = []
    for batch in batches:
        if len(first) < n_first:
            first += batch.slice(0, n_first - len(first)).to_pylist()
        d, u = stop_counts(batch, stops, max_length)
        doubled += d
        unstopped += u
    if doubled:
        rep.problem("data", f"{doubled} row(s) train tokens after a stop token (a trained span "
                    "holds an end-of-turn/EOS token before its end): the model would learn to "
                    "go on after it should stop; check model.chat_template")
    if unstopped:
        rep.problem("data", f"{unstopped} row(s) do not end with a trained stop token (EOS or the "
                    "chat template's end of turn); the model would not learn to stop")
    return stops, first


def _render(row: dict[str, list[int]], tok: Any, stops: set[int]) -> dict[str, Any]:
    """One sample with masked (prompt) text in [[...]] and trained text as is."""
    parts, cur, cur_masked = [], [], None
    for tid, lab in zip(row["input_ids"], row["labels"], strict=True):
        masked = lab == -100
        if cur_masked is not None and masked != cur_masked:
            parts.append((cur_masked, tok.decode(cur, skip_special_tokens=False)))
            cur = []
        cur.append(tid)
        cur_masked = masked
    if cur:
        parts.append((cur_masked, tok.decode(cur, skip_special_tokens=False)))
    text = "".join(f"[[{t}]]" if m else t for m, t in parts)
    return {"text": text, "tokens": len(row["input_ids"]),
            "trained_tokens": sum(1 for x in row["labels"] if x != -100),
            "ends_with_trained_eos": row["labels"][-1] == tok.eos_token_id,
            "ends_with_trained_stop": row["labels"][-1] != -100 and row["labels"][-1] in stops,
            "last_trained_token": tok.convert_ids_to_tokens(
                next((x for x in reversed(row["labels"]) if x != -100), tok.eos_token_id)),
            "input_ids": list(row["input_ids"]),
            "trained": [x != -100 for x in row["labels"]]}


def _estimate_memory(spec: JobSpec, rep: Report, meta: Path | str | None) -> None:
    from sft_job.errors import ModelError
    from sft_job.memory import estimate
    from sft_job.models.load import loading

    try:
        with loading("model.base", f"the config of {spec.model.base}"):
            est = estimate(spec, meta)
    except ModelError as e:  # the config itself is unusable: so would the run be
        rep.error("model.base", e)
        return
    except SftJobError as e:
        rep.warnings.append(f"memory estimate skipped: {e}")
        return
    if est is None:
        return
    rep.facts["memory"] = est
    acc = spec.resources.accelerator
    if acc and est.get("device_gb") and est["total_gb"] > est["device_gb"] * 0.92:
        rep.problem(  # the job would fail: validate must not say OK
            "resources.accelerator",
            f"about {est['total_gb']:.1f} GB per device needed, {acc} has "
            f"{est['device_gb']} GB: it will not fit; try method.kind: lora/qlora, "
            "method.gradient_checkpointing: true, a smaller train.batch_size or ZeRO-3")


def _print(rep: Report) -> None:
    out = sys.stdout
    d = rep.facts.get("data", {})
    print("sft-job validate", file=out)
    for k, v in rep.facts.get("credentials", {}).items():
        print(f"  access   {k}: ok ({v})", file=out)
    for label, section in (("data", d), ("eval", rep.facts.get("eval_data", {}))):
        if not section:
            continue
        print(f"  {label:<8} {section['format']} format, {section['rows']} rows, "
              f"{section['usable']} usable, {section['malformed']} malformed, "
              f"{section['empty_responses']} empty responses, {section['duplicates']} "
              "duplicates", file=out)
        for m in section["malformed_examples"]:
            print(f"           malformed {m}", file=out)
    t = rep.facts.get("tokenizer")
    if t:
        print(f"  tokenizer eos {t['eos']!r}, pad {t['pad']!r}"
              f"{' (= EOS, still trained: labels come from positions)' if t['pad_is_eos'] else ''}"
              f", bos {t['bos']!r}; chat template: {t['chat_template']}", file=out)
    if d:
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
