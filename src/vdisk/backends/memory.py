"""A RAM-backed device, sparse and sharded so that queues rarely contend."""

from __future__ import annotations

import threading

from ..block import BlockDeviceBase, Extent, merge_extents

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

CHUNK_BITS = 16  # 64 KiB chunks allocated on first write
CHUNK = 1 << CHUNK_BITS


class MemoryDevice(BlockDeviceBase):
    """Sparse in-memory storage: chunks are allocated on write; untouched ones read as zeros.

    A lock per shard (chunk index modulo ``shards``) serialises writers of the same chunks while
    letting different queues proceed in parallel.
    """

    granularity = CHUNK

    def __init__(
        self, size: int, readonly: bool = False, shards: int = 16, name: str = "memory"
    ) -> None:
        super().__init__(size, readonly, name)
        self._chunks: dict[int, bytearray] = {}
        self._locks = [threading.Lock() for _ in range(shards)]

    def _spans(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        """Yield (chunk index, offset in chunk, count, offset in request)."""
        done = 0
        while done < length:
            pos = offset + done
            index, inner = pos >> CHUNK_BITS, pos & (CHUNK - 1)
            count = min(CHUNK - inner, length - done)
            yield index, inner, count, done
            done += count

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf).cast("B")
        self.check_request(offset, len(view))
        for index, inner, count, done in self._spans(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                view[done : done + count] = bytes(count)
            else:
                view[done : done + count] = chunk[inner : inner + count]
        return len(view)

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        view = memoryview(buf).cast("B")
        self.check_request(offset, len(view), write=True)
        locks = self._locks
        for index, inner, count, done in self._spans(offset, len(view)):
            with locks[index % len(locks)]:
                chunk = self._chunks.get(index)
                if chunk is None:
                    chunk = self._chunks[index] = bytearray(CHUNK)
                chunk[inner : inner + count] = view[done : done + count]
        return len(view)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        self._zero(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        locks = self._locks
        for index, inner, count, _ in self._spans(offset, length):
            with locks[index % len(locks)]:
                if count == CHUNK:
                    self._chunks.pop(index, None)
                elif (chunk := self._chunks.get(index)) is not None:
                    chunk[inner : inner + count] = bytes(count)

    def flush(self) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        extents = []
        for index, _, count, done in self._spans(offset, length):
            if index in self._chunks:
                extents.append(Extent(offset + done, count, data=True, zero=False))
            else:
                extents.append(Extent(offset + done, count, data=False, zero=True, present=False))
        return merge_extents(extents)
