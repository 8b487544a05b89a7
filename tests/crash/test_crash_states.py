"""Crash-state enumeration: every state a power cut can leave opens, checks and keeps its data.

CI mode: one seed per scenario. ``VDISK_SOAK=1``: more seeds and more random states per epoch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from oracles import needs_qemu

from .explore import explore
from .scenarios import SCENARIOS, Scenario

pytestmark = needs_qemu

SOAK = os.environ.get("VDISK_SOAK") == "1"
SEEDS = range(int(os.environ.get("VDISK_CRASH_SEEDS", "8" if SOAK else "3")))
RANDOMS_PER_EPOCH = 80 if SOAK else 30
# scripts/soak gives each scenario a time budget: seeds stop once it is spent (one at least).
BUDGET = float(os.environ.get("VDISK_CRASH_SECONDS", "0")) or None

FIGURES: list[str] = []  # one line per scenario, printed by the conftest's summary


def _params() -> list[object]:
    return [
        pytest.param(
            s,
            id=s.name,
            marks=[pytest.mark.xfail(strict=True, reason=s.known_bug)] if s.known_bug else [],
        )
        for s in SCENARIOS
    ]


@pytest.mark.parametrize("scenario", _params())
def test_every_crash_state_recovers(scenario: Scenario, tmp_path: Path) -> None:
    totals = [0, 0, 0, 0]
    problems: list[str] = []
    started = time.monotonic()
    for seed in SEEDS:
        if BUDGET is not None and seed and time.monotonic() - started > BUDGET:
            break
        where = tmp_path / f"seed{seed}"
        where.mkdir()
        figures = explore(scenario, where, seed, RANDOMS_PER_EPOCH)
        for i, n in enumerate(
            (figures.calls, figures.states, figures.distinct, figures.qemu_checks)
        ):
            totals[i] += n
        problems += figures.problems
    FIGURES.append(
        f"{scenario.name}: {totals[0]} calls recorded, {totals[1]} crash states, "
        f"{totals[2]} distinct judged, {totals[3]} qemu-img checks, {len(problems)} problems"
    )
    assert not problems, "\n".join(problems[:10])
