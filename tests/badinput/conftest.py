"""Fixtures of the bad-input tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The corpus's timings (set by test_badinput's `results` fixture)."""
    line = getattr(terminalreporter.config, "badinput_summary", None)
    if line:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny(sft_cache: Path) -> Path:
    """The builtin tiny Llama, built before any CLI subprocess runs (so none prints its build
    progress on stderr, where the tests expect only the error line)."""
    from sft_job.models.builtin import build_builtin

    return build_builtin("builtin:tiny-llama")
