"""Prints the fuzz suite's figures at the end of the session."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    import sys

    lines = []
    decoders = sys.modules.get(f"{__package__}.test_decoders")
    if decoders is not None and decoders.COUNTS:
        total = sum(decoders.COUNTS.values())
        lines.append(
            f"decoders: {total} examples ({', '.join(f'{k} {v}' for k, v in decoders.COUNTS.items())})"
        )
    images = sys.modules.get(f"{__package__}.test_images")
    if images is not None and images.FIGURES["jobs"]:
        lines.append("images: " + ", ".join(f"{k} {v}" for k, v in images.FIGURES.items()))
    if lines:
        terminalreporter.section("fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
