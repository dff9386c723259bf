"""Hostile and careless input (issue 15): one family per block, several members each, so the
rule behind each fix is what is tested, not one example. Appended to cases.CASES.

Families: the trainer pass-through; non-finite and out-of-range numbers; output overlapping an
input or a cache; an output leased by another run; YAML that expands, nests or weighs too much
(and merge keys, which must work); credentials in a spec; malformed interpolation and bad Hub
ids; model files that are corrupt, empty, of another architecture or shape, or a refused
pickle; LoRA targets that do not exist; output paths that cannot be created; bucket names and
endpoints the clients reject; optional packages asked for but not installed.
test_badinput.py runs ALL_CASES (cases.CASES and these).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

from tests.badinput.cases import CASES, GOOD, Case, Ctx, both, lines, model_copy, raw, s3_put

INF, NAN = float("inf"), float("nan")
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"  # AWS's documented example secret


def lease_file(where: str) -> Callable[[Ctx], None]:
    """A fresh lease of another job on the case's output ({d}/out or s3://runs/<id>/)."""

    def write(c: Ctx) -> None:
        body = json.dumps({"owner": "f00d", "job": "someone-elses-job", "run_hash": "1" * 16,
                           "host": "other-host", "pid": 4242, "started": "2026-12-01T00:00:00Z",
                           "heartbeat": time.time(), "timeout_s": 120})
        if where == "s3":
            c.s3.put_object(Bucket="runs", Key=f"{c.id}/_LEASE", Body=body.encode())
        else:
            (c.d / "out" / "_LEASE").write_text(body)

    return write


def config_edit(**changes: Any) -> Callable[[Ctx], None]:
    """{d}/model: the tiny Llama with config.json fields changed (None deletes one)."""

    def write(c: Ctx) -> None:
        model_copy()(c)
        p = c.d / "model" / "config.json"
        cfg = json.loads(p.read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        p.write_text(json.dumps(cfg))

    return write


def weights(data: bytes | Callable[[bytes], bytes], name: str = "model.safetensors"
            ) -> Callable[[Ctx], None]:
    """{d}/model with its weights file replaced by `data` (or data(original bytes))."""

    def write(c: Ctx) -> None:
        model_copy()(c)
        p = c.d / "model" / "model.safetensors"
        body = data(p.read_bytes()) if callable(data) else data
        p.unlink()
        (c.d / "model" / name).write_bytes(body)

    return write


def hide(*modules: str) -> Callable[[Ctx], None]:
    """A sitecustomize on PYTHONPATH={d}/hide that makes `modules` not importable."""
    return raw("hide/sitecustomize.py",
               "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))


def bigger_tokenizer(c: Ctx) -> None:
    """{d}/tok: the tiny model's tokenizer with 100 tokens more than its embedding has rows."""
    from tokenizers import Tokenizer

    shutil.copytree(c.tiny, c.d / "tok")
    tok = Tokenizer.from_file(str(c.d / "tok" / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    tok.save(str(c.d / "tok" / "tokenizer.json"))


def finished_run_of(**train: Any) -> Callable[[Ctx], None]:
    """{d}/out holds a finished run (_SUCCESS) of the case's spec with `train` changed."""

    def write(c: Ctx) -> None:
        from sft_job.spec import JobSpec, dump_spec
        from tests.badinput.cases import BASE

        doc = json.loads(json.dumps(BASE).replace("{d}", str(c.d)))
        doc["train"] = {**doc["train"], **train}
        (c.d / "out" / "job.yaml").write_text(dump_spec(JobSpec.model_validate(doc)))
        (c.d / "out" / "_SUCCESS").write_text("")

    return write


def data_shards(c: Ctx) -> None:
    shards = c.d / "shards"
    shards.mkdir()
    shutil.copyfile(c.d / "train.jsonl", shards / "part-0.jsonl")


BOMB = "name: x\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
MERGE = ("x-train: &t {max_steps: 1, batch_size: 2, logging_steps: 1}\n"
         "name: merged\nmodel: {base: 'builtin:tiny-llama'}\n"
         "data: {train: '{d}/train.jsonl', max_length: 64}\n"
         "train:\n  <<: *t\n  batch_size: 1\neval: {num_samples: 0}\nbackend: cpu\n"
         "output: {uri: '{d}/out-merged'}\n")
NO_DS = (("PYTHONPATH", "{d}/hide"), ("SFT_JOB_DEEPSPEED_ON_CPU", "1"))

HOSTILE: list[Case] = [
    # --- 1. trainer: pass-through publishes, writes or reports nothing the spec did not say
    Case("trainer-push-to-hub", 2, ("trainer.push_to_hub: set by the spec", "output.push_to_hub",
                                    "trainer.hub_model_id", "trainer.hub_private_repo"),
         {"trainer": {"push_to_hub": True, "hub_model_id": "someone/else",
                      "hub_private_repo": False}}, cmd="run", before_model=True),
    Case("trainer-output-dir", 2, ("trainer.output_dir", "use output.uri"),
         {"trainer": {"output_dir": "/tmp/anywhere"}}),
    Case("trainer-report-to", 2, ("trainer.report_to", "use train.report_to",
                                  "trainer.run_name"),
         {"trainer": {"report_to": ["wandb"], "run_name": "x"}}),
    Case("trainer-logging-dir", 2, ("trainer.logging_dir", "use train.report_to"),
         {"trainer": {"logging_dir": "/tmp/tb"}}),
    Case("trainer-overrides-plan", 2, ("trainer.max_steps", "use train.max_steps",
                                       "trainer.learning_rate", "use train.learning_rate"),
         {"trainer": {"max_steps": 1000, "learning_rate": 1.0}}, cmd="run", before_model=True),
    Case("trainer-hub-token", 2, ("trainer.hub_token", "HF_TOKEN"), {"trainer": {"hub_token": "x"}}),
    Case("trainer-optimizer-missing-package", 2, ("trainer.optim", "galore_adamw",
                                                  "not installed"),
         {"trainer": {"optim": "galore_adamw"}}),
    Case("trainer-bad-optim-args", 2, ("trainer.optim", "cannot build the optimizer"),
         {"trainer": {"optim": "adamw_torch", "optim_args": "no-equals-sign"}}, cmd="run",
         before_model=True),
    Case("trainer-bad-scheduler-kwargs", 2, ("trainer.lr_scheduler_kwargs",),
         {"trainer": {"lr_scheduler_kwargs": {"no_such_argument": 1}}}),
    Case("trainer-non-finite", 2, ("trainer.adam_epsilon", "finite"),
         {"trainer": {"adam_epsilon": INF}}),
    # --- 2. every number finite and in range; training stops on NaN (tests/e2e/test_hostile.py)
    Case("lr-infinite", 2, ("train.learning_rate", "finite number"),
         {"train": {"learning_rate": INF}}),
    Case("epochs-infinite", 2, ("train.epochs", "finite number"), {"train": {"epochs": INF}},
         cmd="run", before_model=True),
    Case("warmup-nan", 2, ("train.warmup_ratio", "finite number"),
         {"train": {"warmup_ratio": NAN}}),
    Case("save-minutes-infinite", 2, ("output.save_every_minutes", "finite"),
         {"output": {"save_every_minutes": INF}}),
    Case("lr-inf-by-set", 2, ("train.learning_rate", "finite"),
         args=("--set", "train.learning_rate=.inf")),
    Case("lr-absurd", 2, ("train.learning_rate", "less than or equal to 10"),
         {"train": {"learning_rate": 1e6}}),
    Case("seed-negative", 2, ("train.seed", "greater than or equal to 0"), {"train": {"seed": -1}},
         cmd="run", before_model=True),
    Case("max-length-huge", 2, ("data.max_length",), {"data": {"max_length": 10**11}}),
    Case("max-new-tokens-huge", 2, ("eval.max_new_tokens",), {"eval": {"max_new_tokens": 10**11}}),
    # --- 3. output never overlaps an input (paths and bucket prefixes alike) or a cache
    Case("output-contains-model-and-data", 2, ("output.uri", "model.base", "overlap"),
         {"model": {"base": "{d}/model"}, "output": {"uri": "{d}"}}, model_copy(), cmd="run",
         before_model=True),
    Case("output-is-the-model-folder", 2, ("output.uri", "model.base", "overlap"),
         {"model": {"base": "{d}/model"}, "output": {"uri": "{d}/model/"}}, model_copy()),
    Case("output-inside-data-folder", 2, ("output.uri", "data.train", "overlap"),
         {"data": {"train": "{d}/shards"}, "output": {"uri": "{d}/shards/out"}}, data_shards,
         cmd="run", before_model=True),
    Case("output-dotdot-onto-data", 2, ("output.uri", "data.train", "overlap"),
         {"data": {"train": "{d}/shards/part-0.jsonl"}, "output": {"uri": "{d}/shards/x/.."}},
         data_shards),
    Case("output-bucket-prefix-holds-data", 2, ("output.uri", "s3://data/{id}", "overlap"),
         {"data": {"train": "s3://data/{id}/train.jsonl"}, "output": {"uri": "s3://data/{id}"}},
         s3_put("{id}/train.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD))),
    Case("output-inside-model-cache", 2, ("output.uri", "model cache", "overlap"),
         {"output": {"uri": "${SFT_JOB_CACHE}/out"}}),
    # --- 4. a run owns its output: another live run's lease refuses the job, untouched
    Case("output-leased-by-another-run", 2, ("in use by another run", "someone-elses-job",
                                             "other-host"),
         files=lease_file("local"), cmd="run", before_model=True),
    Case("output-holds-another-specs-finished-run", 2, ("output.uri", "finished run of another "
                                                        "spec", "train.learning_rate"),
         files=finished_run_of(learning_rate=0.5), cmd="run", before_model=True),
    Case("s3-output-leased-by-another-run", 2, ("in use by another run", "someone-elses-job"),
         {"output": {"uri": "s3://runs/{id}"}}, lease_file("s3"), cmd="run", before_model=True),
    # --- 5. YAML: bounded expansion, nesting and size; merge keys work
    Case("yaml-alias-bomb", 2, ("job.yaml", "expands to more than"), BOMB),
    Case("yaml-alias-bomb-run", 2, ("expands to more than",), BOMB, cmd="run"),
    Case("yaml-nested-deep", 2, ("job.yaml", "YAML"), "name: x\nmodel: " + "[" * 50_000),
    Case("yaml-too-big", 2, ("job.yaml", "at most 1,048,576"),
         "name: x\n" + "# padding\n" * 120_000),
    Case("yaml-merge-key", 0, ("OK: the job would run",), MERGE, heavy=True),
    # --- 7. credentials never reach a spec (nor job.yaml, samples.md, the card, the Hub)
    Case("env-credential-in-prompt", 2, ("eval.prompts[0]", "AWS_SECRET_ACCESS_KEY",
                                         "credential"),
         {"eval": {"prompts": ["${AWS_SECRET_ACCESS_KEY}"]}}, cmd="run", before_model=True),
    Case("env-hf-token-in-name-default", 2, ("output.uri", "HF_TOKEN", "credential"),
         {"output": {"uri": "{d}/${NOPE:-${HF_TOKEN}}"}}),
    Case("env-openai-key", 2, ("OPENAI_API_KEY", "credential"),
         {"eval": {"prompts": ["key: ${OPENAI_API_KEY:-none}"]}}),
    Case("env-any-secret-name", 2, ("MY_SERVICE_PASSWORD", "credential"),
         {"data": {"train": "{d}/${MY_SERVICE_PASSWORD}.jsonl"}}),
    Case("secret-value-by-set", 2, ("eval.prompts[0]", "value of the credential variable "
                                    "AWS_SECRET_ACCESS_KEY"),
         args=("--set", f"eval.prompts=[{SECRET}]"), env=(("AWS_SECRET_ACCESS_KEY", SECRET),),
         cmd="run"),
    # --- 8. interpolation, Hub ids and options validated up front
    Case("env-nested-default-unset", 2, ("output.uri", "SFT_BADINPUT_UNSET_B", "not set"),
         {"output": {"uri": "${SFT_BADINPUT_UNSET_A:-${SFT_BADINPUT_UNSET_B}/x}"}}),
    Case("env-unterminated", 2, ("output.uri", "${PWD", "must end with"),
         {"output": {"uri": "${PWD"}}),
    Case("env-bad-name", 2, ("${' must be followed by a variable name",),
         {"eval": {"prompts": ["costs ${5}"]}}),
    Case("env-broken-in-flow", 2, ("job.yaml:2", "${OUT"),
         "name: x\noutput: {uri: ${OUT/x}\n"),
    Case("push-to-hub-dotdot", 2, ("output.push_to_hub", "'../evil' is not a Hub repo id"),
         {"output": {"push_to_hub": "../evil"}}),
    Case("push-to-hub-three-parts", 2, ("output.push_to_hub", "not a Hub repo id"),
         {"output": {"push_to_hub": "a/b/c"}}),
    Case("samples-negative", 2, ("--samples",), args=("--samples", "-5")),
    Case("memory-will-not-fit", 2, ("resources.accelerator", "will not fit"),
         {"resources": {"accelerator": "nvidia-t4"}, "train": {"batch_size": 4096},
          "data": {"max_length": 8192}}, heavy=True),
    # --- 9a. model files: corrupt, empty, another kind or shape, a refused pickle
    Case("model-weights-empty", 2, ("model.base", "model.safetensors is empty"),
         {"model": {"base": "{d}/model"}}, weights(b"")),
    Case("model-weights-truncated", 2, ("model.base", "model.safetensors"),
         {"model": {"base": "{d}/model"}}, weights(lambda b: b[: len(b) // 2]), cmd="run",
         before_model=True),
    Case("model-weights-random-bytes", 2, ("model.base", "not a safetensors file"),
         {"model": {"base": "{d}/model"}}, weights(bytes(range(256)) * 40)),
    Case("model-config-not-json", 2, ("model.base", "config.json is not valid JSON"),
         {"model": {"base": "{d}/model"}}, both(model_copy(), raw("model/config.json", "{oops"))),
    Case("model-config-a-list", 2, ("model.base", "config.json holds a list"),
         {"model": {"base": "{d}/model"}}, both(model_copy(), raw("model/config.json", "[1]"))),
    Case("model-config-no-type", 2, ("model.base", "no model_type"),
         {"model": {"base": "{d}/model"}}, config_edit(model_type=None)),
    Case("model-type-unknown", 2, ("model.base", "nonesuch"),
         {"model": {"base": "{d}/model"}}, config_edit(model_type="nonesuch"), heavy=True),
    Case("model-index-names-missing-shard", 2, ("model.base", "missing shard"),
         {"model": {"base": "{d}/model"}},
         both(model_copy(), raw("model/model.safetensors.index.json",
                                '{"weight_map": {"a": "model-00002-of-00002.safetensors"}}'))),
    Case("run-model-another-architecture", 2, ("model.base", "are not in its files"),
         {"model": {"base": "{d}/model"}},
         config_edit(model_type="bert", architectures=["BertModel"]), cmd="run", heavy=True),
    Case("run-model-shapes-mismatch", 2, ("model.base", "shapes of its weights do not match"),
         {"model": {"base": "{d}/model"}}, config_edit(hidden_size=128), cmd="run", heavy=True),
    Case("run-model-pickle-refused", 2, ("model.base", "UnpicklingError"),
         {"model": {"base": "{d}/model"}},
         weights(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system"
                 b"\x94\x93\x94.", name="pytorch_model.bin"), cmd="run", heavy=True),
    Case("run-tokenizer-bigger-than-model", 2, ("model.tokenizer", "embedding has 1024 rows"),
         {"model": {"tokenizer": "{d}/tok"}}, bigger_tokenizer, cmd="run", heavy=True),
    # --- 9b. LoRA targets that do not exist, or are not layers LoRA can adapt
    Case("run-target-modules-missing", 2, ("method.target_modules", "'nonesuch' matches no layer",
                                           "q_proj"),
         {"method": {"target_modules": ["nonesuch"]}, "output": {"uri": "{d}/fresh"}}, cmd="run",
         heavy=True),
    Case("run-target-modules-norm", 2, ("method.target_modules", "LlamaRMSNorm"),
         {"method": {"target_modules": ["norm"]}, "output": {"uri": "{d}/fresh"}}, cmd="run",
         heavy=True),
    Case("target-modules-empty", 2, ("method.target_modules",),
         {"method": {"target_modules": []}}),
    # --- 9c. output paths that cannot be created: exit 3 (access), never a traceback
    Case("output-parent-is-a-file", 3, ("output.uri", "is a file"),
         {"output": {"uri": "{d}/afile/out"}}, raw("afile", "x")),
    Case("run-output-parent-is-a-file", 3, ("output.uri", "is a file"),
         {"output": {"uri": "{d}/afile/out"}}, raw("afile", "x"), cmd="run"),
    Case("output-in-proc", 3, ("output.uri", "/proc/sft-job-out"),
         {"output": {"uri": "/proc/sft-job-out"}}),
    Case("output-in-sys", 3, ("output.uri", "/sys/sft-job-out"),
         {"output": {"uri": "/sys/sft-job-out/x"}}),
    Case("output-nul-byte", 2, ("output.uri", "control character"),
         {"output": {"uri": "{d}/a\x00b"}}),
    Case("output-name-too-long", 2, ("output.uri", "path too long"),
         {"output": {"uri": "{d}/" + "x" * 300}}),
    Case("workdir-is-a-file", 3, ("SFT_JOB_WORKDIR",), files=raw("wfile", "x"), cmd="run",
         env=(("SFT_JOB_WORKDIR", "{d}/wfile"),)),
    # --- 9d. bucket names and endpoints the clients reject: exit 2
    Case("s3-bucket-name-invalid", 2, ("output.uri", "'Bad_Bucket!' is not a valid s3://"),
         {"output": {"uri": "s3://Bad_Bucket!/x"}}),
    Case("s3-bucket-name-uppercase", 2, ("data.train", "'Data' is not a valid s3://"),
         {"data": {"train": "s3://Data/train.jsonl"}}),
    Case("s3-bucket-name-too-short", 2, ("model.base", "'ab' is not a valid s3://"),
         {"model": {"base": "s3://ab/model"}}),
    Case("gs-bucket-name-invalid", 2, ("output.uri", "is not a valid gs://"),
         {"output": {"uri": "gs://-bad-/x"}}),
    Case("s3-key-too-long", 2, ("output.uri", "longer than 900 bytes"),
         {"output": {"uri": "s3://runs/" + "k/" * 500}}),
    Case("s3-endpoint-not-a-url", 2, ("output.s3_endpoint_url", "not an endpoint URL"),
         {"output": {"uri": "s3://runs/{id}", "s3_endpoint_url": "not a url"}}),
    Case("s3-endpoint-env-invalid", 2, ("AWS_ENDPOINT_URL_S3", "not"),
         {"output": {"uri": "s3://runs/{id}"}}, env=(("AWS_ENDPOINT_URL_S3", "ht!tp://:::"),),
         cmd="run"),
    # --- 9e. optional packages asked for but not installed: exit 2 before anything
    Case("run-deepspeed-not-installed", 2, ("deepspeed", "not installed"),
         {"deepspeed": "zero2"}, hide("deepspeed"), cmd="run", env=NO_DS, before_model=True),
    Case("run-qlora-without-bitsandbytes", 2, ("method.kind", "bitsandbytes", "not installed"),
         {"method": {"kind": "qlora"}}, hide("bitsandbytes"), cmd="run",
         env=(("PYTHONPATH", "{d}/hide"),), before_model=True),
    Case("run-flash-attention-not-installed", 2, ("model.attn_implementation", "flash_attn"),
         {"model": {"attn_implementation": "flash_attention_2"}}, hide("flash_attn"), cmd="run",
         env=(("PYTHONPATH", "{d}/hide"),), before_model=True),
    # --- what must still work
    Case("output-sibling-of-data", 0, ("OK: the job would run",),
         {"output": {"uri": "{d}/out2"}}, lines(*GOOD), heavy=True),
]

ALL_CASES = [*CASES, *HOSTILE]
