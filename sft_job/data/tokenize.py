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
BATCH = 1000  # examples per tokenizer call
PACK_BATCH = 1000  # rows packed together (TRL's map batch: bins never span two)


@dataclass
class TokenStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0  # the prompt alone filled max_length: nothing left to learn
    lengths: list[int] = field(default_factory=list)  # tokens per kept row (after truncation)
    raw_lengths: list[int] = field(default_factory=list)  # before truncation
    trained_tokens: int = 0


def token_stats(raw_lengths: Any, trained: Any, max_length: int) -> TokenStats:
    """TokenStats of tokenized examples from their lengths before truncation and their trained
    tokens after it (numpy arrays; the lengths fields stay arrays)."""
    import numpy as np

    kept = trained > 0
    return TokenStats(rows=len(raw_lengths), truncated=int((raw_lengths > max_length).sum()),
                      dropped_no_target=int((~kept).sum()),
                      lengths=np.minimum(raw_lengths, max_length)[kept],
                      raw_lengths=raw_lengths, trained_tokens=int(trained.sum()))


def eos_id(tokenizer: Any) -> int:
    """The id appended to every example; the tokenizer must have one."""
    from sft_job.errors import ModelError

    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token; set model.tokenizer to one that has")
    return int(tokenizer.eos_token_id)


def tokenize_example(ex: Example, tokenizer: Any, max_length: int) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, untruncated length) of one example: `encode_batch` of one."""
    enc = encode_batch([ex], tokenizer, max_length)
    ids, labels = enc.row(0)
    return ids, labels, int(enc.raw_lengths[0])


@dataclass
class Encoded:
    """Token ids and labels of a batch of examples as flat arrays: row i is
    `ids[offsets[i]:offsets[i + 1]]`, truncated to max_length; `raw_lengths` before truncation."""

    ids: Any  # np.ndarray int32
    labels: Any  # np.ndarray int32
    offsets: Any  # np.ndarray int64, one more than the rows
    raw_lengths: Any  # np.ndarray int32

    def row(self, i: int) -> tuple[list[int], list[int]]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[s:e].tolist(), self.labels[s:e].tolist()

    def trained(self) -> Any:
        """Trained tokens per row (after truncation)."""
        import numpy as np

        csum = np.concatenate([[0], np.cumsum(self.labels != IGNORE)])
        return (csum[self.offsets[1:]] - csum[self.offsets[:-1]]).astype(np.int32)


def encode_batch(examples: list[Example], tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize a batch of examples with one call of the (fast) tokenizer and label each token
    from its character offsets: a token is trained when its characters overlap a trainable
    segment (a token that straddles the prompt and the reply is one the model must produce to
    write the reply); tokens the tokenizer adds (BOS) have empty offsets and are never trained.
    EOS is appended (trained when the text ends with a trained segment) unless the text
    already ends with its stop token: EOS itself, or the chat template's end-of-turn token
    (`Example.ends_with_stop`)."""
    import numpy as np

    n = len(examples)
    texts = ["".join(t for t, _ in ex.segments) for ex in examples]
    ids, starts, ends, lens = _tokenize(texts, tokenizer)
    sp_row, sp_s, sp_e, tail = [], [], [], np.zeros(n, dtype=bool)
    for i, ex in enumerate(examples):
        pos = 0
        for t, trainable in ex.segments:
            if trainable:
                sp_row.append(i)
                sp_s.append(pos)
                sp_e.append(pos + len(t))
            pos += len(t)
        tail[i] = bool(sp_e) and sp_row[-1] == i and sp_e[-1] == len(texts[i])
    # spans are sorted and disjoint within a row, so the only one a token can overlap is the
    # first of its row that ends after the token starts
    width = max((len(t) for t in texts), default=0) + 1
    row = np.repeat(np.arange(n, dtype=np.int64), lens)
    span_key = np.asarray(sp_row, dtype=np.int64) * width + np.asarray(sp_e, dtype=np.int64)
    j = np.searchsorted(span_key, row * width + starts, side="right")
    ok = j < len(span_key)
    jj = np.minimum(j, max(len(span_key) - 1, 0))
    sp_row_a, sp_s_a = np.asarray(sp_row, dtype=np.int64), np.asarray(sp_s, dtype=np.int64)
    if len(span_key):
        ok &= (sp_row_a[jj] == row) & (sp_s_a[jj] < ends)
    trained = ok & (ends > starts)
    labels = np.where(trained, ids, IGNORE)
    return _finish(ids, labels, lens, examples, tail, eos_id(tokenizer), max_length)


def _tokenize(texts: list[str], tokenizer: Any) -> tuple[Any, Any, Any, Any]:
    """Flat ids, token start and end offsets, and tokens per text, from one call per value of
    `adds_bos` (BOS is never doubled)."""
    from itertools import chain

    import numpy as np

    out_ids: list[Any] = [None] * len(texts)
    out_off: list[Any] = [None] * len(texts)
    flags = [adds_bos(tokenizer, t) for t in texts]
    for flag in (True, False):
        idx = [i for i, f in enumerate(flags) if f is flag]
        if not idx:
            continue
        batch = [texts[i] for i in idx]
        backend = _backend(tokenizer)
        if backend is not None:  # what the call below runs, without its per-row conversions
            encs = backend.encode_batch(batch, add_special_tokens=flag)
            got = [(e.ids, e.offsets) for e in encs]
        else:
            enc = tokenizer(batch, add_special_tokens=flag, return_offsets_mapping=True,
                            return_attention_mask=False, return_token_type_ids=False)
            got = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
        for k, i in enumerate(idx):
            out_ids[i], out_off[i] = got[k]
    lens = np.fromiter((len(x) for x in out_ids), dtype=np.int64, count=len(texts))
    total = int(lens.sum())
    ids = np.fromiter(chain.from_iterable(out_ids), dtype=np.int64, count=total)
    off = np.fromiter(chain.from_iterable(chain.from_iterable(out_off)), dtype=np.int64,
                      count=2 * total).reshape(-1, 2)
    return ids, off[:, 0], off[:, 1], lens


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast tokenizer, when calling it directly gives what a
    call through transformers gives (it would set no truncation, no padding and the same
    special-token splitting); else None."""
    b = getattr(tokenizer, "backend_tokenizer", None)
    if b is None or b.truncation is not None or b.padding is not None:
        return None
    if b.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return b


def _finish(ids: Any, labels: Any, lens: Any, examples: list[Example], tail: Any, eos: int,
            max_length: int) -> Encoded:
    """Append or train the EOS of each row, then truncate to max_length."""
    import numpy as np

    ends = np.cumsum(lens)
    append, append_label, append_row = [], [], []
    for i, ex in enumerate(examples):
        n, last = int(lens[i]), int(ends[i]) - 1
        if ex.ends_with_stop and n:
            continue  # the template's own end-of-turn token ends the text (trained by its span)
        if not n or ids[last] != eos:
            append.append(int(ends[i]))
            append_label.append(eos if tail[i] else IGNORE)
            append_row.append(i)
        elif tail[i]:
            labels[last] = eos
    has_eos = np.zeros(len(examples), dtype=np.int64)
    if append:
        ids = np.insert(ids, append, eos)
        labels = np.insert(labels, append, append_label)
        has_eos[append_row] = 1
    raw = lens + has_eos
    start = np.concatenate([[0], np.cumsum(raw)[:-1]]).astype(np.int64)
    keep = (np.arange(len(ids)) - np.repeat(start, raw)) < max_length
    kept = np.minimum(raw, max_length)
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    return Encoded(ids[keep].astype(np.int32), labels[keep].astype(np.int32), offsets,
                   raw.astype(np.int32))


def adds_bos(tokenizer: Any, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS): not when the text already
    starts with BOS, as chat templates that write it themselves do (Llama 3), so it is never
    doubled. The same rule serves training and generation."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def tokenize_all(examples: list[Example], tokenizer: Any, max_length: int
                 ) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """Tokenize every example (in batches); rows with no trained token left after truncation
    are dropped."""
    stats = TokenStats()
    rows = []
    for k in range(0, len(examples), BATCH):
        enc = encode_batch(examples[k:k + BATCH], tokenizer, max_length)
        for i, (raw, n_trained) in enumerate(zip(enc.raw_lengths.tolist(), enc.trained().tolist(),
                                                 strict=True)):
            stats.rows += 1
            stats.raw_lengths.append(raw)
            if raw > max_length:
                stats.truncated += 1
            if n_trained == 0:
                stats.dropped_no_target += 1
                continue
            ids, labels = enc.row(i)
            stats.lengths.append(len(ids))
            stats.trained_tokens += n_trained
            rows.append({"input_ids": ids, "labels": labels})
    return rows, stats


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into rows of at most max_length tokens (TRL's bfd, over
    batches of PACK_BATCH rows), keeping each sample's length in `seq_lengths` so position ids
    restart at every sample."""
    from datasets import Dataset

    if not rows:
        return []
    return _pack_dataset(Dataset.from_list(rows), max_length).to_list()


def pack_table(table: Any, max_length: int) -> Any:
    """`pack` for a pyarrow Table of input_ids/labels rows (the same rows in the same batches
    give the same packed rows)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return _pack_dataset(Dataset(InMemoryTable(table)), max_length).data.table


def _pack_dataset(ds: Any, max_length: int) -> Any:
    from trl.data_utils import pack_dataset

    return pack_dataset(ds, seq_length=max_length, strategy="bfd",
                        map_kwargs={"batch_size": PACK_BATCH})


def slot_efficiency(lengths: Any, batch_size: int, max_length: int, mode: str) -> float:
    """Useful tokens / token slots for a batching mode: 'longest' (pad to the longest in each
    batch of `batch_size`, in data order), 'max' (pad to max_length), or 'packed' (bfd rows,
    padded to the longest row of each batch). `lengths`: a list or numpy array."""
    import numpy as np

    x = np.asarray(lengths, dtype=np.int64)
    if not len(x):
        return 0.0
    useful = int(x.sum())
    if mode == "max":
        return useful / (len(x) * max_length)
    if mode == "longest":
        return useful / _padded_slots(x, batch_size)
    return useful / _padded_slots(np.asarray(_bfd_bins(x, max_length), dtype=np.int64), batch_size)


def _padded_slots(x: Any, batch_size: int) -> int:
    """Slots of consecutive batches of `batch_size`, each padded to its longest."""
    import numpy as np

    starts = np.arange(0, len(x), batch_size)
    return int((np.maximum.reduceat(x, starts) * np.minimum(batch_size, len(x) - starts)).sum())


def _bfd_bins(lengths: Any, cap: int) -> list[int]:
    """Fill levels of best-fit-decreasing bins (the same packing `pack` does), in the order the
    bins were opened; each sample goes to the fullest bin it fits in (of those, the last one
    to reach that level)."""
    import bisect

    import numpy as np

    room: list[int] = []  # sorted distinct remaining capacities of open bins
    bins_with: dict[int, list[int]] = {}  # remaining capacity -> bins (a stack)
    out: list[int] = []
    for n in np.sort(np.minimum(np.asarray(lengths, dtype=np.int64), cap))[::-1].tolist():
        i = bisect.bisect_left(room, n)
        if i < len(room):
            rem = room[i]
            idx = bins_with[rem].pop()
            if not bins_with[rem]:
                room.pop(i)
            out[idx] += n
        else:
            rem, idx = cap, len(out)
            out.append(n)
        new = rem - n
        if not bins_with.get(new):
            bisect.insort(room, new)
        bins_with.setdefault(new, []).append(idx)
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
