"""The bad-input corpus: one `Case` per line of CASES (add a case by adding a line).

Every case runs the real CLI (`python -m sft_job validate|run`) as a subprocess from a folder of
its own, `{d}`: the spec is written to `{d}/job.yaml`, good data to `{d}/train.jsonl`, a previous
run's unfinished output (no `_SUCCESS`) to `{d}/out` and to `s3://runs/{id}/` on a moto server.
`spec` is merged into BASE (a None value deletes the key), or replaces the whole file when it
is text/bytes; `files` writes the case's bad files; `{d}` and `{id}` are filled in everywhere.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "name": "bad-input",
    "model": {"base": "builtin:tiny-llama"},
    "data": {"train": "{d}/train.jsonl", "max_length": 64},
    "train": {"max_steps": 1, "batch_size": 2, "logging_steps": 1},
    "eval": {"num_samples": 0},
    "backend": "cpu",
    "output": {"uri": "{d}/out"},
}
GOOD = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
LONG = "word " * 200
MISSING_BUCKET = "s3://no-such-bucket-badinput"


@dataclass
class Ctx:
    """What a case's `files` function gets: its folder, the moto client, the builtin model."""

    d: Path
    id: str
    s3: Any
    tiny: Path


@dataclass(frozen=True)
class Case:
    id: str
    code: int
    needles: tuple[str, ...] = ()  # each must be in the one `error:` line (or stdout if code 0)
    spec: dict[str, Any] | str | bytes | None = None
    files: Callable[[Ctx], None] | None = None
    cmd: str = "validate"
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str | None], ...] = ()  # None unsets the variable
    heavy: bool = False  # loads a tokenizer/torch (the full pass), seconds more
    spec_path: str = "{d}/job.yaml"
    before_model: bool = False  # `run` must fail before it resolves the model
    hub: bool = False  # talks to the fake Hub (tests/fake_hub.py), HF_HUB_OFFLINE=0
    xfail: str | None = None  # a known gap in code outside the data/preflight layer: "BUG: ..."

    def __str__(self) -> str:
        return self.id


# ------------------------------------------------------------------ writers


def lines(*rows: Any, name: str = "train.jsonl") -> Callable[[Ctx], None]:
    """Write rows as JSON Lines; a str row is written verbatim, bytes too (no newline added)."""

    def write(c: Ctx) -> None:
        out = b""
        for r in rows:
            out += r if isinstance(r, bytes) else (
                (r if isinstance(r, str) else json.dumps(r)) + "\n").encode()
        (c.d / name).write_bytes(out)

    return write


def raw(name: str, data: bytes | str) -> Callable[[Ctx], None]:
    def write(c: Ctx) -> None:
        p = c.d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return write


def both(*fns: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def write(c: Ctx) -> None:
        for f in fns:
            f(c)

    return write


def huge_line(c: Ctx) -> None:
    """A 50 MB single line between good rows (written in the test's tmp folder, never committed)."""
    with (c.d / "train.jsonl").open("wb") as f:
        f.write((json.dumps(GOOD[0]) + "\n").encode())
        f.write(b'{"prompt": "big", "response": "' + b"x" * 50_000_000 + b'"}\n')
        f.write((json.dumps(GOOD[1]) + "\n").encode())


def truncated_parquet(c: Ctx) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(GOOD), buf)
    (c.d / "train.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def model_copy(drop: tuple[str, ...] = (), no_template_no_pad: bool = False
               ) -> Callable[[Ctx], None]:
    """{d}/model: a copy of the builtin tiny Llama without some files (or its chat template
    and pad token, like GPT-2's tokenizer)."""

    def write(c: Ctx) -> None:
        dest = c.d / "model"
        shutil.copytree(c.tiny, dest)
        for pattern in drop:
            for p in dest.glob(pattern):
                p.unlink()
        if no_template_no_pad:
            (dest / "chat_template.jinja").unlink(missing_ok=True)
            cfg = json.loads((dest / "tokenizer_config.json").read_text())
            cfg.pop("pad_token", None)
            cfg.pop("chat_template", None)
            (dest / "tokenizer_config.json").write_text(json.dumps(cfg))

    return write


def s3_put(key: str, body: bytes | str, bucket: str = "data") -> Callable[[Ctx], None]:
    def write(c: Ctx) -> None:
        c.s3.put_object(Bucket=bucket, Key=key.format(id=c.id),
                        Body=body.encode() if isinstance(body, str) else body)

    return write


def gz(rows: list[dict[str, Any]]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


CHAT_OK = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help?"}]}
ALPACA = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a color.", "input": "", "output": "Blue."}]
NO_CREDS = (("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"), ("AWS_CONFIG_FILE", "/nonexistent"))
CUDA = {"backend": "cuda"}

# ------------------------------------------------------------------ the corpus

CASES: list[Case] = [
    # --- the spec file itself
    Case("yaml-syntax", 2, ("job.yaml:3:1: invalid YAML", "flow sequence at line 2"),
         "name: x\nmodel: [unclosed\n"),
    Case("yaml-tab-indent", 2, ("job.yaml:", "invalid YAML"), "name: x\nmodel:\n\tbase: y\n"),
    Case("spec-is-a-list", 2, ("job.yaml", "a job spec is a YAML mapping, got list"),
         "- name: x\n- model: y\n"),
    Case("spec-empty", 2, ("job.yaml", "name: required field missing"), ""),
    Case("spec-not-utf8", 2, ("job.yaml", "not UTF-8"), b"name: caf\xe9\n"),
    Case("spec-missing", 2, ("{d}/nope.yaml: spec file not found",), spec_path="{d}/nope.yaml"),
    Case("unknown-top-key", 2, ("epochs: unknown key",), {"epochs": 3}),
    Case("unknown-nested-key", 2, ("data.max_len: unknown key",), {"data": {"max_len": 64}}),
    Case("wrong-type-int", 2, ("train.batch_size",), {"train": {"batch_size": "eight"}}),
    Case("wrong-type-section", 2, ("data: Input should be",), {"data": "train.jsonl"}),
    Case("wrong-type-bool", 2, ("data.packing",), {"data": {"packing": "maybe"}}),
    Case("negative-lr", 2, ("train.learning_rate", "greater than 0"),
         {"train": {"learning_rate": -0.001}}),
    Case("zero-batch", 2, ("train.batch_size", "greater than 0"), {"train": {"batch_size": 0}}),
    Case("zero-epochs", 2, ("train.epochs", "greater than 0"), {"train": {"epochs": 0}}),
    Case("negative-max-length", 2, ("data.max_length",), {"data": {"max_length": -1}}),
    Case("zero-lora-rank", 2, ("method.r",), {"method": {"r": 0}}),
    Case("eval-fraction-too-big", 2, ("data.eval_fraction",), {"data": {"eval_fraction": 0.9}}),
    Case("missing-output", 2, ("output: required field missing",), {"output": None}),
    Case("bad-job-name", 2, ("name: String should match pattern",), {"name": "My Job!"}),
    Case("wrong-format-name", 2, ("data.format",), {"data": {"format": "alpacca"}}),
    Case("wrong-method-kind", 2, ("method.kind",), {"method": {"kind": "qlorra"}}),
    Case("qlora-with-zero3", 2, ("ZeRO-3 cannot shard",),
         {**CUDA, "method": {"kind": "qlora"}, "deepspeed": "zero3"}),
    Case("deepspeed-on-cpu", 2, ("deepspeed: DeepSpeed is for GPUs",), {"deepspeed": "zero2"}),
    Case("eval-file-and-fraction", 2, ("data.eval_fraction: give either",),
         {"data": {"eval": "{d}/train.jsonl", "eval_fraction": 0.1}}),
    Case("packing-with-remote-code", 2, ("data.packing", "trust_remote_code"),
         {"model": {"trust_remote_code": True}}),
    Case("set-without-equals", 2, ("--set 'train.epochs'", "key.path=value"),
         args=("--set", "train.epochs")),
    Case("set-unknown-key", 2, ("train.epoch: unknown key",), args=("--set", "train.epoch=1")),
    Case("set-into-a-value", 2, ("--set 'name.x=1'", "not a section"), args=("--set", "name.x=1")),
    Case("env-var-unset", 2, ("SFT_BADINPUT_UNSET", "not set"),
         {"output": {"uri": "${SFT_BADINPUT_UNSET}"}}),
    Case("deepspeed-json-missing", 2, ("deepspeed: {d}/ds.json not found",),
         {**CUDA, "deepspeed": "{d}/ds.json"}),
    Case("deepspeed-json-invalid", 2, ("deepspeed: {d}/ds.json:1: invalid JSON",),
         {**CUDA, "deepspeed": "{d}/ds.json"}, raw("ds.json", "{bad")),
    Case("trainer-unknown-field", 2, ("trainer.learning_rte: not a pass-through field",),
         {"trainer": {"learning_rte": 1}}),
    Case("builtin-unknown", 2, ("model.base", "unknown builtin model 'builtin:tiny-mistral'"),
         {"model": {"base": "builtin:tiny-mistral"}}),
    # --- URIs
    Case("data-scheme-ftp", 2, ("data.train", "unsupported URI scheme 'ftp://'"),
         {"data": {"train": "ftp://host/train.jsonl"}}),
    Case("output-scheme-http", 2, ("output.uri", "unsupported URI scheme 'http://'"),
         {"output": {"uri": "http://example.com/out"}}),
    Case("model-scheme-ftp", 2, ("model.base", "unsupported URI scheme 'ftp://'"),
         {"model": {"base": "ftp://host/model"}}),
    Case("output-on-the-hub", 2, ("output.uri", "the Hub is not an output location"),
         {"output": {"uri": "hf://org/name"}}),
    Case("s3-without-bucket", 2, ("data.train", "no bucket name"),
         {"data": {"train": "s3:///train.jsonl"}}),
    # --- storage access (exit 3)
    Case("data-bucket-missing", 3, ("data.train", "no-such-bucket-badinput"),
         {"data": {"train": f"{MISSING_BUCKET}/train.jsonl"}}),
    Case("output-bucket-missing", 3, ("output.uri", "no-such-bucket-badinput"),
         {"output": {"uri": f"{MISSING_BUCKET}/out"}}),
    Case("output-is-a-file", 3, ("output.uri", "{d}/out.txt is a file"),
         {"output": {"uri": "{d}/out.txt"}}, raw("out.txt", "keep me")),
    Case("model-bucket-missing", 3, ("model.base", "no-such-bucket-badinput"),
         {"model": {"base": f"{MISSING_BUCKET}/model"}}),
    Case("s3-no-credentials", 3, ("data.train", "credentials"),
         {"data": {"train": "s3://data/{id}/train.jsonl"}},
         s3_put("{id}/train.jsonl", json.dumps(GOOD[0])), env=NO_CREDS),
    # --- data files (exit 2)
    Case("jsonl-bad-line", 2, ("data.train", "{d}/train.jsonl:3: invalid JSON"),
         files=lines(GOOD[0], GOOD[1], '{"prompt": "a", "response": }', GOOD[2])),
    Case("jsonl-line-not-object", 2, ("{d}/train.jsonl:2: expected a JSON object, got list",),
         files=lines(GOOD[0], "[1, 2]", GOOD[2])),
    Case("json-array-cut-short", 2, ("{d}/train.json:", "invalid JSON"),
         {"data": {"train": "{d}/train.json"}},
         raw("train.json", json.dumps(GOOD, indent=1)[:-40])),
    Case("json-not-an-array", 2, ("{d}/train.json", "expected a JSON array of objects, got dict"),
         {"data": {"train": "{d}/train.json"}}, raw("train.json", '{"a": 1, "b": 2}')),
    Case("wrong-field-names", 2, ("{d}/train.jsonl", "cannot detect the data format",
                                  "['answer', 'question']"),
         files=lines(*[{"question": r["prompt"], "answer": r["response"]} for r in GOOD])),
    Case("format-named-wrongly", 2, ("data.format is 'chat'", "['prompt', 'response']"),
         {"data": {"format": "chat"}}),
    Case("field-missing", 2, ("{d}/train.jsonl:2: missing field 'response'",),
         files=lines(GOOD[0], {"prompt": "no answer"}, *GOOD[2:])),
    Case("field-empty", 2, ("{d}/train.jsonl:2: empty 'response'",),
         files=lines(GOOD[0], {"prompt": "q", "response": "  "}, *GOOD[2:])),
    Case("field-null", 2, ("{d}/train.jsonl:2: missing field 'prompt'",),
         files=lines(GOOD[0], {"prompt": None, "response": "a"}, *GOOD[2:])),
    Case("field-not-a-string", 2, ("{d}/train.jsonl:2: field 'response' must be a string",),
         files=lines(GOOD[0], {"prompt": "q", "response": 42}, *GOOD[2:])),
    Case("not-utf8", 2, ("{d}/train.jsonl:2: not UTF-8",),
         files=lines(GOOD[0], '{"prompt": "caf\xe9", "response": "ok"}'.encode("latin-1") + b"\n")),
    Case("gzip-named-jsonl", 2, ("{d}/train.jsonl", "not UTF-8"), files=raw("train.jsonl", gz(GOOD))),
    Case("line-of-50mb", 2, ("{d}/train.jsonl:2: line is 50 MB",), files=huge_line),
    Case("empty-file", 2, ("{d}/train.jsonl: file is empty",), files=raw("train.jsonl", "")),
    Case("blank-lines-only", 2, ("{d}/train.jsonl: no rows",), files=raw("train.jsonl", "\n \n\n")),
    Case("html-page", 2, ("{d}/train.jsonl", "HTML"),
         files=raw("train.jsonl", "<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")),
    Case("xml-error-page", 2, ("{d}/train.json", "HTML/XML"), {"data": {"train": "{d}/train.json"}},
         raw("train.json", '<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>')),
    Case("unknown-extension", 2, ("{d}/train.txt", "unsupported data file type '.txt'"),
         {"data": {"train": "{d}/train.txt"}}, raw("train.txt", "hello\n")),
    Case("folder-without-data", 2, ("{d}/shards", "no data files"),
         {"data": {"train": "{d}/shards"}}, raw("shards/README.md", "nothing here")),
    Case("data-file-missing", 2, ("data.train", "{d}/nope.jsonl: no such file"),
         {"data": {"train": "{d}/nope.jsonl"}}),
    Case("csv-ragged-long-row", 2, ("{d}/train.csv:3: more values than header columns",),
         {"data": {"train": "{d}/train.csv"}},
         raw("train.csv", "prompt,response\nHi,Hello\nA,B,C\nQ,R\n")),
    Case("csv-ragged-short-row", 2, ("{d}/train.csv:2: missing field 'response'",),
         {"data": {"train": "{d}/train.csv"}}, raw("train.csv", "prompt,response\nHi\nA,B\n")),
    Case("parquet-truncated", 2, ("{d}/train.parquet", "not a readable Parquet file"),
         {"data": {"train": "{d}/train.parquet"}}, truncated_parquet),
    Case("eval-in-another-format", 2, ("data.eval", "{d}/eval.jsonl:1: missing field 'prompt'"),
         {"data": {"eval": "{d}/eval.jsonl"}}, lines(*ALPACA, name="eval.jsonl")),
    Case("eval-file-missing", 2, ("data.eval", "{d}/nope.jsonl: no such file"),
         {"data": {"eval": "{d}/nope.jsonl"}}),
    Case("chat-bad-role", 2, ("{d}/train.jsonl:2: messages[0].role",),
         files=lines(CHAT_OK, {"messages": [{"role": "bot", "content": "x"},
                                            {"role": "assistant", "content": "y"}]})),
    Case("chat-ends-with-user", 2, ("{d}/train.jsonl:2:", "last message must be from the assistant"),
         files=lines(CHAT_OK, {"messages": [{"role": "user", "content": "x"}]})),
    Case("chat-messages-not-a-list", 2, ("{d}/train.jsonl:1:", "non-empty list"),
         {"data": {"format": "chat"}}, lines({"messages": "hello"}, CHAT_OK)),
    Case("every-row-malformed-skip", 2, ("no usable rows", "{d}/train.jsonl:1: missing field"),
         {"data": {"on_malformed": "skip", "format": "prompt-response"}},
         lines({"prompt": "a"}, {"prompt": "b"})),
    Case("empty-bucket-prefix", 2, ("data.train", "s3://data/empty-{id}/", "no object or prefix"),
         {"data": {"train": "s3://data/empty-{id}/"}, "output": {"uri": "s3://runs/{id}"}}),
    Case("bucket-prefix-without-data", 2, ("s3://data/{id}/", "no data files"),
         {"data": {"train": "s3://data/{id}/"}, "output": {"uri": "s3://runs/{id}"}},
         s3_put("{id}/README.md", "not data")),
    Case("bucket-object-is-html", 2, ("train.jsonl", "HTML"),
         {"data": {"train": "s3://data/{id}/train.jsonl"}},
         s3_put("{id}/train.jsonl", "<html><body>403 Forbidden</body></html>")),
    Case("jsonl-nested-too-deeply", 2, ("{d}/train.jsonl:2: invalid JSON (nested too deeply)",),
         files=lines(GOOD[0], "[" * 100_000 + "]" * 100_000, GOOD[1])),
    Case("json-nested-too-deeply", 2, ("{d}/train.json: invalid JSON (nested too deeply)",),
         {"data": {"train": "{d}/train.json"}}, raw("train.json", "[" * 100_000 + "]" * 100_000)),
    Case("jsonl-saved-as-json-bad-line", 2, ("{d}/train.json:3: invalid JSON",),
         {"data": {"train": "{d}/train.json"}}, lines(GOOD[0], GOOD[1], "{oops", name="train.json")),
    Case("lone-surrogate", 2, ("{d}/train.jsonl:2: field 'prompt' holds an invalid character",),
         files=lines(GOOD[0], '{"prompt": "a\\ud800b", "response": "ok"}', GOOD[1])),
    Case("csv-not-utf8", 2, ("{d}/train.csv:3: not UTF-8",), {"data": {"train": "{d}/train.csv"}},
         raw("train.csv", "prompt,response\nHi,Hello\nCaf\xe9,ok\n".encode("latin-1"))),
    Case("datasets-folder-broken", 2, ("{d}/ds", "not a readable datasets folder"),
         {"data": {"train": "{d}/ds"}}, raw("ds/dataset_info.json", "{}"), heavy=True),
    Case("empty-data-uri", 2, ("data.train: String should have at least 1 character",),
         {"data": {"train": ""}}),
    Case("empty-output-uri", 2, ("output.uri: String should have at least 1 character",),
         {"output": {"uri": ""}}),
    Case("json-report-into-a-folder", 2, ("--json {d}/out: cannot write the report",),
         files=raw("train.jsonl", "{oops\n"), args=("--json", "{d}/out")),
    Case("gcs-data-bucket-missing", 3, ("data.train", "gs://no-such-bucket-badinput"),
         {"data": {"train": "gs://no-such-bucket-badinput/train.jsonl"}}),
    Case("gcs-empty-prefix", 2, ("data.train", "gs://gdata/empty-{id}/", "no object or prefix"),
         {"data": {"train": "gs://gdata/empty-{id}/"}}),
    Case("gcs-output-bucket-missing", 3, ("output.uri", "gs://no-such-bucket-badinput"),
         {"output": {"uri": "gs://no-such-bucket-badinput/out"}}),
    # --- the base model
    Case("model-without-weights", 2, ("model.base", "{d}/model has no weights"),
         {"model": {"base": "{d}/model"}}, model_copy(drop=("*.safetensors",))),
    Case("model-without-config", 2, ("model.base", "{d}/model has no config.json"),
         {"model": {"base": "{d}/model"}}, model_copy(drop=("config.json",))),
    Case("model-folder-missing", 2, ("model.base", "{d}/model: no such model directory"),
         {"model": {"base": "{d}/model"}}),
    Case("bucket-model-without-weights", 2, ("model.base", "s3://models/{id}", "no weights"),
         {"model": {"base": "s3://models/{id}"}},
         s3_put("{id}/config.json", "{}", bucket="models")),
    # --- what only the tokenizer shows (the full pass)
    Case("every-row-too-long", 2, ("data.max_length", "every row is longer than"),
         {"data": {"max_length": 32}},
         lines(*[{"prompt": "Hi", "response": LONG} for _ in range(4)]), heavy=True),
    Case("every-prompt-too-long", 2, ("data.max_length", "every row's prompt fills"),
         {"data": {"max_length": 32}},
         lines(*[{"prompt": LONG, "response": "ok"} for _ in range(4)]), heavy=True),
    Case("hub-model-not-cached", 3, ("model.base", "no-such-org/no-such-model",
                                     "not in the local Hugging Face cache"),
         {"model": {"base": "no-such-org/no-such-model"}}),
    Case("hub-model-missing", 3, ("model.base", "no-such-org/no-such-model", "no such model"),
         {"model": {"base": "hf://no-such-org/no-such-model"}}, hub=True),
    Case("hub-id-invalid", 2, ("model.base", "'org/na me' is not a Hub model id"),
         {"model": {"base": "org/na me"}}),
    # --- these must WORK
    Case("bom-csv-and-jsonl", 0, ("data     prompt-response format, 8 rows, 8 usable",
                                  "eval     prompt-response format, 2 rows, 2 usable", "OK"),
         {"data": {"train": "{d}/train.csv", "eval": "{d}/eval.jsonl"}},
         both(raw("train.csv", "\ufeffprompt,response\n" + "".join(
             f"{r['prompt']},{r['response']}\n" for r in GOOD)),
             raw("eval.jsonl", "\ufeff" + "".join(json.dumps(r) + "\n" for r in GOOD[:2]))),
         heavy=True),
    Case("chat-with-no-template-no-pad", 0, (
        "tokenizer eos '<|endoftext|>', pad '<|endoftext|>' (= EOS",
        "chat template: ChatML (the tokenizer has none)", "<|im_start|>assistant", "OK"),
         {"model": {"base": "{d}/model"}}, args=("--samples", "1"),
         files=both(model_copy(no_template_no_pad=True), lines(CHAT_OK, CHAT_OK)), heavy=True),
    # --- `sft-job run`: the same checks fail the job before any model is loaded
    Case("run-yaml-syntax", 2, ("job.yaml:3:1: invalid YAML",), "name: x\nmodel: [unclosed\n",
         cmd="run"),
    Case("run-unknown-key", 2, ("data.max_len: unknown key",), {"data": {"max_len": 64}},
         cmd="run"),
    Case("run-output-is-a-file", 3, ("output.uri", "is a file"), {"output": {"uri": "{d}/out.txt"}},
         raw("out.txt", "keep me"), cmd="run"),
    Case("run-output-bucket-missing", 3, ("no-such-bucket-badinput",),
         {"output": {"uri": f"{MISSING_BUCKET}/out"}}, cmd="run"),
    Case("run-jsonl-bad-line", 2, ("{d}/train.jsonl:3: invalid JSON",),
         files=lines(GOOD[0], GOOD[1], "{oops", GOOD[2]), cmd="run", before_model=True),
    Case("run-model-without-weights", 2, ("{d}/model has no weights",),
         {"model": {"base": "{d}/model"}}, model_copy(drop=("*.safetensors",)), cmd="run",
         before_model=True),
    Case("run-empty-bucket-prefix", 2, ("s3://data/empty-{id}/", "no object or prefix"),
         {"data": {"train": "s3://data/empty-{id}/"}, "output": {"uri": "s3://runs/{id}"}},
         cmd="run", before_model=True),
    Case("run-eval-in-another-format", 2, ("data.eval", "{d}/eval.jsonl:1: missing field"),
         {"data": {"eval": "{d}/eval.jsonl"}}, lines(*ALPACA, name="eval.jsonl"), cmd="run",
         before_model=True),
    Case("run-hub-model-missing", 3, ("no-such-org/no-such-model", "no such model"),
         {"model": {"base": "no-such-org/no-such-model"}}, hub=True, cmd="run",
         before_model=True),
    Case("run-every-row-too-long", 2, ("every row is longer than data.max_length=32",),
         {"data": {"max_length": 32}},
         lines(*[{"prompt": "Hi", "response": LONG} for _ in range(4)]), cmd="run", heavy=True),
]
