"""The ``qemu-img compare`` engine: do two devices read the same?

What both sides know to be zero (from ``block_status``) is skipped; the rest is read in large
chunks and compared, and the first differing 512-byte sector is reported. Strict mode also
wants equal sizes and equal block status. The outcome carries qemu-img's exit status and
messages; printing them is the CLI's (``vdisk.cli.compare``). Raw files should be handed in
as ``SectorPadded``, sized as QEMU sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .block import SectorPadded
from .convert import Source
from .errors import VdiskError
from .qcow2.image import Qcow2Image
from .sizes import SECTOR_SIZE

CHUNK = 2 << 20  # bytes compared per read (qemu-img's IO_BUF_SIZE: -p moves by this much)
PROBE = 1 << 30  # block status window

IDENTICAL, DIFFERENT, STATUS_FAILED, READ_FAILED = 0, 1, 3, 4  # qemu-img's exit statuses


@dataclass
class CompareResult:
    """``status`` as qemu-img exits; ``lines`` for stdout, each also passed to ``on_line`` as
    it is found (qemu-img prints a size warning between progress lines); ``error`` for stderr
    (3 and 4)."""

    status: int = IDENTICAL
    lines: list[str] = field(default_factory=list)
    error: str | None = None
    on_line: Callable[[str], None] | None = None

    def say(self, line: str) -> None:
        self.lines.append(line)
        if self.on_line is not None:
            self.on_line(line)


class _Stop(Exception):
    """Ends the comparison early; the result says why."""


@dataclass
class _Side:
    dev: Source
    name: str
    result: CompareResult
    buf: bytearray

    @property
    def status_span(self) -> int:
        """How far one block status answer of QEMU's reaches: a qcow2 image's answers stop at
        the end of an L2 table, so qemu-img compare's progress moves at most that far a step."""
        if isinstance(self.dev, Qcow2Image):
            return self.dev.cluster_size << self.dev.header.l2_bits
        return PROBE

    def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, end, known_zero) of each extent of [offset, offset+length)."""
        try:
            extents = self.dev.block_status(offset, length)
        except VdiskError as exc:
            self.result.error = f"Sector allocation test failed for {self.name}: {exc}"
            self.result.status = STATUS_FAILED
            raise _Stop from None
        # Not merged: qemu-img steps (and shows progress) extent by extent.
        return [(e.offset, e.end, e.zero and not e.data) for e in extents]

    def read(self, offset: int, n: int) -> np.ndarray:
        view = memoryview(self.buf)[:n]
        try:
            self.dev.readinto(view, offset)
        except VdiskError as exc:
            self.result.error = f"Error while reading offset {offset} of {self.name}: {exc}"
            self.result.status = READ_FAILED
            raise _Stop from None
        return np.frombuffer(view, dtype=np.uint8)


def _first_diff(a: np.ndarray, b: np.ndarray | None) -> int:
    """Index of the first differing byte (``b`` None: the first nonzero one), or -1."""
    mask = a != b if b is not None else a != 0
    if not mask.any():
        return -1
    return int(np.argmax(mask))


def _mismatch(result: CompareResult, chunk_start: int, index: int) -> None:
    sector = chunk_start + index // SECTOR_SIZE * SECTOR_SIZE
    result.say(f"Content mismatch at offset {sector}!")
    result.status = DIFFERENT
    raise _Stop


def compare(
    a: Source,
    b: Source,
    name1: str,
    name2: str,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> CompareResult:
    """Compare ``a`` with ``b`` as ``qemu-img compare [-s]`` does; ``progress(done, total)``
    is called as the comparison moves on (total: the larger size), ``on_line`` with each
    line of the outcome as it is found."""
    result = CompareResult(on_line=on_line)
    if strict and a.size != b.size:
        result.say("Strict mode: Image size mismatch!")
        result.status = DIFFERENT
        return result
    common = min(a.size, b.size)
    # qemu-img checks block status step by step beside the content: what precedes the first
    # status mismatch is still compared (and may differ first), and progress moves up to it.
    mismatch = _strict_mismatch(a, b, common) if strict else None
    side1 = _Side(a, name1, result, bytearray(CHUNK))
    side2 = _Side(b, name2, result, bytearray(CHUNK))
    total = max(a.size, b.size)
    report = progress or (lambda done, total: None)
    try:
        _compare_common(
            side1, side2, common if mismatch is None else mismatch, lambda done: report(done, total)
        )
        if mismatch is not None:
            result.say(f"Strict mode: Offset {mismatch} block status mismatch!")
            result.status = DIFFERENT
            return result
        if a.size != b.size:
            result.say("Warning: Image size mismatch!")
            _check_tail(
                side1 if a.size > b.size else side2, common, lambda done: report(done, total)
            )
    except _Stop:
        return result
    report(total, total)
    result.say("Images are identical.")
    return result


def _compare_common(
    side1: _Side, side2: _Side, common: int, moved_to: Callable[[int], None]
) -> None:
    """Compare [0, common) of both sides, skipping what both know to be zero. ``moved_to`` is
    told of every step as qemu-img compare takes them: a zero run up to the next block status
    boundary, or one read of at most CHUNK."""
    span = min(side1.status_span, side2.status_span)
    pos = 0
    while pos < common:
        window = min(PROBE, common - pos)
        runs1 = side1.zero_map(pos, window)
        runs2 = side2.zero_map(pos, window)
        i = j = 0
        while pos < runs1[-1][1]:
            while runs1[i][1] <= pos:
                i += 1
            while runs2[j][1] <= pos:
                j += 1
            end = min(runs1[i][1], runs2[j][1], (pos // span + 1) * span)
            z1, z2 = runs1[i][2], runs2[j][2]
            if z1 and z2:
                pos = end
                moved_to(pos)
                continue
            while pos < end:
                n = min(CHUNK, end - pos)
                d1 = None if z1 else side1.read(pos, n)
                d2 = None if z2 else side2.read(pos, n)
                if d1 is None:
                    assert d2 is not None
                    idx = _first_diff(d2, None)
                else:
                    idx = _first_diff(d1, d2)
                if idx >= 0:
                    _mismatch(side1.result, pos, idx)
                pos += n
                moved_to(pos)


def _check_tail(over: _Side, pos: int, moved_to: Callable[[int], None]) -> None:
    """The larger side past the smaller one's end must read as zeros."""
    size = over.dev.size
    span = over.status_span
    while pos < size:
        window = min(PROBE, size - pos)
        for start, end, z in over.zero_map(pos, window):
            off = start
            while off < end:
                step = min(end, (off // span + 1) * span) - off
                if not z:
                    step = min(CHUNK, step)
                    idx = _first_diff(over.read(off, step), None)
                    if idx >= 0:
                        _mismatch(over.result, off, idx)
                off += step
                moved_to(off)
        pos += window


def _strict_mismatch(a: Source, b: Source, common: int) -> int | None:
    """First offset where the two images' block status flags differ (qemu-img compare -s)."""

    def runs(dev: Source, off: int, n: int) -> list[tuple[int, int, tuple[bool, ...]]]:
        raw = isinstance(dev, SectorPadded)
        out: list[tuple[int, int, tuple[bool, ...]]] = []
        for e in dev.block_status(off, n):
            has_offset = raw or e.host_offset is not None
            zero = e.zero or (not e.present and not e.data)
            at_eof = e.end == dev.size
            out.append((e.offset, e.end, (zero, e.data, e.present, has_offset, at_eof)))
        return out

    pos = 0
    while pos < common:
        window = min(PROBE, common - pos)
        r1, r2 = runs(a, pos, window), runs(b, pos, window)
        i = j = 0
        while i < len(r1) and j < len(r2):
            if r1[i][2] != r2[j][2]:
                return pos
            end = min(r1[i][1], r2[j][1])
            pos = end
            if r1[i][1] == end:
                i += 1
            if r2[j][1] == end:
                j += 1
    return None
