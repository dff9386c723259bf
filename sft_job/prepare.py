"""Step 1 of the job (`pipeline.run_job`): spec -> backend, model, tokenizer and prepared data,
then the base model's samples. The model comes before the data: a model that cannot be trained
(architecture, weights, vocab, LoRA targets) stops the job before the prepared data is written
under output.uri.

`assemble` (spec + a work folder -> Prepared) and `trainer_for` (Prepared -> the trainer) are
the job's assembly without its output location, lease or JobContext: bench/ calls them too, so
what it measures is what the job runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_job.context import JobContext, Timings
from sft_job.spec import JobSpec, ModelSpec

if TYPE_CHECKING:  # torch & co are imported by assemble(), after the cheap checks
    from sft_job.data import DataBundle
    from sft_job.train.backends import Backend, LmHead
    from sft_job.train.trainer import BuiltTrainer, CountingCollator

log = logging.getLogger("sft_job")


@dataclass
class Prepared:
    """What training needs: the spec, where it runs, the model and its tokenizer, the data."""

    spec: JobSpec
    backend: Backend
    model_dir: Path  # the base model's files (the merge reads them again)
    tokenizer: Any
    model: Any
    bundle: DataBundle


@dataclass
class Samples:
    """Prompts (with their source) and the base model's answers, for before -> after."""

    pairs: list[tuple[str, str]]
    before: list[str]

    @property
    def prompts(self) -> list[str]:
        return [p for _, p in self.pairs]


def prepare(ctx: JobContext) -> Prepared:
    """The job's `assemble`: data cached under output.uri (or data.cache_uri), bucket entries
    in this machine's scratch, the phases timed and the stop request honoured between them."""
    ctx.timings.mark("startup")  # torch/transformers/trl are imported from here on
    return assemble(ctx.spec, ctx.mine, data_cache=ctx.spec.data_cache_uri(),
                    data_root=ctx.work / "prepared", timings=ctx.timings,
                    check_stop=ctx.check_stop)


def _go_on(phase: str) -> None:
    """No stop request to honour (outside a job)."""


def model_files(model: ModelSpec) -> tuple[Path, Any]:
    """The base model's local folder (fetched or built once, cached) and its tokenizer."""
    from sft_job.models.load import load_tokenizer
    from sft_job.models.source import resolve_model_dir

    model_dir = resolve_model_dir(model.base, model.revision)
    return model_dir, load_tokenizer(model, model_dir, need_chat_template=False)


def assemble(spec: JobSpec, work: Path, *, lm_head: LmHead | None = None,
             data_cache: str | None = None, data_root: Path | None = None,
             timings: Timings | None = None,
             check_stop: Callable[[str], None] = _go_on) -> Prepared:
    """Backend, model source and tokenizer, the checked model, then the data of `spec`
    prepared once with `work` as its scratch (cached at `data_cache`, default
    `work/prepared`; see data.build). `lm_head` overrides the backend's choice (bench/);
    `timings` gets the phases `model_fetch`, `model_load`, `data`; `check_stop(phase)` runs
    after each (it raises to stop)."""
    from sft_job.data import build as build_data
    from sft_job.models.load import check_targets, check_vocab, load_model
    from sft_job.train.backends import model_attn, resolve

    timings = timings or Timings()
    backend = resolve(spec)
    if lm_head is not None:
        backend = dataclasses.replace(backend, lm_head=lm_head)
    model_dir, tokenizer = model_files(spec.model)
    timings.mark("model_fetch")
    check_stop("the model download")
    log.info("job %s: backend %s (%s weights, attention %s), base %s, method %s", spec.name,
             backend.name, backend.dtype, backend.attn, spec.model.base, spec.method.kind)
    model = load_model(spec.model, spec.method, model_dir, backend.torch_dtype(),
                       model_attn(model_dir, backend.attn, spec.data.max_length))
    check_vocab(spec.model, tokenizer, model)
    if spec.method.kind != "full":
        check_targets(spec.method, model)  # again when the trainer builds the LoRA config
    timings.mark("model_load")
    check_stop("model loading")
    bundle = build_data(spec.data, tokenizer, work, cache_uri=data_cache, local_root=data_root,
                        check_stop=lambda: check_stop("data preparation"))
    timings.mark("data")
    check_stop("data preparation")
    return Prepared(spec, backend, model_dir, tokenizer, model, bundle)


def trainer_for(job: Prepared, output_dir: Path, callbacks: Sequence[Any] = (),
                collator: CountingCollator | None = None) -> BuiltTrainer:
    """The SFTTrainer over `job`'s model and data (train/trainer.build_trainer), its local
    files under `output_dir`; `collator` defaults to a new counting collator."""
    from sft_job.train.trainer import build_trainer

    return build_trainer(job.spec, job.backend, job.model, job.tokenizer, job.bundle,
                         output_dir, list(callbacks), collator)


def sample_base(ctx: JobContext, job: Prepared) -> Samples:
    """The eval prompts (spec or data) and the base model's greedy answers."""
    from sft_job.finish.evaluate import generate, sample_prompts

    spec, bundle = ctx.spec, job.bundle
    pairs = sample_prompts(spec.eval.prompts, bundle.eval_examples or bundle.train_examples,
                           spec.eval.num_samples, bundle.format, spec.data, job.tokenizer)
    if pairs:
        log.info("generating %d sample(s) from the base model (greedy, up to %d tokens each)",
                 len(pairs), spec.eval.max_new_tokens)
    samples = Samples(pairs, [])
    samples.before = generate(job.model, job.tokenizer, samples.prompts,
                              spec.eval.max_new_tokens)
    ctx.timings.mark("samples_before")
    return samples
