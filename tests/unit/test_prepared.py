"""The job's data step (data/stream.py, prepared.py, cache.py): the rows it hands the trainer are
exactly those of the in-memory path with the per-example tokenizer call it replaced, for every
bundled format and file kind, in this process and in worker processes; the cache is hit, keyed
by every field that changes tokens, and ignores broken entries with one log line.

Real files and the builtin tiny tokenizers; nothing is mocked except, where a test must show
that nothing was prepared, the preparing function itself (replaced by one that fails)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import sft_job.data.prepared as prepare_mod
from sft_job.data import build, cache, prepare, split, stream
from sft_job.data import tokenize as tok_mod
from sft_job.data.formats import Example
from sft_job.data.tokenize import IGNORE, adds_bos, eos_id
from sft_job.spec import DATA_HOW, DataSpec

SAMPLES = Path(__file__).resolve().parents[2] / "sft_job" / "sample_data"


def reference_example(ex: Example, tokenizer: Any, max_length: int) -> tuple[list[int], list[int], int]:
    """tokenize_example as it was before batching (commit 8814029): one tokenizer call per
    example and a per-token overlap test. The oracle the batched path must match."""
    text = "".join(t for t, _ in ex.segments)
    spans, pos = [], 0
    for t, trainable in ex.segments:
        if trainable:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    enc = tokenizer(text, add_special_tokens=adds_bos(tokenizer, text), return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tid if e > s and any(s < se and e > ss for ss, se in spans) else IGNORE
              for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True)]
    eos = eos_id(tokenizer)
    trained_tail = bool(spans) and spans[-1][1] == len(text)
    if ex.ends_with_stop and ids:
        pass
    elif not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos if trained_tail else IGNORE)
    elif trained_tail:
        labels[-1] = eos
    return ids[:max_length], labels[:max_length], len(ids)


def reference_rows(spec: DataSpec, tok: Any, work: Path) -> dict[str, Any]:
    """The data step as it was: every example in memory, split, tokenized one by one, packed."""
    p = prepare(spec.train, spec, tok, work)
    if spec.eval:
        train, ev = p.examples, prepare(spec.eval, spec, tok, work, fmt=p.format).examples
    else:
        train, ev = split(p.examples, spec.eval_fraction, spec.seed)

    def rows(examples: list[Example]) -> list[dict[str, list[int]]]:
        out = [reference_example(e, tok, spec.max_length) for e in examples]
        kept = [{"input_ids": i, "labels": lab} for i, lab, _ in out if set(lab) != {IGNORE}]
        return tok_mod.pack(kept, spec.max_length) if spec.packing else kept

    return {"format": p.format, "train": rows(train), "eval": rows(ev),
            "train_examples": train[:prepare_mod.SAMPLE_EXAMPLES],
            "eval_examples": ev[:prepare_mod.SAMPLE_EXAMPLES]}


def built_rows(spec: DataSpec, tok: Any, work: Path) -> dict[str, Any]:
    b = build(spec, tok, work)
    return {"format": b.format, "train": b.train.to_list(), "eval": b.eval.to_list(),
            "train_examples": b.train_examples, "eval_examples": b.eval_examples}


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 rows, a pool even for small files, packing batches of 5 rows flushed 10 at
    a time: every boundary the streaming path has is crossed on the bundled data."""
    monkeypatch.setattr(stream, "CHUNK", 7)
    monkeypatch.setattr(stream, "HEAD", 10)
    monkeypatch.setattr(stream, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(tok_mod, "PACK_BATCH", 5)
    monkeypatch.setattr(prepare_mod, "PACK_ROWS", 10)


CASES = [
    ("alpaca.jsonl", {"template": "model"}, "tok"),
    ("alpaca.jsonl", {"template": "native", "alpaca_template": "stanford"}, "tok"),
    ("alpaca.jsonl", {"template": "native", "max_length": 48, "train_on_prompt": True}, "tok"),
    ("polite.jsonl", {"template": "auto", "eval": "pirate.jsonl", "eval_fraction": 0.0}, "tok"),
    ("polite.jsonl", {"template": "native", "packing": False}, "tok_pad_eos"),
    ("chat.jsonl", {}, "tok"),
    ("chat.jsonl", {"max_length": 40}, "no_template"),
    ("text.jsonl", {"max_length": 32}, "tok"),
    ("pirate.jsonl", {"template": "model"}, "gpt2_tok"),
]


def _fresh_without_template(request: pytest.FixtureRequest) -> Any:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(request.getfixturevalue("tiny_llama_dir")))
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


@pytest.mark.parametrize("procs", [1, 2])
@pytest.mark.parametrize(("file", "kw", "tok_name"), CASES)
def test_rows_identical_to_the_in_memory_path(file: str, kw: dict[str, Any], tok_name: str,
                                              procs: int, small_batches: None,
                                              request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    tok = _fresh_without_template(request) if tok_name == "no_template" \
        else request.getfixturevalue(tok_name)
    kw = {"eval_fraction": 0.1, "max_length": 128, **kw, "num_proc": procs}
    if "eval" in kw:
        kw["eval"] = str(SAMPLES / kw["eval"])
    spec = DataSpec(train=str(SAMPLES / file), **kw)
    want = reference_rows(spec, tok, tmp_path / "ref")
    if tok_name == "no_template":  # both paths give it ChatML for chat rows, as the job does
        tok = _fresh_without_template(request)
    got = built_rows(spec, tok, tmp_path / "new")
    assert got == want
    assert want["train"] and want["eval"]


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "save_to_disk", "shards"])
def test_rows_identical_for_every_file_kind(kind: str, tok: Any, small_batches: None,
                                            tmp_path: Path) -> None:
    """The bundled Alpaca rows as each kind of file give the rows the .jsonl gives."""
    rows = [json.loads(x) for x in (SAMPLES / "alpaca.jsonl").read_text().splitlines()]
    path = _write_kind(kind, rows, tmp_path / "data")
    kw = {"eval_fraction": 0.1, "max_length": 96, "num_proc": 2, "format": "alpaca"}
    want = built_rows(DataSpec(train=str(SAMPLES / "alpaca.jsonl"), **kw), tok, tmp_path / "a")
    got = built_rows(DataSpec(train=str(path), **kw), tok, tmp_path / "b")
    assert (got["train"], got["eval"]) == (want["train"], want["eval"])
    assert [e.segments for e in got["eval_examples"]] == [e.segments for e in want["eval_examples"]]


def _write_kind(kind: str, rows: list[dict[str, str]], dest: Path) -> Path:
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True)
    if kind == "json":
        (dest / "d.json").write_text(json.dumps(rows, indent=1))
        return dest / "d.json"
    if kind == "csv":
        with (dest / "d.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(rows)
        return dest / "d.csv"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), dest / "d.parquet", row_group_size=10)
        return dest / "d.parquet"
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(dest / "ds"))
        return dest / "ds"
    for i in range(0, len(rows), 25):  # shards, read in name order
        (dest / f"part-{i // 25:05d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[i:i + 25]))
    return dest


# ------------------------------------------------------------------ the cache


def _spec(tmp_path: Path, **kw: Any) -> DataSpec:
    data = tmp_path / "polite.jsonl"
    if not data.exists():
        shutil.copy(SAMPLES / "polite.jsonl", data)
    return DataSpec(**{"train": str(data), "eval_fraction": 0.1, "max_length": 64,
                       "cache_uri": str(tmp_path / "cache"), **kw})


def _no_preparing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("prepared again although a committed entry exists")

    monkeypatch.setattr(cache, "prepare_dir", refuse)


def test_cache_hit_loads_without_preparing(tok: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path)
    first = build(spec, tok, tmp_path / "w1")
    assert first.stats["prepared"]["here"] is True
    _no_preparing(monkeypatch)
    again = build(spec, tok, tmp_path / "w2")
    assert again.stats["prepared"] == {**first.stats["prepared"], "here": False}
    assert again.train.to_list() == first.train.to_list()
    assert again.eval.to_list() == first.eval.to_list()
    assert {k: v for k, v in again.stats.items() if k not in ("prepared", "train_lengths")} == \
        {k: v for k, v in first.stats.items() if k not in ("prepared", "train_lengths")}
    assert list(again.stats["train_lengths"]) == list(first.stats["train_lengths"])
    assert again.data_hash == first.data_hash and again.eval_examples == first.eval_examples
    assert cache.committed_for_data(spec, spec.cache_uri) == first.stats["prepared"]["uri"]


# every data.* field that changes the rows (or whether the job runs), with another value
CHANGES: dict[str, Any] = {
    "train": "other.jsonl", "eval": "eval.jsonl", "eval_fraction": 0.2, "format": "alpaca",
    "template": "native", "alpaca_template": "stanford", "prompt_field": "q",
    "response_field": "a", "user_token": "<u>", "assistant_token": "<a>", "text_field": "t",
    "messages_field": "m", "max_length": 65, "packing": False, "train_on_prompt": True,
    "on_malformed": "skip", "max_samples": 7, "seed": 43,
}


def test_data_key_covers_every_field_that_changes_rows(tmp_path: Path) -> None:
    assert set(CHANGES) | set(DATA_HOW) == set(DataSpec.model_fields)
    spec = _spec(tmp_path)
    for name in ("other.jsonl", "eval.jsonl"):
        shutil.copy(SAMPLES / "polite.jsonl", tmp_path / name)
    base = cache.data_key(spec)
    for field, value in CHANGES.items():
        if field in ("train", "eval"):
            value = str(tmp_path / value)
        changed = spec.model_copy(update={field: value})
        assert cache.data_key(changed) != base, field
    for field, value in {"cache_uri": "s3://b/p", "cache_wait_minutes": 1.0, "num_proc": 3}.items():
        assert cache.data_key(spec.model_copy(update={field: value})) == base, field
    data = Path(spec.train)
    data.write_bytes(data.read_bytes())  # same bytes, a new mtime: the file's identity changed
    assert cache.data_key(spec) != base


def test_tokenizer_key(tiny_llama_dir: Path, gpt2_tok: Any) -> None:
    from transformers import AutoTokenizer

    def fresh() -> Any:
        return AutoTokenizer.from_pretrained(str(tiny_llama_dir))

    base = cache.tokenizer_key(fresh())
    assert cache.tokenizer_key(fresh()) == base
    assert cache.tokenizer_key(gpt2_tok) == base  # the builtin models share one tokenizer
    changes: list[Callable[[Any], Any]] = [
        lambda t: setattr(t, "chat_template", t.chat_template.replace("<|im_start|>", "<|im_start|> ")),
        lambda t: t.add_special_tokens({"additional_special_tokens": ["<|tool|>"]}),
        lambda t: t.add_tokens(["photosynthesis"]),  # the vocabulary
        lambda t: setattr(t, "eos_token", "<|im_end|>"),
    ]
    for change in changes:
        t = fresh()
        change(t)
        assert cache.tokenizer_key(t) != base


def test_a_changed_key_prepares_again(tok: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    spec = _spec(tmp_path)
    first = build(spec, tok, tmp_path / "w")
    longer = build(spec.model_copy(update={"max_length": 96}), tok, tmp_path / "w")
    other_tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    other_tok.chat_template = other_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    templated = build(spec, other_tok, tmp_path / "w")
    Path(spec.train).write_text(Path(spec.train).read_text().replace("Paris", "Lyon"))
    edited = build(spec, tok, tmp_path / "w")
    entries = {b.stats["prepared"]["uri"] for b in (first, longer, templated, edited)}
    assert len(entries) == 4 and all(b.stats["prepared"]["here"]
                                     for b in (longer, templated, edited))
    assert edited.data_hash != first.data_hash  # what a checkpoint's resume guard compares
    assert len(list((tmp_path / "cache").iterdir())) == 4


def _break(entry: Path, how: str) -> None:
    if how == "no marker":
        (entry / "COMMITTED").unlink()
    elif how == "truncated":
        f = entry / "train.arrow"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:  # written by another version, its marker consistent with it
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "version": 0}, indent=1))
        marker = json.loads((entry / "COMMITTED").read_text())
        marker["files"]["meta.json"] = (entry / "meta.json").stat().st_size
        (entry / "COMMITTED").write_text(json.dumps(marker))


@pytest.mark.parametrize("how", ["no marker", "truncated", "other version"])
def test_a_broken_entry_is_ignored_and_prepared_again(how: str, tok: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "someone-elses.txt").write_text("kept")
    first = build(spec, tok, tmp_path / "w")
    rows = first.train.to_list()  # before the file under its memory map is cut short
    _break(Path(first.stats["prepared"]["uri"]), how)
    with caplog.at_level(logging.INFO, logger="sft_job"):
        again = build(spec, tok, tmp_path / "w")
    ignored = [r.getMessage() for r in caplog.records if "ignoring the prepared data" in r.getMessage()]
    assert len(ignored) == 1, ignored
    assert how.split()[0] in ignored[0] or "bytes" in ignored[0]
    assert again.stats["prepared"]["here"] is True
    assert again.train.to_list() == rows
    assert (tmp_path / "cache" / "someone-elses.txt").read_text() == "kept"
    entry = Path(again.stats["prepared"]["uri"])
    assert cache._problem(entry, entry.name) is None


# ------------------------------------------------------------------ who prepares


class _Ranks:
    """RANK / LOCAL_RANK per thread (the ranks of a job are processes; here, threads)."""

    def __init__(self) -> None:
        import threading

        self.local = threading.local()

    def __call__(self) -> Any:
        from sft_job.topology import Topology

        return Topology(rank=getattr(self.local, "RANK", 0),
                        local_rank=getattr(self.local, "LOCAL_RANK", 0))


def test_other_ranks_wait_for_the_preparing_one(tok: Any, tiny_llama_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from transformers import AutoTokenizer

    ranks = _Ranks()
    monkeypatch.setattr(cache, "here", ranks)
    spec = _spec(tmp_path)
    got: dict[str, Any] = {}

    def rank1() -> None:
        ranks.local.RANK = ranks.local.LOCAL_RANK = 1
        got["b"] = build(spec, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), tmp_path / "r1")

    t = threading.Thread(target=rank1)
    t.start()
    b0 = build(spec, tok, tmp_path / "r0")
    t.join(60)
    b1 = got["b"]
    assert b0.stats["prepared"]["here"] and not b1.stats["prepared"]["here"]
    assert b1.stats["prepared"]["uri"] == b0.stats["prepared"]["uri"]
    assert b1.train.to_list() == b0.train.to_list()


def test_a_waiting_rank_gives_up_with_a_clear_error(tok: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sft_job.errors import TransientError

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    spec = _spec(tmp_path, cache_wait_minutes=0.01)
    with pytest.raises(TransientError, match=r"waited 0\.01 min for this node's first rank.*"
                                             r"data\.cache_wait_minutes"):
        build(spec, tok, tmp_path / "w")


# ------------------------------------------------------------------ a cache in a bucket


@pytest.fixture(scope="module")
def s3() -> Any:
    from tests.servers import s3_server

    with s3_server(buckets=["prep"]) as server:
        yield server


def test_bucket_cache_prepared_by_rank_0_downloaded_by_other_nodes(
        s3: Any, tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from tests.servers import use_env

    use_env(monkeypatch, s3.env)
    spec = _spec(tmp_path, cache_uri="s3://prep/shared")
    first = build(spec, tok, tmp_path / "node0", local_root=tmp_path / "node0" / "prepared")
    uri = first.stats["prepared"]["uri"]
    assert uri.startswith("s3://prep/shared/") and first.stats["prepared"]["here"]
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="prep")["Contents"]}
    key = uri.removeprefix("s3://prep/")
    assert keys == {f"{key}/{f}" for f in (*prepare_mod.FILES, "COMMITTED")}

    monkeypatch.setenv("RANK", "2")  # node 1's first rank: downloads, never prepares
    monkeypatch.setenv("LOCAL_RANK", "0")
    with monkeypatch.context() as m:
        _no_preparing(m)
        other = build(spec, tok, tmp_path / "node1", local_root=tmp_path / "node1" / "prepared")
    assert not other.stats["prepared"]["here"] and other.train.to_list() == first.train.to_list()

    monkeypatch.setenv("RANK", "0")  # an upload cut short: rank 0 drops it and prepares again
    s3.client().delete_object(Bucket="prep", Key=f"{key}/COMMITTED")
    with caplog.at_level(logging.INFO, logger="sft_job"):
        again = build(spec, tok, tmp_path / "node2", local_root=tmp_path / "node2" / "prepared")
    assert again.stats["prepared"]["here"] and again.train.to_list() == first.train.to_list()
    assert [r.getMessage() for r in caplog.records
            if "ignoring" in r.getMessage()] == [f"data: ignoring the prepared data at {uri} "
                                                 "(no commit marker); preparing it again"]


@pytest.mark.parametrize("where", ["s3", "gs", "hf"])
def test_data_in_buckets_and_on_the_hub(where: str, s3: Any, tok: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Data read from S3, GCS or a Hub dataset repo gives the rows of the same file read
    locally; a rerun on a fresh machine finds the entry by the objects' ETags / generations /
    blob ids and downloads no data."""
    from sft_job import storage

    local = _spec(tmp_path)
    want = build(local, tok, tmp_path / "local").train.to_list()
    with _remote_data(where, s3, monkeypatch, tmp_path) as base:
        uri = f"{base}/data/polite.jsonl"
        storage.put_file(Path(local.train), uri)
        spec = local.model_copy(update={"train": uri if where != "hf" else f"{base}/data"})
        first = build(spec, tok, tmp_path / "w1")
        assert first.train.to_list() == want and first.stats["prepared"]["here"]
        with monkeypatch.context() as m:
            _no_preparing(m)
            again = build(spec, tok, tmp_path / "w2")
        assert not again.stats["prepared"]["here"] and again.train.to_list() == want
        assert not (tmp_path / "w2" / "data").exists()  # nothing downloaded


@contextmanager
def _remote_data(where: str, s3: Any, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> Iterator[str]:
    """A bucket (moto S3, the GCS emulator) or a Hub dataset repo (the fake Hub) for data."""
    from tests.servers import gcs_server, hub_server, use_env

    if where == "s3":
        use_env(monkeypatch, s3.env)
        yield "s3://prep"
    elif where == "gs":
        with gcs_server(["data"]) as gcs:
            use_env(monkeypatch, gcs.env)
            yield "gs://data"
    else:
        with hub_server() as hub:
            use_env(monkeypatch, {**hub.env, "HF_HOME": str(tmp / "hf-home")})
            yield "hf://datasets/org/polite"


def test_missing_cache_bucket_is_exit_3_before_anything_is_written(s3: Any, sft_cache: Path,
                                                                   tmp_path: Path) -> None:
    from tests.conftest import run_cli

    out = tmp_path / "out"
    res = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}",
                   "--set", "data.cache_uri=s3://no-such-bucket/prepared"], sft_cache, **s3.env)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "data.cache_uri" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


# ------------------------------------------------------------------ helpers of validate


def test_length_facts_are_the_statistics_modules() -> None:
    import random
    import statistics

    import numpy as np

    from sft_job.data.prepared import length_facts

    rng = random.Random(3)
    for n in [1, 2, 3, 4, 5, 19, 20, 21, 39, 40, 41, 100, 1001]:
        xs = [rng.randint(1, 600) for _ in range(n)]
        q = statistics.quantiles(xs, n=20) if n > 1 else [xs[0]] * 19
        want = {"min": min(xs), "median": statistics.median(xs), "p95": round(q[18], 1),
                "max": max(xs)}
        assert length_facts(np.array(xs, dtype=np.int32)) == want, n


def test_stop_counts_match_the_per_row_rule() -> None:
    """Rows training a stop before the end of a trained span, and rows whose last trained
    token is no stop (unless cut at max_length), counted over flat Arrow columns."""
    import random

    import pyarrow as pa

    from sft_job.data.prepared import stop_counts

    rng = random.Random(5)
    stops = {3, 4}
    rows = []
    for _ in range(400):
        n = rng.randint(1, 12)
        labels = [rng.choice([IGNORE, IGNORE, 1, 2, 3, 4]) for _ in range(n)]
        if set(labels) == {IGNORE}:
            labels[-1] = rng.choice([2, 3])
        rows.append(labels)

    def by_row(labels: list[int], max_length: int) -> tuple[int, int]:
        runs, prev = [], False
        for lab in labels:
            if lab != IGNORE:
                if not prev:
                    runs.append([])
                runs[-1].append(lab)
            prev = lab != IGNORE
        if any(any(t in stops for t in run[:-1]) for run in runs):
            return 1, 0
        return 0, int(runs[-1][-1] not in stops and len(labels) < max_length)

    for max_length in (6, 100):
        want = [sum(x) for x in zip(*(by_row(r, max_length) for r in rows), strict=True)]
        batch = pa.RecordBatch.from_pylist([{"labels": r} for r in rows])
        assert list(stop_counts(batch.slice(0, 400), stops, max_length)) == want
        # a slice of a batch (offsets not starting at 0), as filtering gives
        assert list(stop_counts(batch.slice(100, 50), stops, max_length)) == [
            sum(x) for x in zip(*(by_row(r, max_length) for r in rows[100:150]), strict=True)]


def test_examples_past_the_kept_head_are_read_again(tok: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json keeps the first examples of each split even when they lie past the examples
    held in memory while tokenizing."""
    monkeypatch.setattr(stream, "HEAD", 3)
    monkeypatch.setattr(stream, "CHUNK", 2)
    spec = _spec(tmp_path, eval_fraction=0.3)
    b = build(spec, tok, tmp_path / "w")
    p = prepare(spec.train, spec, tok, tmp_path / "w")
    train, ev = split(p.examples, spec.eval_fraction, spec.seed)
    assert b.eval_examples == ev[:prepare_mod.SAMPLE_EXAMPLES]
    assert b.train_examples == train[:prepare_mod.SAMPLE_EXAMPLES]


def test_chunks_with_no_usable_row(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole chunks of malformed rows (data.on_malformed: skip) in the middle of the data."""
    monkeypatch.setattr(stream, "CHUNK", 4)
    good = (SAMPLES / "polite.jsonl").read_text().splitlines()
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(good[:10] + ['{"prompt": oops'] * 9 + ['{"q": 1}'] * 3 + good[10:])
                    + "\n")
    spec = _spec(tmp_path, train=str(data), on_malformed="skip")
    b = build(spec, tok, tmp_path / "w")
    assert b.stats["malformed"] == 12 and b.stats["train_examples"] + b.stats["eval_examples"] \
        == len(good) - b.stats["dropped_prompt_too_long"]
    want = reference_rows(spec, tok, tmp_path / "ref")
    assert (b.train.to_list(), b.eval.to_list()) == (want["train"], want["eval"])


def test_writes_nothing_but_the_entry(tok: Any, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    b = build(spec, tok, tmp_path / "w")
    entry = Path(b.stats["prepared"]["uri"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]
    assert sorted(p.name for p in entry.iterdir()) == sorted((*prepare_mod.FILES, "COMMITTED"))



def _killed(x: int) -> int:
    import os
    import signal

    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return x


def test_worker_processes_keep_order_and_a_dead_one_is_an_error() -> None:
    from sft_job.errors import TransientError

    assert list(stream.ordered_map(_killed, [(i,) for i in range(10) if i != 3], 2)) == \
        [i for i in range(10) if i != 3]
    with pytest.raises(TransientError, match="data worker process died"):
        list(stream.ordered_map(_killed, [(i,) for i in range(10)], 2))
