"""The job spec: a pydantic model of one fine-tuning job, the only place defaults live.

Validation needs nothing but the document: no file, bucket or network is read here (the
loader, specload.py, reads the spec from a path or bucket). Every problem is reported at once,
each with its dotted field path. Every float is finite, every number bounded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sft_job.specbase import SEED, DeepSpeedField, Location, Strict, hub_repo_problem
from sft_job.spectrainer import TrainerSpec
from sft_job.uri import endpoint_problem

__all__ = ["JobSpec", "Strict", "TrainerSpec", "dump_spec"]

BUILTIN_MODELS = ("builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:smollm2-135m")
# data.* fields that say where and how data is prepared, never what the rows are
DATA_HOW = ("cache_uri", "cache_wait_minutes", "num_proc")
# Fields that change where metrics go or where data is prepared, never the trained model: left
# out of the run hash and of the resume check, so adding a tracker to a preempted run's spec (or
# moving its data cache) still resumes it. Sections left out whole: where outputs go, samples,
# resource hints.
RUN_NEUTRAL: dict[str, Any] = {"train": {"report_to"}, "data": set(DATA_HOW),
                               "output": True, "eval": True, "resources": True}


class ModelSpec(Strict):
    base: Location = Field(
        description="Base model: a Hub id (org/name or hf://org/name), a local directory, an "
        "s3:// or gs:// prefix holding a saved model, a .gguf file (path, bucket URI or "
        "hf://org/name/file.gguf; dequantized once), or builtin:smollm2-135m (a real pretrained "
        "model from a package) / builtin:tiny-llama / builtin:tiny-gpt2 (tiny random models)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: Location | None = Field(None, description="Tokenizer location if not the base's.")
    chat_template: str | None = Field(
        None,
        description="Override the tokenizer's chat template: 'chatml' or a Jinja template. "
        "Tokenizers without one get ChatML for chat data.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "varlen_sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto picks per backend and model: flash_attention_2 on "
        "GPUs that have it, else sdpa; eager on TPU; varlen_sdpa on CPU (per-sample sdpa over "
        "padding-free flattened batches) for the models that support it, else sdpa."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the Hub.")


class DataSpec(Strict):
    train: Location = Field(
        description="Training data: a file (.jsonl, .json, .csv, .parquet), a datasets "
        "save_to_disk directory, or a bucket prefix of shards; hf://datasets/org/name too."
    )
    eval: Location | None = Field(None, description="Separate eval data (same kinds as train).")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Fraction of train held out for eval when no eval file."
    )
    format: Literal["auto", "alpaca", "chat", "prompt-response", "text"] = Field(
        "auto", description="Record format; auto detects it from the fields of the first rows."
    )
    template: Literal["auto", "model", "native"] = Field(
        "auto",
        description="How alpaca and prompt-response rows are rendered. model: through the "
        "tokenizer's chat template, as a user turn and an assistant turn (the format the "
        "shipped model is served with); native: the format's own template (data.alpaca_template, "
        "data.user_token/assistant_token); auto: model when the tokenizer has a chat template "
        "(its own or model.chat_template), else native.",
    )
    alpaca_template: Literal["seed", "stanford"] = Field(
        "seed",
        description="With data.template: native. seed: 'Instruction: ...\\nInput: ...\\nOutput:'; "
        "stanford: the Stanford Alpaca '### Instruction:' preamble template.",
    )
    prompt_field: str = Field("prompt", description="prompt-response: the prompt field name.")
    response_field: str = Field("response", description="prompt-response: the response field.")
    user_token: str = Field("<|user|>", description="prompt-response: role token before prompt.")
    assistant_token: str = Field(
        "<|assistant|>", description="prompt-response: role token before the response."
    )
    text_field: str = Field("text", description="text format: the field holding the text.")
    messages_field: str = Field("messages", description="chat format: the messages field.")
    max_length: int = Field(512, gt=0, le=1 << 20,
                            description="Tokens per sample (and per packed row).")
    packing: bool = Field(
        True, description="Pack samples into rows; samples never attend to each other."
    )
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens (default: loss on responses only)."
    )
    on_malformed: Literal["fail", "skip"] = Field(
        "fail", description="Malformed rows fail the job (default) or are skipped and counted."
    )
    cache_uri: Location | None = Field(
        None,
        description="Where prepared (tokenized, packed) data is kept and looked up: any path or "
        "s3:// / gs:// URI (default <output.uri>/prepared/). Entries are keyed by the data files' "
        "identities, the tokenizer and every data.* field that changes tokens, so runs may share "
        "one prefix: a rerun, a resumed run and every rank load it instead of preparing again.",
    )
    cache_wait_minutes: float = Field(
        60.0, gt=0, le=10_080, description="How long ranks that do not prepare the data wait "
        "for the preparing rank to commit it (then exit 75)."
    )
    num_proc: int | None = Field(
        None, gt=0, le=1024, description="Processes that read and tokenize the data when "
        "preparing it (default: the CPUs of the machine)."
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many rows.")
    seed: int = Field(42, **SEED, description="Seed of the train/eval split and of shuffling.")


class MethodSpec(Strict):
    kind: Literal["full", "lora", "qlora"] = Field("lora", description="Fine-tuning method.")
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: int = Field(32, gt=0, le=1 << 16, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: Literal["all-linear"] | Annotated[
            list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$")]], Field(min_length=1)] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")


class TrainSpec(Strict):
    epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, le=10**9, description="Stop after this many steps.")
    learning_rate: float = Field(2.0e-4, gt=0, le=10.0, description="Peak learning rate.")
    batch_size: int = Field(8, gt=0, le=1 << 16, description="Rows per device per forward pass.")
    grad_accum: int = Field(1, gt=0, le=1 << 16, description="Micro-batches per optimizer step.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Warmup share of the steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (off: end).")
    seed: int = Field(42, **SEED, description="Seed of model init, dropout and data order.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers (default none). tensorboard: event files under "
        "output.uri/metrics/tensorboard/; wandb and mlflow: their usual environment variables "
        "(WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI...). The run name is the "
        "spec name; a resumed run continues the same curves. Each needs its extra: "
        "pip install 'sft-job[tensorboard]' (or wandb, mlflow).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision. auto: bf16 on Ampere+ GPUs and TPU, fp16 on older "
        "GPUs, fp32 on CPU; bf16 on CPU is autocast over fp32 weights, worth it where the CPU has "
        "native bf16 (AVX512_BF16 or AMX). The choice is logged in the plan line and summary.json."
    )


class EvalSpec(Strict):
    prompts: Annotated[list[str], Field(max_length=1000)] | None = Field(
        None,
        description="Fixed prompts generated before and after training into samples.md "
        "(default: the first rows of the eval data, else of train).",
    )
    num_samples: int = Field(3, ge=0, description="Prompts taken from data when none given.")
    max_new_tokens: int = Field(48, gt=0, le=32_768, description="Tokens generated per sample.")


class OutputSpec(Strict):
    uri: Location = Field(
        description="Where every artifact goes: a path, file://, s3:// or gs://. The run owns "
        "it while it runs (a lease object `_LEASE` in it); it may not overlap any input.")
    merge: bool = Field(True, description="Merge LoRA/QLoRA adapters into the base model.")
    push_to_hub: str | None = Field(
        None, description="Hub repo (org/name) to push to; token from HF_TOKEN."
    )
    hub_private: bool = Field(True, description="Create the Hub repo private.")
    hub_push: Literal["merged", "adapter"] = Field(
        "merged", description="What goes to the Hub: the merged model or the adapter."
    )
    save_every_steps: int | None = Field(
        None, gt=0, description="Commit a checkpoint to output.uri every N steps."
    )
    save_every_minutes: float | None = Field(
        None, gt=0, description="Commit a checkpoint at least this often (wall clock)."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Committed checkpoints kept in the bucket.")
    stop_budget_seconds: int = Field(
        25,
        gt=0,
        description="Seconds allowed from SIGTERM to a committed checkpoint; keep it under "
        "the pod's terminationGracePeriodSeconds.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Custom S3 endpoint (S3-compatible stores); else AWS_ENDPOINT_URL_S3."
    )
    lease_timeout_seconds: int = Field(
        120, ge=10, le=86_400,
        description="A run's lease on output.uri (heartbeat every quarter of this) counts as "
        "abandoned after this long without a heartbeat; a rerun of the same job waits for it, "
        "another job is refused at once while it is fresh.",
    )
    progress_every_seconds: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="Write output.uri/progress.json (read by `sft-job status`) at most this often "
        "while training, and at every checkpoint and phase change.",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, url: str | None) -> str | None:
        problem = url is not None and endpoint_problem(url)
        if problem:
            raise ValueError(problem)
        return url


ACCELERATOR_MEMORY_GB = {
    "nvidia-t4": 16, "nvidia-v100-16gb": 16, "nvidia-v100-32gb": 32, "nvidia-l4": 24,
    "nvidia-a10g": 24, "nvidia-a100-40gb": 40, "nvidia-a100-80gb": 80, "nvidia-h100-80gb": 80,
    "nvidia-h200": 141, "tpu-v5e": 16, "cpu": 0,
}


class ResourcesSpec(Strict):
    accelerator: Literal[tuple(ACCELERATOR_MEMORY_GB)] | None = Field(  # type: ignore[valid-type]
        None, description="The accelerator the job will run on, for the memory check of "
        "`sft-job validate` (e.g. nvidia-l4, nvidia-h100-80gb, tpu-v5e)."
    )
    devices: int = Field(1, gt=0, description="Devices (GPUs / TPU chips) in all, for estimates.")
    processes_per_node: int | None = Field(
        None, gt=0, description="Ranks to start on this node (default: one per visible GPU, "
        "1 on CPU and TPU); NPROC_PER_NODE overrides it."
    )


class JobSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="Job name (DNS-ish).")
    model: ModelSpec
    data: DataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    backend: Literal["auto", "cuda", "tpu", "cpu"] = Field(
        "auto", description="Hardware: auto picks cuda, then tpu, then cpu."
    )
    deepspeed: DeepSpeedField = Field(
        "none", validate_default=True,
        description="DeepSpeed ZeRO: none | zero2 | zero3 | zero3-offload | path to a JSON config.",
    )
    output: OutputSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    trainer: TrainerSpec = Field(
        default_factory=lambda: TrainerSpec(),
        description="Pass-through of the trl.SFTConfig fields the spec does not own and that are "
        "safe (optimizer details, compilation, DDP tuning); any other SFTConfig field is refused, "
        "naming the spec field that sets it.",
    )

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> JobSpec:
        # the one input from outside the spec, given by the loader (environment.py)
        on_cpu = bool((info.context or {}).get("deepspeed_on_cpu"))
        problems = combination_problems(self, on_cpu)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def data_cache_uri(self) -> str:
        """Where prepared data is cached: data.cache_uri, else <output.uri>/prepared."""
        from sft_job.uri import join

        return self.data.cache_uri or join(self.output.uri, "prepared")

    def training_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (RUN_NEUTRAL left out): a checkpoint
        made with others is another run's (checkpoint/sync.py refuses to resume from it)."""
        return self.model_dump(mode="json", exclude=RUN_NEUTRAL)

    def result_fields(self) -> dict[str, Any]:
        """The fields that change what the run publishes: the training fields and
        output.merge (whether model/ holds the merged model). A finished run is this spec's
        only when they are equal (pipeline's done check); `run_hash` hashes them."""
        return {**self.training_fields(), "output": {"merge": self.output.merge}}

    def run_hash(self) -> str:
        """Hash of `result_fields` (not where outputs or metrics go)."""
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()
                              ).hexdigest()[:16]


def changed_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted fields that differ between two dumped specs (or parts of them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in changed_fields(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if a != b else []


def combination_problems(spec: JobSpec, deepspeed_on_cpu: bool = False) -> list[str]:
    """Combinations that cannot run, each naming its field and the fix. `deepspeed_on_cpu`:
    the testing switch that lets DeepSpeed run over gloo on CPU (environment.py)."""
    out: list[str] = []
    ds = spec.deepspeed
    if spec.method.kind == "qlora" and spec.backend == "tpu":
        out.append("method.kind: qlora needs bitsandbytes on a CUDA GPU or CPU, not backend: tpu; "
                   "use lora")
    if ds.enabled and spec.backend == "tpu":
        out.append("deepspeed: DeepSpeed does not run on TPU; set deepspeed: none (TPU uses FSDPv2)")
    if ds.enabled and spec.backend == "cpu" and not deepspeed_on_cpu:
        out.append("deepspeed: DeepSpeed is for GPUs; set deepspeed: none with backend: cpu "
                   "(multi-process CPU runs use DDP over gloo)")
    if spec.method.kind == "qlora" and ds.stage == 3:
        out.append("deepspeed: ZeRO-3 cannot shard pre-quantized 4-bit weights; use zero2 or none "
                   "with method.kind: qlora")
    if spec.output.push_to_hub and spec.output.hub_push == "merged" and not spec.output.merge \
            and spec.method.kind != "full":
        out.append("output.hub_push: 'merged' needs output.merge: true (or hub_push: adapter)")
    dup = sorted({t for t in spec.train.report_to if spec.train.report_to.count(t) > 1})
    if dup:
        out.append(f"train.report_to: {', '.join(dup)} listed more than once")
    if spec.data.eval and spec.data.eval_fraction:
        out.append("data.eval_fraction: give either data.eval or data.eval_fraction, not both")
    problem = spec.output.push_to_hub and hub_repo_problem(spec.output.push_to_hub)
    if problem:
        out.append(f"output.push_to_hub: {problem}")
    return out


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as YAML (what lands in output.uri/job.yaml)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def json_schema() -> dict[str, Any]:
    """The JSON schema of a job spec (`sft-job schema`)."""
    return JobSpec.model_json_schema()


def markdown_reference() -> str:
    """Every spec field with its type, default and description (docs/spec.md)."""
    lines = ["# Job spec reference", "",
             "Generated by `sft-job schema --markdown` from `sft_job/spec.py`; do not edit.", ""]
    for section_name, field in JobSpec.model_fields.items():
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is None:
            lines.append(f"- `{section_name}` ({_type_name(ann)}{_default(field)}): "
                         f"{field.description or ''}")
            continue
        lines += ["", f"## `{section_name}`", "", "| field | type | default | description |",
                  "|---|---|---|---|"]
        for name, f in sub.model_fields.items():
            default = ("required" if f.is_required()
                       else f"`{_default(f).removeprefix(', default ')}`".replace("|", "\\|"))
            lines.append(f"| `{section_name}.{name}` | {_type_name(f.annotation)} | {default} | "
                         f"{(f.description or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _type_name(ann: Any) -> str:
    return str(_plain(ann)).replace("typing.", "").replace("<class '", "").replace(
        "'>", "").replace("|", "or")


def _plain(ann: Any) -> Any:
    """`ann` without its Annotated[...] constraints (shown as the bare type)."""
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _plain(args[0])
    if origin in (typing.Union, __import__("types").UnionType):
        import functools
        import operator

        return functools.reduce(operator.or_, [_plain(a) for a in args])
    if origin is list:
        return list[_plain(args[0])]  # type: ignore[misc]
    return ann


def _default(f: Any) -> str:
    if f.is_required():
        return ""
    val = f.default_factory() if f.default_factory is not None else f.default
    if isinstance(val, BaseModel):
        return ""
    return f", default {json.dumps(val)}"
