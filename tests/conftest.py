"""Shared test settings: offline Hub, a session-wide cache for the builtin tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SFT_JOB_CACHE for the whole session, so builtin models are built once."""
    path = Path(os.environ.get("SFT_JOB_TEST_CACHE") or tmp_path_factory.mktemp("sft-cache"))
    os.environ["SFT_JOB_CACHE"] = str(path)
    return path


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess run of the CLI."""
    env = {**os.environ, "SFT_JOB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("SFT_JOB_DEBUG", None)
    env.update(extra)
    return env


def run_cli(args: list[str], cache: Path, cwd: Path = REPO, timeout: int = 600,
            **env: str) -> subprocess.CompletedProcess[str]:
    """Run `sft-job ARGS` as a real subprocess (the installed console script's module)."""
    return subprocess.run([sys.executable, "-m", "sft_job", *args], cwd=cwd, env=cli_env(cache, **env),
                          capture_output=True, text=True, timeout=timeout)
