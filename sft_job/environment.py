"""What a spec asks of the machine that runs it, decided in one place.

- Optional packages the base install lacks (bitsandbytes for QLoRA, DeepSpeed, flash-attn,
  torch-xla): `validate` warns (the job may run elsewhere), `run` refuses them first thing
  (preflight.fast_checks) and the backend choice refuses them too (every rank).
- `SFT_JOB_DEEPSPEED_ON_CPU=1`, the switch that lets DeepSpeed run over gloo on CPU (a testing
  path): the spec loader hands it to validation, and the trainer setup asks it again when
  `backend: auto` resolved to the CPU.

The spec itself (spec.py) never reads the environment.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from sft_job.errors import UnsupportedError

DEEPSPEED_ON_CPU = "SFT_JOB_DEEPSPEED_ON_CPU"

# What a spec may ask for that needs a package the base install lacks: (asks(spec, backend),
# field, module, how to get it).
OPTIONAL_PACKAGES: list[tuple[Any, str, str, str]] = [
    (lambda s, b: s.method.kind == "qlora", "method.kind", "bitsandbytes",
     "pip install 'sft-job[qlora]', or use the CUDA image"),
    (lambda s, b: s.deepspeed.enabled, "deepspeed", "deepspeed",
     "pip install 'sft-job[deepspeed]', or use the CUDA image"),
    (lambda s, b: s.model.attn_implementation == "flash_attention_2", "model.attn_implementation",
     "flash_attn", "build the CUDA image with FLASH_ATTN=on, or use sdpa"),
    (lambda s, b: b == "tpu", "backend", "torch_xla", "use the TPU image"),
]


def deepspeed_on_cpu() -> bool:
    """The testing switch SFT_JOB_DEEPSPEED_ON_CPU=1 is set."""
    return os.environ.get(DEEPSPEED_ON_CPU) == "1"


def installed(module: str) -> bool:
    """`module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(spec: Any, backend: str | None = None) -> list[tuple[str, str, str]]:
    """(field, module, how to install) for each optional package the spec needs and this
    machine lacks. `backend`: the resolved backend (default: spec.backend as written)."""
    backend = backend or spec.backend
    return [(where, module, install) for asks, where, module, install in OPTIONAL_PACKAGES
            if asks(spec, backend) and not installed(module)]


def require(spec: Any, backend: str) -> None:
    """UnsupportedError (exit 2) naming the first optional package the spec needs on
    `backend` and this machine lacks."""
    for where, module, install in missing_packages(spec, backend):
        raise UnsupportedError(f"{where}: needs the Python package '{module}', which is not "
                               f"installed ({install})")
