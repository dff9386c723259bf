"""Examples -> token ids and labels (prompt masked with -100, EOS trained), packing, collation.

The whole text of an example is tokenized once with character offsets, and a token is trained
when its characters overlap a trainable segment: no boundary effects from tokenizing the prompt
and the response separately. EOS is appended as a trained token even when pad == EOS, since
labels are built here from positions, never from token identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sft_job.data.formats import Example

IGNORE = -100


@dataclass
class TokenStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0  # the prompt alone filled max_length: nothing left to learn
    lengths: list[int] = field(default_factory=list)  # tokens per kept row (after truncation)
    raw_lengths: list[int] = field(default_factory=list)  # before truncation
    trained_tokens: int = 0


def eos_id(tokenizer: Any) -> int:
    """The id appended to every example; the tokenizer must have one."""
    from sft_job.errors import ModelError

    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token; set model.tokenizer to one that has")
    return int(tokenizer.eos_token_id)


def tokenize_example(ex: Example, tokenizer: Any, max_length: int) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, untruncated length) of one example. EOS is appended (trained when
    the text ends with a trained segment) unless the text already ends with its stop token: EOS
    itself, or the chat template's end-of-turn token (`Example.ends_with_stop`)."""
    text = "".join(t for t, _ in ex.segments)
    spans, pos = [], 0
    for t, trainable in ex.segments:
        if trainable:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    enc = tokenizer(text, add_special_tokens=adds_bos(tokenizer, text),
                    return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [tid if _in_spans(start, end, spans) else IGNORE
              for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
    eos = eos_id(tokenizer)
    trained_tail = bool(spans) and spans[-1][1] == len(text)
    if ex.ends_with_stop and ids:
        pass  # the template's own end-of-turn token ends the text (trained by its span)
    elif not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos if trained_tail else IGNORE)
    elif trained_tail:
        labels[-1] = eos
    raw = len(ids)
    return ids[:max_length], labels[:max_length], raw


def adds_bos(tokenizer: Any, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS): not when the text already
    starts with BOS, as chat templates that write it themselves do (Llama 3), so it is never
    doubled. The same rule serves training and generation."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """A token is trained when any of its characters is: a token that straddles the prompt
    and the reply (a template ending in a space, merged with the reply's first word) is one
    the model must produce to write the reply."""
    if end <= start:  # special tokens added by the tokenizer (BOS) have empty offsets
        return False
    return any(start < e and end > s for s, e in spans)


def tokenize_all(examples: list[Example], tokenizer: Any, max_length: int
                 ) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """Tokenize every example; rows with no trained token left after truncation are dropped."""
    stats = TokenStats()
    rows = []
    for ex in examples:
        ids, labels, raw = tokenize_example(ex, tokenizer, max_length)
        stats.rows += 1
        stats.raw_lengths.append(raw)
        if raw > max_length:
            stats.truncated += 1
        n_trained = sum(1 for x in labels if x != IGNORE)
        if n_trained == 0:
            stats.dropped_no_target += 1
            continue
        stats.lengths.append(len(ids))
        stats.trained_tokens += n_trained
        rows.append({"input_ids": ids, "labels": labels})
    return rows, stats


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into rows of at most max_length tokens (TRL's bfd), keeping
    each sample's length in `seq_lengths` so position ids restart at every sample."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if not rows:
        return []
    ds = Dataset.from_list(rows)
    packed = pack_dataset(ds, seq_length=max_length, strategy="bfd")
    return packed.to_list()


def slot_efficiency(lengths: list[int], batch_size: int, max_length: int, mode: str) -> float:
    """Useful tokens / token slots for a batching mode: 'longest' (pad to the longest in each
    batch of `batch_size`, in data order), 'max' (pad to max_length), or 'packed' (bfd rows,
    padded to the longest row of each batch)."""
    if not lengths:
        return 0.0
    useful = sum(lengths)
    if mode == "max":
        return useful / (len(lengths) * max_length)
    if mode == "longest":
        slots = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                    for i in range(0, len(lengths), batch_size))
        return useful / slots
    bins = _bfd_bins(lengths, max_length)
    slots = sum(max(bins[i:i + batch_size]) * len(bins[i:i + batch_size])
                for i in range(0, len(bins), batch_size))
    return useful / slots


def _bfd_bins(lengths: list[int], cap: int) -> list[int]:
    """Fill levels of best-fit-decreasing bins (the same packing `pack` does)."""
    import bisect

    levels: list[int] = []  # sorted remaining capacities
    fills: dict[int, list[int]] = {}
    out: list[int] = []
    for n in sorted((min(x, cap) for x in lengths), reverse=True):
        i = bisect.bisect_left(levels, n)
        if i < len(levels):
            rem = levels.pop(i)
            idx = fills[rem].pop()
            out[idx] += n
        else:
            rem = cap
            idx = len(out)
            out.append(n)
        new = rem - n
        bisect.insort(levels, new)
        fills.setdefault(new, []).append(idx)
    return out


class PackedCollator:
    """Batches packed rows as [batch, longest row] with position ids restarting at each sample
    and no attention mask, so transformers builds a per-sample (block-diagonal causal) mask:
    samples never attend to each other, and attention costs batch x row_len^2, not
    (batch x row_len)^2 as a single flattened row would on kernels without varlen support.

    With `flatten=True` (GPUs with flash-attention varlen kernels) TRL's padding-free collator
    is used instead: one row per batch with cu_seq_lens, linear in tokens."""

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.flatten = flatten
        self._inner = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id,
            padding_free=flatten,
            return_position_ids=not flatten,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._inner(examples)
        if not self.flatten:
            batch.pop("attention_mask", None)
            # the first token of a packed sample would be "predicted" from the previous
            # sample's last token: never train across the boundary (TRL's flattened path does
            # the same)
            batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def make_collator(pad_token_id: int, packing: bool, flatten: bool,
                  pad_to_multiple_of: int | None = None) -> Any:
    """The collator for the chosen batching: packed rows (flattened into one row when the
    attention is varlen), or samples, flattened padding-free when varlen else padded."""
    if packing:
        return PackedCollator(pad_token_id, flatten=flatten, pad_to_multiple_of=pad_to_multiple_of)
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=flatten,
                                           pad_to_multiple_of=pad_to_multiple_of)
