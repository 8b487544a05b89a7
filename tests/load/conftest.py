"""Prints the load suite's figures at the end of the session."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from .test_threads import FIGURES

    if FIGURES:
        terminalreporter.section("library load")
        for line in FIGURES:
            terminalreporter.write_line(line)
