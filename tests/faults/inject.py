"""Fault injection at the file layer, through the crash suite's os-level tap.

``FaultInjector`` counts the writes, flushes and size changes made to the image and makes one
of them fail (EIO, ENOSPC, EDQUOT) or come up short. ``run_with_fault`` runs a crash scenario
with it and judges the outcome:

* the failed call surfaces as a VdiskError carrying the injected errno (a short write is
  finished by the caller and surfaces as nothing);
* closing afterwards raises nothing but VdiskError;
* the image then opens read-write with vdisk, ``qemu-img check`` finds no corruption (leaks are
  fine) and every acknowledged write reads back.
"""

from __future__ import annotations

import errno
import os
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from crash.explore import qemu_corruption
from crash.scenarios import Scenario, Session
from vdisk.errors import VdiskError
from vdisk.qcow2 import Qcow2Image
from vdisk.testing.recorder import FLUSH, TRUNCATE, WRITE, FileCall, Recorder

SHORT = 0  # pseudo-errno: a short write instead of an error
NAMES = {errno.EIO: "EIO", errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", SHORT: "short"}


class FaultInjector(Recorder):
    """A Recorder that fails call number ``at`` (counting writes, flushes and size changes)."""

    def __init__(self, paths: list[str], at: int, fault: int) -> None:
        super().__init__(paths)
        self.at = at
        self.fault = fault
        self.count = 0
        self.fired: FileCall | None = None

    def before(self, call: FileCall) -> int | None:
        if call.kind not in (WRITE, FLUSH, TRUNCATE):
            return None
        n = self.count
        self.count += 1
        if n != self.at:
            return None
        if self.fault == SHORT:
            if call.kind != WRITE or len(call.data) < 2:
                return None
            self.fired = call
            return len(call.data) // 2
        self.fired = call
        raise OSError(self.fault, os.strerror(self.fault))


@dataclass
class Outcome:
    fired: FileCall | None
    problems: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)  # vdisk functions the error came through


def vdisk_frames(exc: BaseException) -> list[str]:
    out = []
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = frame.f_globals.get("__name__", "")
        if module.startswith("vdisk."):
            out.append(f"{module}:{frame.f_code.co_name}")
    return out


def count_calls(scenario: Scenario, where: Path, seed: int) -> list[FileCall]:
    """The scenario's writes, flushes and size changes in a run without faults."""
    path = scenario.make(where)
    session = Session(path, Recorder([str(path)]), random.Random(seed), scenario.passphrase)
    with session.rec:
        scenario.run(session)
    return [c for c in session.rec.calls if c.kind in (WRITE, FLUSH, TRUNCATE)]


def _close_quietly(session: Session, problems: list[str]) -> None:
    img = session.guest.img
    if img is None or img.closed:
        return
    try:
        img.close()
    except VdiskError:
        pass
    except Exception as exc:
        problems.append(f"close() raised {type(exc).__name__}: {exc}")


def run_with_fault(scenario: Scenario, where: Path, seed: int, at: int, fault: int) -> Outcome:
    path = scenario.make(where)
    injector = FaultInjector([str(path)], at, fault)
    session = Session(path, injector, random.Random(seed), scenario.passphrase)
    problems: list[str] = []
    raised: BaseException | None = None
    with injector:
        try:
            scenario.run(session)
        except Exception as exc:
            raised = exc
        _close_quietly(session, problems)
    fired = injector.fired
    if fired is None:
        return Outcome(None)
    frames = vdisk_frames(raised) if raised is not None else []
    if fault == SHORT:
        if raised is not None:
            problems.append(f"a short write surfaced as {type(raised).__name__}: {raised}")
    elif not isinstance(raised, VdiskError):
        problems.append(f"surfaced as {type(raised).__name__}: {raised}")
    elif raised.errno != fault:
        problems.append(f"VdiskError with errno {raised.errno}, not {NAMES[fault]}: {raised}")
    problems += judge_after(session, path)
    return Outcome(fired, problems, frames)


def judge_after(session: Session, path: Path) -> list[str]:
    """Reopen read-write, read back what was acknowledged, close, then qemu-img check."""
    try:
        with Qcow2Image.open(str(path), **session.key()) as img:
            problems = session.guest.judge(1 << 62, lambda n: img.pread(n, 0), img.size)
    except VdiskError as exc:
        return [f"reopen failed: {exc}"]
    found = qemu_corruption(path, session.passphrase)
    return [*problems, found] if found else problems
