"""Prints the crash suite's figures at the end of the session."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from .test_crash_states import FIGURES

    if FIGURES:
        terminalreporter.section("crash states")
        for line in FIGURES:
            terminalreporter.write_line(line)
