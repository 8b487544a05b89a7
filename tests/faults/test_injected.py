"""EIO, ENOSPC, EDQUOT and short writes injected into every crash scenario.

For each scenario and fault, the fault hits the first call of each call site in turn, then
every Nth call (every call with VDISK_SOAK=1). A known bug in qcow2 internals is recognised by
where it happens (KNOWN), counted, and proven by its own strict-xfail test below; anything else
fails the sweep.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from crash.scenarios import SCENARIOS, Scenario
from oracles import needs_qemu

from .inject import NAMES, SHORT, Outcome, count_calls, run_with_fault

pytestmark = needs_qemu

SOAK = os.environ.get("VDISK_SOAK") == "1"
EVERY_NTH = 1 if SOAK else 9
FAULTS = [errno.EIO, errno.ENOSPC, errno.EDQUOT, SHORT]
FIGURES: list[str] = []
BUDGET = float(os.environ.get("VDISK_FAULT_SECONDS", "0")) or None  # per test, from scripts/soak

# (scenario or "*", fault or None for any error, call site of the fault or the function the error
# came through): the reason, one line. Core-write / core-check own the code at fault.
KNOWN: dict[tuple[str, int | None, str], str] = {
}


def known(scenario: str, fault: int, outcome: Outcome) -> str | None:
    assert outcome.fired is not None
    places = [outcome.fired.site, *outcome.frames]
    for (name, kind, place), reason in KNOWN.items():
        fits = (kind is None and fault != SHORT) or kind == fault
        if name in ("*", scenario) and fits and place in places:
            return reason
    return None


def targets(scenario: Scenario, where: Path) -> list[int]:
    calls = count_calls(scenario, where, 0)
    first: dict[tuple[str, str], int] = {}
    for i, call in enumerate(calls):
        first.setdefault((call.kind, call.site), i)
    return sorted({*first.values(), *range(0, len(calls), EVERY_NTH)})


@pytest.mark.parametrize("fault", FAULTS, ids=[NAMES[f] for f in FAULTS])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault_at_every_site(scenario: Scenario, fault: int, tmp_path: Path) -> None:
    (tmp_path / "count").mkdir()
    injected = tolerated = 0
    problems: list[str] = []
    started = time.monotonic()
    for at in targets(scenario, tmp_path / "count"):
        if BUDGET is not None and time.monotonic() - started > BUDGET:
            break
        where = tmp_path / f"at{at}"
        where.mkdir()
        outcome = run_with_fault(scenario, where, 0, at, fault)
        if outcome.fired is None:
            continue
        injected += 1
        if outcome.problems:
            if known(scenario.name, fault, outcome):
                tolerated += 1
                continue
            site = f"{outcome.fired.kind} #{at} at {outcome.fired.site}"
            problems.append(f"{NAMES[fault]} on {site}: {'; '.join(outcome.problems[:3])}")
    FIGURES.append(
        f"{scenario.name} {NAMES[fault]}: {injected} faults injected, "
        f"{tolerated} hit a known bug, {len(problems)} problems"
    )
    assert not problems, "\n".join(problems)


def _one(scenario_name: str, site: str, fault: int, tmp_path: Path) -> Outcome:
    scenario = next(s for s in SCENARIOS if s.name == scenario_name)
    (tmp_path / "count").mkdir()
    calls = count_calls(scenario, tmp_path / "count", 0)
    at = next(i for i, c in enumerate(calls) if c.site == site)
    return run_with_fault(scenario, tmp_path, 0, at, fault)


def test_close_after_failed_flush_raises_vdisk_error(tmp_path: Path) -> None:
    # repair_lazy_open: the first flush of _flush_locked is the one inside close().
    outcome = _one("repair_lazy_open", "vdisk.qcow2.image:_flush_locked", errno.ENOSPC, tmp_path)
    assert not outcome.problems, outcome.problems


def test_short_header_write_in_resize(tmp_path: Path) -> None:
    outcome = _one("resize_grow", "vdisk.qcow2.resize:_write_header", SHORT, tmp_path)
    assert not outcome.problems, outcome.problems


def test_trim_file_error_is_vdisk_error(tmp_path: Path) -> None:
    outcome = _one("resize_shrink", "vdisk.qcow2.resize:trim_file", errno.EIO, tmp_path)
    assert not outcome.problems, outcome.problems


def test_failed_refcount_table_switch(tmp_path: Path) -> None:
    outcome = _one(
        "refcount_table_growth", "vdisk.qcow2.refcount:_write_header_table", errno.EIO, tmp_path
    )
    assert not outcome.problems, outcome.problems


def test_fault_injector_fires(tmp_path: Path) -> None:
    """The sweep proves something only if faults land: one must fail a plain flush."""
    scenario = SCENARIOS[0]
    outcome = run_with_fault(scenario, tmp_path, 0, 0, errno.EIO)
    assert outcome.fired is not None and outcome.fired.kind == "flush"
    assert not outcome.problems


def test_trim_after_shrink_flush_error_is_vdisk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the soak (every call of resize_shrink): a failed sync while trim_file drops
    idle refcount blocks let a raw OSError out."""
    from vdisk.errors import VdiskError
    from vdisk.qcow2 import Qcow2Image, create
    from vdisk.qcow2.resize import resize, trim_file

    path = tmp_path / "s.qcow2"
    create(str(path), 4 << 20, cluster_size=4096)
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\1" * (3 << 20), 0)
        resize(img, 1 << 20)

    real_fdatasync = os.fdatasync
    calls = []

    def fail_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # close's own syncs succeed, as in the soak's case
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fail_once)
    with pytest.raises(VdiskError) as exc:
        trim_file(str(path))
    assert exc.value.errno == errno.EIO
