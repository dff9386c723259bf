"""Step 1 of the job (`pipeline.run_job`): spec -> backend, model, tokenizer and prepared data,
then the base model's samples. The model comes before the data: a model that cannot be trained
(architecture, weights, vocab, LoRA targets) stops the job before the prepared data is written
under output.uri."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_job.context import JobContext

if TYPE_CHECKING:  # torch & co are imported by prepare(), after the cheap checks
    from sft_job.data import DataBundle
    from sft_job.train.backends import Backend

log = logging.getLogger("sft_job")


@dataclass
class Prepared:
    """What training needs: where it runs, the model and its tokenizer, the data."""

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
    """Backend, model source and tokenizer, the checked model, then the prepared data (once,
    cached); the stop request is honoured between them."""
    # Imports of torch/transformers/trl happen from here on, after the cheap checks.
    from sft_job.data import build as build_data
    from sft_job.models.load import check_targets, check_vocab, load_model, load_tokenizer
    from sft_job.models.source import resolve_model_dir
    from sft_job.train.backends import model_attn, resolve

    spec, timings = ctx.spec, ctx.timings
    timings.mark("startup")
    backend = resolve(spec)
    model_dir = resolve_model_dir(spec.model.base, spec.model.revision)
    tokenizer = load_tokenizer(spec.model, model_dir, need_chat_template=False)
    timings.mark("model_fetch")
    ctx.check_stop("the model download")
    log.info("job %s: backend %s (%s weights, attention %s), base %s, method %s", spec.name,
             backend.name, backend.dtype, backend.attn, spec.model.base, spec.method.kind)
    model = load_model(spec.model, spec.method, model_dir, backend.torch_dtype(),
                       model_attn(model_dir, backend.attn, spec.data.max_length))
    check_vocab(spec.model, tokenizer, model)
    if spec.method.kind != "full":
        check_targets(spec.method, model)  # again when the trainer builds the LoRA config
    timings.mark("model_load")
    ctx.check_stop("model loading")
    bundle = build_data(spec.data, tokenizer, ctx.mine, cache_uri=spec.data_cache_uri(),
                        local_root=ctx.work / "prepared",
                        check_stop=lambda: ctx.check_stop("data preparation"))
    timings.mark("data")
    ctx.check_stop("data preparation")
    return Prepared(backend, model_dir, tokenizer, model, bundle)


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
