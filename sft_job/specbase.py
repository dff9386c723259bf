"""Building blocks of the spec (spec.py): the strict section base, locations, id and URL rules."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sft_job.uri import uri_problem


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable after load, and
    no float is NaN or infinite (`.inf` passes `gt=0`; a NaN learning rate trains a NaN model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _location(value: str) -> str:
    problem = uri_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A path or URI the job reads or writes: no control characters, a known scheme, a valid bucket.
Location = Annotated[str, Field(min_length=1), AfterValidator(_location)]
SEED = {"ge": 0, "le": 2**32 - 1}  # numpy's seed range
HUB_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def hub_repo_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub repo id 'org/name', or None."""
    parts = repo_id.split("/")
    if (len(parts) != 2 or not all(HUB_REPO.fullmatch(p) for p in parts) or ".." in repo_id
            or "--" in repo_id or len(repo_id) > 96):
        return (f"'{repo_id}' is not a Hub repo id 'org/name' (letters, digits, '-', '_', '.'; "
                "no '..' or '--'; at most 96 characters)")
    return None


DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero3-offload")


class DeepSpeed(str):
    """`deepspeed:` interpreted once: off ('none'), a ZeRO preset, or the path of a user's
    JSON config. A str (it is what the YAML holds), with the answers callers need."""

    @property
    def enabled(self) -> bool:
        return self != "none"

    @property
    def preset(self) -> str | None:
        """zero2 | zero3 | zero3-offload, or None (off, or a JSON file)."""
        return str(self) if self.enabled and self in DEEPSPEED_PRESETS else None

    @property
    def config_file(self) -> str | None:
        """The user's JSON config, or None."""
        return str(self) if self.endswith(".json") else None

    @property
    def stage(self) -> int | None:
        """The ZeRO stage of a preset (a JSON file's is read from it: train/deepspeed.py)."""
        return None if self.preset is None else 3 if self.preset.startswith("zero3") else 2

    @property
    def offload(self) -> bool:
        return self.preset == "zero3-offload"


def _deepspeed(value: str) -> DeepSpeed:
    if value not in DEEPSPEED_PRESETS and not value.endswith(".json"):
        raise ValueError(f"'{value}' is not one of {', '.join(DEEPSPEED_PRESETS)} or a .json path")
    return DeepSpeed(value)


DeepSpeedField = Annotated[str, Field(min_length=1), AfterValidator(_deepspeed)]
