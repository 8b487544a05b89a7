"""Run a scenario under the recorder, then judge every crash state of its record.

Each distinct state is written to a file and judged three ways:

1. unless it is dirty (lazy refcounts), ``qemu-img check`` finds no corruption (leaks are fine);
2. vdisk opens it read-write (repairing a dirty image) and reads the whole guest: every
   acknowledged sector is there, and no sector holds data it never had;
3. after vdisk closed it, ``qemu-img check`` again finds no corruption.

qemu-img runs in a small thread pool, once per distinct file content.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vdisk.errors import VdiskError
from vdisk.qcow2 import Qcow2Image
from vdisk.testing.recorder import FLUSH, TRUNCATE, WRITE, Recorder

from .scenarios import Scenario, Session
from .states import CrashState, crash_states, dedupe, digest

QEMU_WORKERS = 2


@dataclass
class Figures:
    scenario: str
    calls: int = 0  # writes, flushes and size changes recorded
    states: int = 0  # crash states built (with duplicates)
    distinct: int = 0  # states judged by vdisk
    qemu_checks: int = 0
    problems: list[str] = field(default_factory=list)


def record(scenario: Scenario, where: Path, seed: int) -> tuple[Session, bytes]:
    """Make the scenario's image and run it under a Recorder; (session, file before the run)."""
    path = scenario.make(where)
    start = path.read_bytes()
    session = Session(path, Recorder([str(path)]), random.Random(seed), scenario.passphrase)
    with session.rec:
        scenario.run(session)
    return session, start


# Held while a qemu-img child is started and while the judge has an image open: a child
# holds, between its fork and its exec, the locks of every descriptor open at the fork, and a
# data file is one file shared by every state.
SPAWN_LOCK = threading.Lock()


def qemu_corruption(path: Path, passphrase: str | None = None) -> str | None:
    """What qemu-img check finds beyond leaks, or None."""
    # -U: the copy is private, but a data file is shared by every state (and vdisk's opens).
    target = [str(path)]
    if passphrase:
        target = [
            "--object", f"secret,id=s0,data={passphrase}",
            "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=s0",
        ]  # fmt: skip
    with SPAWN_LOCK:  # Popen returns once the child has exec'd
        child = subprocess.Popen(
            ["qemu-img", "check", "-U", "--output=json", *target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    stdout, stderr = child.communicate()
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return f"qemu-img check rc {proc.returncode}: {proc.stderr.strip()[:200]}"
    if proc.returncode not in (0, 3) or report.get("corruptions") or report.get("check-errors"):
        keys = ("corruptions", "check-errors", "leaks")
        return f"qemu-img check rc {proc.returncode}: " + ", ".join(
            f"{k}={report.get(k, 0)}" for k in keys
        )
    return None


def _dirty(data: bytes) -> bool:
    if len(data) < 80 or struct.unpack_from(">I", data, 4)[0] < 3:
        return False
    return bool(struct.unpack_from(">Q", data, 72)[0] & 1)


class _Judge:
    """Judges states of one scenario; qemu-img checks run beside it."""

    def __init__(
        self,
        session: Session,
        where: Path,
        figures: Figures,
        check: Callable[[Session, Path], list[str]] | None = None,
    ) -> None:
        self.session = session
        self.check = check  # the scenario's own judgement of a state, if it has one
        self.where = where
        self.figures = figures
        self.seen: set[str] = set()
        self.pool = ThreadPoolExecutor(QEMU_WORKERS)
        self.pending: list[tuple[str, Future[str | None]]] = []
        self.kept = 0

    def qemu_check(self, data: bytes, digest: str, what: str) -> None:
        if digest in self.seen:
            return
        self.seen.add(digest)
        copy = self.where / f"q-{digest}.qcow2"
        copy.write_bytes(data)
        self.pending.append((what, self.pool.submit(self._check_and_drop, copy)))
        self.figures.qemu_checks += 1

    def _check_and_drop(self, copy: Path) -> str | None:
        found = qemu_corruption(copy, self.session.passphrase)
        if found is None:
            copy.unlink()
        return found

    def judge(self, state: CrashState, index: int) -> None:
        what = f"{self.figures.scenario} state {index} ({state.how}, durable={state.durable})"
        if not _dirty(state.data):
            self.qemu_check(state.data, state.digest, what + " as the crash left it")
        # A file per state: the qemu-img threads fork, and a child holds (until its exec) the
        # image locks of a descriptor the parent just closed, so reusing one name can clash.
        path = self.where / f"state-{index}.qcow2"
        path.write_bytes(state.data)
        problems: list[str] = self.check(self.session, path) if self.check else []
        try:
            with SPAWN_LOCK, Qcow2Image.open(str(path), **self.session.key()) as img:
                problems += self.session.guest.judge(
                    state.durable, lambda n: img.pread(n, 0), img.size
                )
        except VdiskError as exc:
            problems += [f"vdisk cannot open it: {exc}"]
        after = path.read_bytes()
        path.unlink()
        if problems:
            self.keep(state.data, what, problems)
        self.qemu_check(after, digest(after), what + " after vdisk opened it")

    def keep(self, data: bytes, what: str, problems: list[str]) -> None:
        saved = self.where / f"failed-{self.kept}.qcow2"
        self.kept += 1
        saved.write_bytes(data)
        self.figures.problems.append(f"{what}: {'; '.join(problems)} [saved {saved}]")

    def finish(self) -> None:
        for what, future in self.pending:
            found = future.result()
            if found:
                self.figures.problems.append(f"{what}: {found}")
        self.pool.shutdown()


def explore(scenario: Scenario, where: Path, seed: int, randoms_per_epoch: int) -> Figures:
    """Record the scenario once and judge every distinct crash state of the image."""
    figures = Figures(scenario.name)
    session, start = record(scenario, where, seed)
    calls = session.rec.calls
    figures.calls = sum(c.kind in (WRITE, FLUSH, TRUNCATE) for c in calls)
    path = os.path.realpath(session.path)
    raw = list(crash_states(start, calls, path, seed, randoms_per_epoch))
    figures.states = len(raw)
    states = dedupe(iter(raw))
    figures.distinct = len(states)
    # The backing file stays; the image itself is rewritten per state from here on.
    shutil.copy(session.path, where / "final.qcow2")
    judge = _Judge(session, where, figures, scenario.check)
    try:
        for index, state in enumerate(states):
            judge.judge(state, index)
    finally:
        judge.finish()
    return figures
