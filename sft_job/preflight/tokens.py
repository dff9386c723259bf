"""The full pass's data checks, with the real tokenizer (no weights): the chat template used,
token lengths, truncation, packing efficiency, a stop token at the end of every trained span,
and samples rendered as training sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_job.errors import SftJobError
from sft_job.preflight.report import Report
from sft_job.spec import JobSpec


def tokenizer_of(spec: JobSpec, rep: Report) -> tuple[Any, Path | str | None]:
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


def check_tokens(spec: JobSpec, tok: Any, n_samples: int, rep: Report, work: Path) -> None:
    """Token lengths, truncation, packing efficiency and samples, with the real tokenizer."""
    import numpy as np

    from sft_job.data import _cpus
    from sft_job.data.prepared import kept_batches, split_mask
    from sft_job.data.stream import read_source
    from sft_job.data.tokenize import slot_efficiency, token_stats

    d = rep.facts["data"]
    _check_template(spec, tok, d["format"], rep)
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
    if not _check_lengths(spec, st, src.format, d, rep):
        return
    bs, ml = spec.train.batch_size, spec.data.max_length
    d["efficiency"] = {m: round(slot_efficiency(st.lengths, bs, ml, m), 4)
                       for m in ("packed", "longest", "max")}
    batches = kept_batches(src.arrow, train & (src.trained > 0))
    stops, first = _check_stops(batches, tok, ml, rep, n_samples)
    d["samples"] = [_render(r, tok, stops) for r in first]


def _check_template(spec: JobSpec, tok: Any, fmt: str, rep: Report) -> None:
    """How the rows are rendered (native or through a chat template, and which one): a fact,
    and a warning when it differs from what a server of the model would use. A tokenizer
    without a chat template gets ChatML, as the run's data step does."""
    from sft_job.data.formats import resolve_template
    from sft_job.models.chat import ensure_template

    own = bool(getattr(tok, "chat_template", None))
    rendering = resolve_template(spec.data, tok) if fmt in ("alpaca", "prompt-response") \
        else "model" if fmt == "chat" else "native"
    template = ("unused" if rendering == "native" else "from the spec" if spec.model.chat_template
                else "the tokenizer's" if own else "ChatML (the tokenizer has none)")
    rep.facts["data"]["template"] = rendering
    if rendering == "native" and own and fmt != "text":
        rep.warnings.append(
            f"data.template: {fmt} rows are trained in their native format, but the model "
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


def _check_lengths(spec: JobSpec, st: Any, fmt: str, d: dict[str, Any], rep: Report) -> bool:
    """Token length facts of the training rows, and a problem when no row is left to train on
    or every row loses its end to truncation; False when nothing is left."""
    from sft_job.data import all_truncated
    from sft_job.data.prepared import length_facts

    if len(st.raw_lengths):
        d["tokens"] = length_facts(st.raw_lengths)
    d["truncated"] = st.truncated
    d["dropped_prompt_too_long"] = st.dropped_no_target
    if not len(st.lengths):
        rep.problem("data.max_length", f"every row's prompt fills max_length="
                    f"{spec.data.max_length} tokens: nothing to train on; raise data.max_length",
                    "data")
        return False
    cut = all_truncated(st, fmt, spec.data.max_length)
    if cut:
        rep.problem("data.max_length", cut, "data")
    return True


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
