"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

transformers' own callbacks (TensorBoardCallback, WandbCallback, MLflowCallback) log the
metrics. This module only checks that the packages are installed, opens the runs before the
trainer does (so a resumed job continues the same W&B/MLflow run and TensorBoard hides what a
killed attempt logged past its checkpoint), and closes them with the job's outcome.
W&B and MLflow read their usual environment variables (WANDB_API_KEY, WANDB_PROJECT,
WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...); none of them is logged here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from sft_job.errors import AccessError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)

# report_to name -> (module that must be importable, extra of sft-job that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
MLFLOW_STATUS = {0: "FINISHED", 75: "KILLED"}
ENV_HINTS = {"wandb": "WANDB_API_KEY (or WANDB_MODE=offline), WANDB_PROJECT, WANDB_ENTITY",
             "mlflow": "MLFLOW_TRACKING_URI and the server's credentials"}


def missing(report_to: list[str]) -> list[str]:
    """One message per tracker asked for whose package is not installed."""
    out = []
    for name in report_to:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            out.append(f"{name} is not installed; install the extra: pip install 'sft-job[{extra}]'")
    return out


def trainer_args(spec: JobSpec) -> dict[str, Any]:
    """SFTConfig fields: the trackers (or none) and the run name they show."""
    return {"report_to": list(spec.train.report_to) or "none", "run_name": spec.name}


class Trackers:
    """The runs of one attempt of a job (rank 0 only). `ids` holds the W&B/MLflow run ids,
    which the progress file keeps so a resumed attempt reopens the same runs."""

    def __init__(self, spec: JobSpec, logdir: Path) -> None:
        self.spec = spec
        self.names = list(spec.train.report_to)
        self.logdir = logdir
        self.ids: dict[str, str] = {}
        self._tb_writer: Any = None
        self._tb_callback: Any = None

    def open(self, resume_step: int | None, previous_ids: dict[str, str]) -> None:
        """Start (or, when resuming from a checkpoint, reopen) the run of each tracker.
        Ids of an earlier attempt are reused only when resuming: a fresh start is a new run."""
        prev = previous_ids if resume_step is not None else {}
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            # events an earlier attempt logged past the checkpoint we resume from (or any, on a
            # fresh start) are hidden by TensorBoard's readers: the curves continue from here
            self._tb_writer = SummaryWriter(log_dir=str(self.logdir),
                                            purge_step=(resume_step or 0) + 1)
        if "wandb" in self.names:
            run = _start("wandb", lambda: self._wandb(prev))
            self.ids["wandb_run_id"] = run.id
            log.info("wandb: run %s (%s) in project %s", run.id, self.spec.name, run.project)
        if "mlflow" in self.names:
            run = _start("mlflow", lambda: self._mlflow(prev))
            self.ids["mlflow_run_id"] = run.info.run_id
            log.info("mlflow: run %s (%s)", run.info.run_id, self.spec.name)

    def _wandb(self, prev: dict[str, str]) -> Any:
        import wandb

        run_id = os.environ.get("WANDB_RUN_ID") or prev.get("wandb_run_id") or uuid.uuid4().hex[:12]
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "sft-job"),
                          name=self.spec.name, id=run_id, resume="allow")

    def _mlflow(self, prev: dict[str, str]) -> Any:
        import mlflow

        # MLFLOW_RUN_ID, when set, wins (mlflow reads and then unsets it)
        return mlflow.start_run(run_id=None if os.environ.get("MLFLOW_RUN_ID")
                                else prev.get("mlflow_run_id"), run_name=self.spec.name)

    def attach(self, trainer: Any) -> None:
        """Give transformers' TensorBoardCallback our writer and folder (it would otherwise
        open its own under the trainer's output_dir)."""
        if self._tb_writer is None:
            return
        from transformers.integrations import TensorBoardCallback

        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):
                cb.tb_writer, cb.logging_dir = self._tb_writer, str(self.logdir)
                self._tb_callback = cb

    def close(self, exit_code: int) -> None:
        """Flush and end every run with the job's outcome (0 done, 75 preempted, else failed).
        The job's outcome is decided (and _SUCCESS written) by then: a tracker that fails to
        close is a warning, never a failed job."""
        for name, end in (("tensorboard", self._close_tensorboard), ("wandb", _end_wandb),
                          ("mlflow", _end_mlflow)):
            if name in self.names:
                try:
                    end(exit_code)
                except Exception as e:  # the trackers' own errors, of many kinds
                    log.warning("%s: could not close the run: %s", name, str(e).splitlines()[0])

    def _close_tensorboard(self, exit_code: int) -> None:
        cb = self._tb_callback
        if cb is not None and cb.tb_writer is not None:
            cb.tb_writer.close()
            cb.tb_writer = None
        elif self._tb_writer is not None:
            self._tb_writer.close()


def _end_wandb(exit_code: int) -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def _end_mlflow(exit_code: int) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.flush_async_logging()
        mlflow.end_run(status=MLFLOW_STATUS.get(exit_code, "FAILED"))


def _start(name: str, start: Any) -> Any:
    """Start a tracker's run; its failure (no key, unreachable server, ...) is one line and
    exit 3: retrying with the same environment cannot fix it."""
    try:
        return start()
    except Exception as e:  # the trackers' own errors, of many kinds
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AccessError(f"train.report_to: {name} could not start its run: {msg}; check "
                          f"{ENV_HINTS[name]}") from None
