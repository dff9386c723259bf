"""The LM head and loss over trained positions only, for training and evaluation alike.

TRL's fused LM head skips positions without a label only where its Triton kernels run (CUDA,
XPU); elsewhere (CPU) it projects every position onto the vocabulary, prompt tokens included,
computes entropy and top-1 accuracy on every step for its logs, and projects again in
backward. Here the hidden states of the positions whose next token is trained are gathered
first, projected in chunks of tokens (the logits of one chunk at a time: bounded memory),
and the gradients of the head are computed in the same pass (no second projection); entropy
and accuracy are computed only on steps whose metrics are logged.

One definition of the loss everywhere: the sum of the per-token negative log-likelihoods of
the trained tokens divided by their number (`token_nll` gives both, for an evaluation loop).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk of tokens
HEAD_KWARG = "sft_job_head"  # model(..., sft_job_head=True) -> HeadOutput
_STATS_KWARG = "sft_job_head_stats"
PROFILE_LABEL = "sft_job.lm_head"  # the forward's range in a torch.profiler trace (bench/profile.py)


@dataclass
class HeadOutput(ModelOutput):
    """Sums over the trained positions of one batch (labels != -100 after the shift). A
    ModelOutput, so DDP and accelerate's output conversion pass it through."""

    nll_sum: Any = None  # fp32 scalar, differentiable
    n_tokens: Any = None  # trained positions
    entropy_sum: Any = None  # only when stats were asked for
    n_correct: Any = None  # argmax == label


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES."""
    return max(64, CHUNK_BYTES // (4 * vocab))


def _compute_dtype(device_type: str, dtype: Any) -> Any:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class _HeadNLL(torch.autograd.Function):
    """Summed NLL of `hidden @ weight.T (+ bias)` at `targets`; the head's
    gradients are computed chunk by chunk in forward and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int,
                stats: bool, dtype: Any) -> tuple[Any, Any, Any]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(dtype)
        nll = hidden.new_zeros((), dtype=torch.float32)
        ent = hidden.new_zeros((), dtype=torch.float32) if stats else None
        correct = hidden.new_zeros((), dtype=torch.long) if stats else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk]
            z = (h @ w.t()).float()
            if bias is not None:
                z += bias.float()
            lse = torch.logsumexp(z, dim=-1)
            nll += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
            if stats:
                correct += (z.argmax(-1) == t).sum()
            if not (stats or need_h or need_w or need_b):
                continue
            z.sub_(lse[:, None])  # log-probabilities, in place
            if stats:
                ent -= (z.exp() * z).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.exp_()  # d nll / d logits = softmax - onehot
            g[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if need_h:
                grad_h[s:s + chunk] = g @ w
            if need_w:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(*(x for x in (ent, correct) if x is not None))
        return nll, ent, correct

    @staticmethod
    def backward(ctx: Any, grad_nll: Any, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_nll.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None


def head_nll(hidden: Any, lm_head: Any, labels: Any, stats: bool = False,
             shifted: bool = False) -> HeadOutput:
    """The head's summed NLL over trained positions: `hidden` [batch, seq, H] from the
    backbone, `labels` [batch, seq] (-100 = not trained; shifted by one unless `shifted`)."""
    if not shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    labels = labels.to(hidden.device)
    mask = labels != -100
    h, t = hidden[mask], labels[mask]
    weight, bias = lm_head.weight, lm_head.bias
    dtype = _compute_dtype(hidden.device.type, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False), \
            torch.profiler.record_function(PROFILE_LABEL):
        nll, ent, correct = _HeadNLL.apply(h, weight, bias, t, chunk_tokens(weight.shape[0]),
                                              stats, dtype)
    return HeadOutput(nll, mask.sum(), ent, correct)


def install(model: Any) -> Any:
    """Patch the causal LM under `model` (PEFT unwrapped) so that
    `model(**batch, sft_job_head=True)` returns a HeadOutput instead of logits; any other call
    is the model's own forward (generation is unchanged). Idempotent; returns the patched model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_sft_job_head", False):
        return base
    original = base.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.pop(HEAD_KWARG, False):
            return original(*args, **kwargs)
        stats = kwargs.pop(_STATS_KWARG, False)
        labels, shift = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        head = self.get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            res = head_nll(out.last_hidden_state, head, labels if shift is None else shift,
                           stats=stats, shifted=shift is not None)
        return res

    base.forward = types.MethodType(forward, base)
    base._sft_job_head = True
    return base


def supported(model: Any) -> str | None:
    """Why the head cannot stand in for the model's own (None when it can): logit scaling
    or soft-capping, which this head does not apply, or a mixture-of-experts' auxiliary loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                 "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1.0):
            return f"the model's config sets {name}"
    if hasattr(cfg, "output_router_logits"):
        return "mixture-of-experts models add a router loss"
    if base.get_output_embeddings() is None:
        return "the model has no output embeddings"
    return None


def token_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(sum of the per-token NLL, number of trained tokens) of one batch with labels: the
    definition of the training loss, for an evaluation loop (run it under torch.no_grad)."""
    install(model)
    out = model(**batch, **{HEAD_KWARG: True})
    return out.nll_sum, out.n_tokens


def use_in(trainer: Any) -> str | None:
    """Make an SFTTrainer compute its loss (training and its own evaluation) with this head.
    Returns why not, None when done: settings whose loss is not the plain per-token NLL, and
    DeepSpeed (ZeRO partitions the head), keep TRL's."""
    args = trainer.args
    why = supported(trainer.model)
    if why is None and args.loss_type != "nll":
        why = f"trainer.loss_type: {args.loss_type}"
    if why is None and args.label_smoothing_factor:
        why = "trainer.label_smoothing_factor"
    if why is None and trainer.compute_loss_func is not None:
        why = "a custom loss function"
    if why is None and trainer.is_deepspeed_enabled:
        why = "DeepSpeed"
    if why is None:
        install(trainer.model)
        trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    return why


def _logged_step(trainer: Any) -> bool:
    """Whether the step in progress will be logged (transformers' DefaultFlowCallback rule)."""
    args, state = trainer.args, trainer.state
    step = state.global_step + 1
    if step == 1 and args.logging_first_step:
        return True
    return args.logging_strategy == "steps" and bool(state.logging_steps) \
        and step % state.logging_steps == 0


def _compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                  num_items_in_batch: Any = None) -> Any:
    """SFTTrainer.compute_loss with this head: the same loss (summed NLL / trained tokens of
    the whole accumulated batch), entropy and token accuracy only on logged steps. TRL's
    `num_tokens` is left out: metrics.jsonl has `tokens_seen`, counted by the collator."""
    if return_outputs:  # someone wants logits: TRL's own path
        return type(self).compute_loss(self, model, inputs, True, num_items_in_batch)
    mode = "train" if self.model.training else "eval"
    stats = mode == "eval" or _logged_step(self)
    out = model(**inputs, **{HEAD_KWARG: True, _STATS_KWARG: stats})
    denom = out.n_tokens if num_items_in_batch is None else num_items_in_batch
    loss = out.nll_sum / torch.as_tensor(denom, device=out.nll_sum.device).clamp(min=1)
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * self.accelerator.num_processes  # DDP averages the gradients (as TRL)
    gather = self.accelerator.gather_for_metrics
    if stats:
        n = gather(out.n_tokens.detach()).sum().clamp(min=1)
        self._metrics[mode]["entropy"].append((gather(out.entropy_sum).sum() / n).item())
        self._metrics[mode]["mean_token_accuracy"].append((gather(out.n_correct).sum() / n).item())
    return loss
