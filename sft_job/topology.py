"""Where this process sits in the job: rank, world, node, local rank, read in one place.

torch's elastic launcher (what `sft-job run` becomes on several devices, or torchrun) sets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (the node) and GROUP_WORLD_SIZE;
a single process has none of them and is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Global rank and world size, node and node count, rank within the node."""

    rank: int = 0
    world: int = 1
    node: int = 0
    nodes: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Topology:
        """From the variables the launcher sets (see the module docstring)."""
        env = os.environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_world = max(1, int(env.get("LOCAL_WORLD_SIZE") or world))
        return cls(rank, world, int(env.get("GROUP_RANK") or rank // local_world),
                   int(env.get("GROUP_WORLD_SIZE") or max(1, world // local_world)),
                   int(env.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that checks, writes the outputs and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank in the job."""
        return self.world > 1


def here() -> Topology:
    """This process's place, read from the environment now."""
    return Topology.from_env()


def in_launcher() -> bool:
    """This process is a rank started by torchrun/accelerate/deepspeed (or our launcher)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
