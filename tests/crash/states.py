"""Crash states from a record: what a file may hold after a power cut at any point.

A disk keeps everything written before a completed flush. Of the writes since, it may keep any
subset, in any order, and tear each one at 512-byte sectors. From a record we build:

* every prefix ending at a flush (all writes before it, nothing after);
* within each epoch (the calls between two flushes), every in-order prefix: a crash with no
  reordering at each call;
* random subsets of each epoch's calls, applied in random order, some torn at sectors.

A state carries ``durable``: the index in the record of the last flush whose writes it holds
entirely (-1: none). States with the same bytes and the same ``durable`` are the same state.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from vdisk.testing.recorder import FLUSH, TRUNCATE, WRITE, FileCall

SECTOR = 512


@dataclass(frozen=True)
class CrashState:
    data: bytes
    durable: int  # record index of the last flush fully held (-1: only the starting file)
    how: str  # "flush", "prefix" or "random": which rule made it

    @property
    def digest(self) -> str:
        return digest(self.data)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def apply(file: bytearray, call: FileCall) -> None:
    """Apply one write or size change to an in-memory file."""
    if call.kind == WRITE:
        end = call.offset + len(call.data)
        if end > len(file):
            file.extend(bytes(end - len(file)))
        file[call.offset : end] = call.data
    elif call.kind == TRUNCATE:
        if call.offset < len(file):
            del file[call.offset :]
        else:
            file.extend(bytes(call.offset - len(file)))


def tear(call: FileCall, rng: random.Random) -> list[FileCall]:
    """The sectors of a write that reached the disk: a random non-empty subset of them."""
    if call.kind != WRITE or len(call.data) <= SECTOR:
        return [call]
    pieces: list[FileCall] = []
    pos = call.offset
    end = call.offset + len(call.data)
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        chunk = call.data[pos - call.offset : nxt - call.offset]
        pieces.append(FileCall(WRITE, call.path, pos, chunk, call.site))
        pos = nxt
    kept = [p for p in pieces if rng.random() < 0.5]
    return kept or [rng.choice(pieces)]


def crash_states(
    start: bytes, calls: list[FileCall], path: str, seed: int, randoms_per_epoch: int
) -> Iterator[CrashState]:
    """Every crash state of ``path`` by the rules above (duplicates included; see dedupe)."""
    rng = random.Random(seed)
    epochs: list[tuple[int, list[FileCall]]] = []  # (flush index before the epoch, its calls)
    current: list[FileCall] = []
    last_flush = -1
    for index, call in enumerate(calls):
        if call.path != path:
            continue
        if call.kind == FLUSH:
            epochs.append((last_flush, current))
            current = []
            last_flush = index
        elif call.kind in (WRITE, TRUNCATE):
            current.append(call)
    epochs.append((last_flush, current))

    file = bytearray(start)
    for durable, ops in epochs:
        base = bytes(file)
        yield CrashState(base, durable, "flush")
        for n in range(1, len(ops) + 1):
            apply(file, ops[n - 1])
            if n < len(ops):
                yield CrashState(bytes(file), durable, "prefix")
        if len(ops) < 2:
            continue
        for _ in range(randoms_per_epoch):
            chosen = [op for op in ops if rng.random() < 0.5]
            rng.shuffle(chosen)
            state = bytearray(base)
            for op in chosen:
                for piece in tear(op, rng) if rng.random() < 0.3 else [op]:
                    apply(state, piece)
            yield CrashState(bytes(state), durable, "random")
    yield CrashState(bytes(file), last_flush, "flush")  # the end: everything landed


def dedupe(states: Iterator[CrashState]) -> list[CrashState]:
    seen: set[tuple[str, int]] = set()
    out: list[CrashState] = []
    for state in states:
        key = (state.digest, state.durable)
        if key not in seen:
            seen.add(key)
            out.append(state)
    return out
