"""The job's evaluation loop: the loss per trained token over the eval rows, on every rank
(run by the trainer's eval callback during training and by the job before and after it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def eval_loss(trainer: Any, rows: Any, *, own_head: bool,
              should_stop: Callable[[], bool] | None = None) -> tuple[float | None, int]:
    """(loss per trained token, trained tokens) of the model over the eval rows: the sum of
    every trained token's loss over all batches and ranks, divided by their number. (The
    Trainer's own evaluate() averages per-batch means, which weighs a short batch's tokens more
    than a long one's.) Each rank takes rows rank::world, and every rank runs the same number
    of forward passes (ZeRO-3 gathers weights collectively), repeating its last batch with no
    weight when it runs out. `rows`: a list of row dicts or a datasets.Dataset. `own_head`:
    the loss is the job's head over trained positions (BuiltTrainer.own_head). `should_stop`
    is asked between batches, collectively: the evaluation is abandoned (None) when any rank
    says stop. On XLA (one process drives every device) the process evaluates every row."""
    model = trainer.model
    dist = _dist()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist else (1, 0)
    was_training = model.training
    model.eval()
    total = _local_sums(trainer, rows, rank, world, own_head, should_stop)
    if was_training:
        model.train()
    if total is None:
        return None, 0
    if dist:
        t = total.to(trainer.args.device) if dist.get_backend() == "nccl" else total
        dist.all_reduce(t)
        total = t.cpu()
    tokens = int(total[1])
    if not tokens:
        return None, 0
    return float(total[0] / total[1]), tokens


def _local_sums(trainer: Any, rows: Any, rank: int, world: int, own_head: bool,
                should_stop: Callable[[], bool] | None) -> Any:
    """This rank's (loss sum, trained tokens) over its rows rank::world, as a float64 tensor,
    in as many batches as the rank with the most rows (a rank short of rows repeats its last
    batch, weighing nothing); None when a stop is agreed between batches."""
    import torch

    from sft_job.checkpoint.preempt import agree

    model, device = trainer.model, trainer.args.device
    collate = getattr(trainer.data_collator, "inner", trainer.data_collator)  # not counted
    n_rows = len(rows)
    mine = range(rank, n_rows, world)
    bs = trainer.args.per_device_eval_batch_size
    n_batches = -(-max(len(range(r, n_rows, world)) for r in range(world)) // bs)
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
    batch = None
    with torch.no_grad():
        for i in range(n_batches):
            if should_stop is not None and agree(should_stop()):
                return None
            chunk = [rows[j] for j in mine[i * bs:(i + 1) * bs]]  # a list or a Dataset
            if chunk:
                batch = collate(chunk)
            if batch is None:  # this rank has no rows at all: it still joins every pass
                batch = collate([rows[0]])
            nll, n = _batch_nll(model, batch, device, own_head)
            if chunk:
                total += torch.tensor([nll, n], dtype=torch.float64)
    return total


def _batch_nll(model: Any, batch: dict[str, Any], device: Any, own_head: bool
               ) -> tuple[float, int]:
    """(summed loss, trained tokens) of one batch."""
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    if own_head:  # the training loss's own head: logits of trained positions only
        from sft_job.train.loss import token_nll

        nll, n = token_nll(model, inputs)
        return float(nll), int(n)
    n = int((batch["labels"][..., 1:] != -100).sum())
    return float(model(**inputs).loss) * n, n


def _dist() -> Any:
    """torch.distributed when it runs several ranks, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None
