"""Ranges of an export already known to hold data, so a structured READ can skip block status.

A sparse read asks the device which parts of the range are holes. On some file systems that
question costs far more than the read: tmpfs answers SEEK_HOLE by walking the page cache up to
the next hole, which in a fully written file is its end (0.6-1.5 ms for 256 MiB, a 1 MiB read
costs ~0.3 ms). So the server asks once for a wide window and remembers the data ranges here.

Only data is remembered, never holes: a range served as data is read from the device, so it is
correct whatever happened to it since (a discard makes it zeros, sent as data). Holes would go
stale when any connection writes. The cache is shared by every connection of an export; readers
take a snapshot without a lock (one tuple, replaced whole), writers hold the lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable

__all__ = ["KnownData"]

#: Merged data ranges kept at most (each two ints): bounds the memory of a fragmented file.
MAX_RANGES = 4096


class KnownData:
    """Sorted, disjoint [start, end) ranges of an export known to hold data."""

    def __init__(self) -> None:
        self._ranges: tuple[list[int], list[int]] = ([], [])
        self._lock = threading.Lock()

    def covers(self, offset: int, length: int) -> bool:
        """True if all of [offset, offset + length) is known data."""
        starts, ends = self._ranges
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and ends[i] >= offset + length

    def add(self, ranges: Iterable[tuple[int, int]], keep_from: int = 0) -> None:
        """Remember data ranges; past MAX_RANGES keep those ending after ``keep_from``
        (the reader's position: a sequential reader keeps what lies ahead of it)."""
        with self._lock:
            starts, ends = self._ranges
            merged = _merge([*zip(starts, ends, strict=True), *ranges])
            if len(merged) > MAX_RANGES:
                merged = [r for r in merged if r[1] > keep_from][:MAX_RANGES]
            self._ranges = ([r[0] for r in merged], [r[1] for r in merged])

    def clear(self) -> None:
        """Forget everything (after a discard or zero write: its holes should show again)."""
        with self._lock:
            self._ranges = ([], [])

    def __len__(self) -> int:
        return len(self._ranges[0])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ranges and join those that overlap or touch; empty ones are dropped."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
