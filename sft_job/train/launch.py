"""Start one rank per device with torch's elastic launcher (what `torchrun` runs), unless this
process is already a rank. Multi-node settings come from the standard variables:

    MASTER_ADDR, MASTER_PORT     the rendezvous host (node 0), e.g. a headless Service name
    NNODES (or WORLD_NODES)      number of nodes
    NODE_RANK                    this node, else JOB_COMPLETION_INDEX (Kubernetes Indexed Job)
    NPROC_PER_NODE               ranks per node (default: visible GPUs, or 1 on CPU)

Worker exit codes are kept (torchrun itself turns every failure into 1): the launcher exits
with the most significant code of its ranks, so 2/3/75 still mean what the README says.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from sft_job.errors import EXIT_ACCESS, EXIT_BUG, EXIT_RETRY, EXIT_SPEC
from sft_job.spec import JobSpec
from sft_job.topology import in_launcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    stop_budget_s: int = 30  # output.stop_budget_seconds: how long ranks may take to stop

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def plan(spec: JobSpec) -> LaunchPlan | None:
    """How many ranks to start here; None when one process in place is right."""
    if in_launcher():
        return None
    env = os.environ
    nproc = int(env.get("NPROC_PER_NODE", "0")) or spec.resources.processes_per_node or 0
    if not nproc:
        backend = spec.backend
        if backend == "auto":
            from sft_job.train.backends import detect

            backend = detect()
        nproc = _gpu_count() if backend == "cuda" else 1
    nnodes = int(env.get("NNODES") or env.get("WORLD_NODES") or 1)
    node_rank = int(env.get("NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0)
    if nproc * nnodes <= 1:
        return None
    return LaunchPlan(nproc, nnodes, node_rank, env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", "29500")), spec.output.stop_budget_seconds)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def launch(p: LaunchPlan, argv: list[str]) -> int:
    """Run `python -m sft_job ARGV` as p.nproc_per_node ranks; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log.info("launching %d rank(s) on node %d/%d (rendezvous %s:%d)", p.nproc_per_node,
             p.node_rank, p.nnodes, p.master_addr, p.master_port)
    config = LaunchConfig(
        min_nodes=p.nnodes,
        max_nodes=p.nnodes,
        nproc_per_node=p.nproc_per_node,
        run_id=os.environ.get("SFT_JOB_RUN_ID", "sft-job"),
        rdzv_backend="static",
        rdzv_endpoint=f"{p.master_addr}:{p.master_port}",
        rdzv_configs={"rank": p.node_rank, "timeout": 900},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        # on SIGTERM the launcher passes it on and kills the ranks after this long (torch's
        # default is 30 s): give them the stop budget to commit their checkpoint, and a margin
        shutdown_timeout=p.stop_budget_s + 15,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "sft_job", *argv)
    except ChildFailedError as e:
        return worst([f.exitcode for f in e.failures.values()])
    except SignalException:  # the pod is told to stop: the ranks got SIGTERM
        return EXIT_RETRY
    return 0


def worst(codes: list[int]) -> int:
    """The exit code that matters most across ranks: bad input, then access, then retry."""
    for code in (EXIT_SPEC, EXIT_ACCESS, EXIT_RETRY):
        if code in codes:
            return code
    return next((c for c in codes if c), EXIT_BUG) if codes else 0
