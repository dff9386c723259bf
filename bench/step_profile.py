"""Where a training step's CPU time goes, for a few steps of any spec: top ops, and the share of
the LM head + loss, attention, LoRA dropout, the optimizer and collation.

    nice .venv/bin/python bench/step_profile.py jobs/smoke-cpu.yaml --set model.base=builtin:smollm2-135m

The job's own assembly builds the model, data and trainer (sft_job.prepare.assemble +
trainer_for, no outputs written); torch.profiler records steps warmup+1 .. warmup+steps (one
intra-op thread by default). Shares are of the profiled steps' CPU time; forward and backward of a part are
summed (autograd nodes in backward, labelled ranges or ops in forward), so a part that runs
inside another (dropout inside a LoRA linear) is counted in both, and the rest is "other".
Not named profile.py: in this folder that name would shadow the standard library's `profile`,
which cProfile (imported by transformers) loads, and break every script here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

# part -> names: a labelled range or op of the forward, or an autograd node of the backward
PARTS = {
    "LM head + loss": ("sft_job.lm_head", "_HeadNLLBackward", "trl.lm_head",
                       "ChunkedLogProbFunctionBackward"),
    "attention": ("aten::scaled_dot_product_attention",
                  "ScaledDotProductFlashAttentionForCpuBackward0",
                  "ScaledDotProductEfficientAttentionBackward0",
                  "ScaledDotProductAttentionMathForCpuBackward0"),
    "LoRA dropout": ("aten::dropout", "NativeDropoutBackward0"),
    "optimizer": ("Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"),
    "collation": ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__",),
}


def build(args: argparse.Namespace, work: Path) -> Any:
    """The spec (a few steps, no checkpoints) and the job's trainer over its model and data."""
    from sft_job.prepare import assemble, trainer_for
    from sft_job.specload import load_spec

    spec = load_spec(args.spec, [*args.set, f"train.max_steps={args.warmup + args.steps}",
                                 f"output.uri={work / 'out'}", "output.save_every_steps=null"])
    return spec, trainer_for(assemble(spec, work / "data"), work / "trainer")


def label_trl_head() -> None:
    """A labelled range around TRL's chunked LM head forward (its backward is a named node)."""
    import torch
    from trl.trainer import utils

    fn = utils._ChunkedLogProbFunction

    class Labelled(fn):  # type: ignore[misc, valid-type]
        @classmethod
        def apply(cls, *a: Any) -> Any:
            with torch.profiler.record_function("trl.lm_head"):
                return fn.apply(*a)

    utils._ChunkedLogProbFunction = Labelled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], help="spec override, as sft-job run")
    ap.add_argument("--warmup", type=int, default=1, help="steps run before profiling")
    ap.add_argument("--steps", type=int, default=3, help="steps profiled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    label_trl_head()
    info = c.machine()
    c.print_machine(info)
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        spec, built = build(args, Path(tmp))
        trainer = built.trainer
        prof = profile(activities=[ProfilerActivity.CPU],
                       schedule=schedule(wait=args.warmup, warmup=0, active=args.steps))

        class Step(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                prof.step()

        trainer.add_callback(Step())
        with prof:
            trainer.train()
    from sft_job.train.trainer import precision

    print(f"{spec.model.base}, {spec.method.kind}, precision {precision(trainer)}, LM head "
          f"{built.lm_head}, batch {spec.train.batch_size} x max_length "
          f"{spec.data.max_length}, steps {args.warmup + 1}-{args.warmup + args.steps}")
    report(prof, args.top)


def report(prof: Any, top: int) -> None:
    events = prof.events()
    total = sum(e.cpu_time_total for e in events if e.cpu_parent is None)  # top-level ranges
    rows = []
    for part, names in PARTS.items():
        t = sum(e.cpu_time_total for e in events if e.name in names
                or (e.name.startswith("autograd::engine::evaluate_function: ")
                    and e.name.split(": ", 1)[1] in names))
        rows.append([part, f"{t / 1e6:.2f}", f"{100 * t / total:.1f} %"])
    rows.append(["all steps", f"{total / 1e6:.2f}", "100 %"])
    print(c.table(["part", "CPU s", "share of steps"], rows))
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


if __name__ == "__main__":
    main()
