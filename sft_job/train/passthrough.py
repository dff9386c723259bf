"""The `trainer:` pass-through (sft_job/spectrainer.py) checked against the installed
libraries: the optimizer and schedule it names can be built."""

from __future__ import annotations

from typing import Any


def check_settings(args: Any) -> None:
    """The optimizer and learning-rate schedule the trainer will build from the SFTConfig
    `args` can be built (optimizer name and optim_args, its package installed, the scheduler's
    kwargs); SpecError / UnsupportedError (exit 2) naming the trainer field otherwise, so a bad
    value fails before anything is written instead of as a traceback at the first step."""
    import torch
    from transformers import Trainer, get_scheduler

    from sft_job.errors import SpecError, UnsupportedError

    optim = getattr(args.optim, "value", args.optim)
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer = cls([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    except ImportError as e:
        raise UnsupportedError(f"trainer.optim: {optim} needs a package that is not "
                               f"installed ({_first_line(e)})") from None
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise SpecError(f"trainer.optim / trainer.optim_args: cannot build the optimizer "
                        f"{optim} ({type(e).__name__}: {_first_line(e)})") from None
    try:
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=1,
                      num_training_steps=10,
                      scheduler_specific_kwargs=args.lr_scheduler_kwargs or None)
    except (ValueError, TypeError, KeyError) as e:
        raise SpecError(f"trainer.lr_scheduler_kwargs: rejected by the "
                        f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} "
                        f"schedule ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
