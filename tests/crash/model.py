"""The guest's side of a crash test: drive an image and know what it must read back.

``Guest`` wraps a Qcow2Image under a Recorder. Each write, zero, discard and resize updates a
sector model; each acknowledgement (a flush that returned, a FUA write, a close) snapshots it
and marks the record. After a crash, the newest acknowledgement whose flush the state holds must
read back exactly, except in sectors changed after it, which may hold any value they had since.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vdisk.qcow2 import Qcow2Image
from vdisk.testing.recorder import FLUSH, Recorder

SECTOR = 512


@dataclass
class Change:
    """Sectors [first, end) changed: to ``data`` (a write), or to zero/backing (discard, shrink)."""

    first: int
    end: int
    data: bytes | None


@dataclass
class Ack:
    record_index: int  # index of its mark in the record
    snapshot: np.ndarray  # (sectors, 512) uint8: the guest as acknowledged
    size: int
    changes_from: int  # index of the first change made after it
    sizes_from: int  # index in Guest.sizes of its size
    loose: np.ndarray  # sectors discarded since last written: zero or what lies underneath


@dataclass
class Guest:
    img: Qcow2Image | None
    rec: Recorder
    underneath: np.ndarray  # what an unallocated sector reads: the backing file, or zeros
    current: np.ndarray = field(init=False)
    loose: np.ndarray = field(init=False)
    changes: list[Change] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    ops: int = 0

    def __post_init__(self) -> None:
        self.current = self.underneath.copy()
        self.loose = np.zeros(len(self.current), dtype=bool)
        size = len(self.underneath) * SECTOR
        self.acks.append(Ack(-1, self.current.copy(), size, 0, 0, self.loose.copy()))
        self.sizes.append(size)

    @property
    def image(self) -> Qcow2Image:
        assert self.img is not None, "the scenario did not open the image"
        return self.img

    # -- guest operations ---------------------------------------------------------------
    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        assert offset % SECTOR == 0 and len(data) % SECTOR == 0
        first, end = offset // SECTOR, (offset + len(data)) // SECTOR
        # Logged first: a write that fails may still have landed, in part or whole.
        self.changes.append(Change(first, end, data))
        self.image.write(data, offset, fua=fua)
        self.current[first:end] = np.frombuffer(data, dtype=np.uint8).reshape(-1, SECTOR)
        self.loose[first:end] = False
        self.ops += 1
        if fua:
            self.ack("fua")

    def write_zeroes(self, offset: int, length: int) -> None:
        first, end = offset // SECTOR, (offset + length) // SECTOR
        self.changes.append(Change(first, end, bytes(length)))
        self.image.write_zeroes(offset, length)
        self.current[first:end] = 0
        self.loose[first:end] = False
        self.ops += 1

    def discard(self, offset: int, length: int) -> None:
        first, end = offset // SECTOR, (offset + length) // SECTOR
        self.changes.append(Change(first, end, None))
        self.image.discard(offset, length)
        # A hint: the old data may stay, or read as zeros or as the backing file.
        self.loose[first:end] = True
        self.ops += 1

    def resize(self, new_size: int, run: Callable[[], None]) -> None:
        """``run`` resizes the image; sectors past a new, smaller end read as zeros later."""
        old = self.image.size
        self.sizes.append(new_size)
        if new_size < old:
            self.changes.append(Change(new_size // SECTOR, old // SECTOR, None))
        run()
        grow = new_size // SECTOR - len(self.current)
        if grow > 0:
            pad = np.zeros((grow, SECTOR), dtype=np.uint8)
            self.current = np.concatenate([self.current, pad])
            self.underneath = np.concatenate([self.underneath, pad])
            self.loose = np.concatenate([self.loose, np.zeros(grow, dtype=bool)])
        if new_size < old:
            self.current[new_size // SECTOR : old // SECTOR] = 0
        self.ops += 1

    def replace(self, content: bytes, run: Callable[[], None]) -> None:
        """``run`` swaps the whole guest content for ``content`` (a snapshot applied, same
        size); until it returns, each sector may read old or new."""
        assert len(content) == len(self.current) * SECTOR
        self.changes.append(Change(0, len(self.current), content))
        run()
        self.current = np.frombuffer(content, dtype=np.uint8).reshape(-1, SECTOR).copy()
        self.loose[:] = False
        self.ops += 1

    def flush(self) -> None:
        self.image.flush()
        self.ack("flush")

    def close(self) -> None:
        self.image.close()
        self.ack("close")

    def ack(self, label: str) -> None:
        self.rec.mark(label)
        self.acks.append(
            Ack(
                len(self.rec.calls) - 1,
                self.current.copy(),
                self.sizes[-1],
                len(self.changes),
                len(self.sizes) - 1,
                self.loose.copy(),
            )
        )

    # -- judging a crash state ----------------------------------------------------------
    def newest_ack(self, durable: int) -> Ack:
        """The newest acknowledgement a state holding the record up to flush ``durable`` keeps:
        one whose last flush before it is in the state."""
        best = self.acks[0]
        last_flush = -1
        acks = iter(self.acks[1:])
        nxt = next(acks, None)
        for index, call in enumerate(self.rec.calls):
            if nxt is None or last_flush > durable:
                break
            if index == nxt.record_index:
                best = nxt
                nxt = next(acks, None)
            elif call.kind == FLUSH:
                last_flush = index
        return best

    def judge(self, durable: int, read: Callable[[int], bytes], size: int) -> list[str]:
        """Problems with what a recovered image reads (empty: it keeps every promise)."""
        ack = self.newest_ack(durable)
        allowed_sizes = set(self.sizes[ack.sizes_from :])
        if size not in allowed_sizes:
            return [f"size {size}, acknowledged {ack.size} (allowed {sorted(allowed_sizes)})"]
        got = np.frombuffer(read(min(size, ack.size)), dtype=np.uint8).reshape(-1, SECTOR)
        want = ack.snapshot[: len(got)]
        later = self.changes[ack.changes_from :]
        touched = np.zeros(len(got), dtype=bool)
        for ch in later:
            touched[ch.first : ch.end] = True
        differ = np.any(got != want, axis=1)
        loose = ack.loose[: len(got)]
        if loose.any():
            under = self.underneath[: len(got)]
            undefined_ok = ~np.any(got != 0, axis=1) | ~np.any(got != under, axis=1)
            differ &= ~(loose & undefined_ok)
        bad = np.nonzero(differ & ~touched)[0]
        problems = [
            f"sector {int(s)} (offset {int(s) * SECTOR:#x}) lost acknowledged data" for s in bad[:3]
        ]
        for s in np.nonzero(touched & differ)[0].tolist():
            if not self._was_value(s, got[s], ack, later):
                problems.append(f"sector {s} (offset {s * SECTOR:#x}) holds data it never had")
                if len(problems) > 3:
                    break
        return problems

    def _was_value(self, sector: int, value: np.ndarray, ack: Ack, later: list[Change]) -> bool:
        if ack.loose[sector] and (
            not value.any() or np.array_equal(value, self.underneath[sector])
        ):
            return True
        for ch in later:
            if not ch.first <= sector < ch.end:
                continue
            if ch.data is None:
                if not value.any() or np.array_equal(value, self.underneath[sector]):
                    return True
                continue
            at = (sector - ch.first) * SECTOR
            if value.tobytes() == ch.data[at : at + SECTOR]:
                return True
        return False
