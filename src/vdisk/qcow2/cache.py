"""One metadata table cache shared by L2 tables and refcount blocks.

Each table is keyed by its host offset and by what it is (``offset | kind``: offsets are
cluster aligned, so the low bit is free). The hot paths in image.py look L2 tables up by bare
offset, which can therefore only ever find an L2 table. A cluster that two structures claim (an
L1 entry pointing at a refcount block) is a CorruptImageError naming both uses, never a
refcount block handed out as an L2 table.

Tables are kept decoded (an ``array('Q')`` of native L2 entries; refcounts as a
:class:`RefcountBlock`, an array of the refcount width, or for widths under 8 bits a numpy
uint8 array) so a hit hands back the live object: no copy, no decode. LRU eviction; a dirty
table is written back before it leaves, after its dependencies (the owner's ``before_write``
hook, e.g. "refcounts on disk before any L2 table that uses them").

Not thread-safe by itself: the image calls it with its metadata lock held.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from itertools import compress
from operator import not_

from ..errors import CorruptImageError
from ..fileio import pread_full, pwrite_full
from . import format as fmt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

L2 = 0
REFBLOCK = 1
KIND_NAMES = {L2: "L2 table", REFBLOCK: "refcount block"}
_KIND_MASK = 1  # the key bits that hold the kind

_NEED_SWAP = sys.byteorder == "little"


def decode_l2(buf: bytes | bytearray | memoryview) -> array[int]:
    table = array("Q")
    table.frombytes(buf)
    if _NEED_SWAP:
        table.byteswap()
    return table


def encode_l2(table: array[int]) -> bytes:
    if not _NEED_SWAP:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


# array typecodes of the refcount widths that are whole bytes (refcount_order 3..6).
_RC_TYPECODES = {3: "B", 4: "H", 5: next(c for c in "IL" if array(c).itemsize == 4), 6: "Q"}


class RefcountBlock(array):  # type: ignore[type-arg]  # array[int], told apart from L2's
    """A decoded refcount block of whole-byte entries (native byte order). A subclass, so a
    64-bit one is never mistaken for an L2 table (both would be ``array('Q')``)."""


def decode_refcount_block(buf: bytes | bytearray | memoryview, refcount_order: int) -> Any:
    """A refcount block as the cache keeps it; numpy only for widths under 8 bits."""
    code = _RC_TYPECODES.get(refcount_order)
    if code is None:
        dtype = "uint8"
        return fmt.decode_refcount_block(buf, refcount_order).astype(dtype)
    block = RefcountBlock(code)
    block.frombytes(buf)
    if _NEED_SWAP and block.itemsize > 1:
        block.byteswap()
    return block


def encode_refcount_block(block: Any, refcount_order: int) -> bytes:
    if not isinstance(block, array):
        return fmt.encode_refcount_block(block, refcount_order)
    if not _NEED_SWAP or block.itemsize == 1:
        return block.tobytes()
    copy = array(block.typecode, block)
    copy.byteswap()
    return copy.tobytes()


def empty_refcount_block(cluster_size: int, refcount_order: int) -> Any:
    code = _RC_TYPECODES.get(refcount_order)
    if code is None:
        import numpy as np

        return np.zeros(cluster_size * 8 >> refcount_order, dtype=np.uint8)
    return RefcountBlock(code, bytes(cluster_size))


def fill_refcounts(block: Any, start: int, stop: int, value: int) -> None:
    """Set entries [start, stop) of a refcount block to ``value``."""
    if stop <= start:
        return
    if isinstance(block, array):
        block[start:stop] = array(block.typecode, [value]) * (stop - start)
    else:
        block[start:stop] = value


def last_nonzero(block: Any) -> int:
    """Index of a refcount block's last nonzero entry, or -1."""
    if isinstance(block, array):
        used = len(block.tobytes().rstrip(b"\0"))
        return (used - 1) // block.itemsize if used else -1
    import numpy as np

    nz = np.flatnonzero(block)
    return int(nz[-1]) if nz.size else -1


def zero_entries(block: Any, start: int, stop: int) -> list[int]:
    """Indices in [start, stop) of a refcount block whose entries are 0."""
    if isinstance(block, array):
        return list(compress(range(start, stop), map(not_, block[start:stop])))
    import numpy as np

    return (np.flatnonzero(block[start:stop] == 0) + start).tolist()  # type: ignore[no-any-return]


class _Slot:
    __slots__ = ("dirty", "kind", "table")

    def __init__(self, kind: int, table: Any, dirty: bool) -> None:
        self.kind = kind
        self.table = table
        self.dirty = dirty


class MetadataCache:
    """LRU cache of cluster-sized metadata tables keyed by host offset."""

    def __init__(
        self,
        fd: int,
        cluster_size: int,
        refcount_order: int,
        capacity: int,
        before_write: Callable[[int], None],
    ) -> None:
        self.fd = fd
        self.cluster_size = cluster_size
        self.refcount_order = refcount_order
        self.capacity = max(capacity, 4)
        self.before_write = before_write
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    # -- codecs ---------------------------------------------------------------------------
    def _decode(self, kind: int, buf: bytearray) -> Any:
        if kind == L2:
            return decode_l2(buf)
        return decode_refcount_block(buf, self.refcount_order)

    def _encode(self, kind: int, table: Any) -> bytes:
        if kind == L2:
            return encode_l2(table)
        return encode_refcount_block(table, self.refcount_order)

    def empty_table(self, kind: int) -> Any:
        if kind == L2:
            return array("Q", bytes(self.cluster_size))
        return empty_refcount_block(self.cluster_size, self.refcount_order)

    # -- access ---------------------------------------------------------------------------
    def _claim(self, offset: int, kind: int) -> None:
        """Refuse a table at an offset that the cache holds as another kind."""
        for other, name in KIND_NAMES.items():
            if other != kind and (offset | other) in self._slots:
                raise CorruptImageError(
                    f"host cluster at {offset:#x} is used both as {name} and as {KIND_NAMES[kind]}"
                )

    def get(self, offset: int, kind: int) -> Any:
        """The live table at ``offset``, loading it on a miss."""
        key = offset | kind
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            self.hits += 1
            return slot.table
        self._claim(offset, kind)
        self.misses += 1
        buf = bytearray(self.cluster_size)
        if pread_full(self.fd, buf, offset) < self.cluster_size:
            raise CorruptImageError(
                f"{KIND_NAMES[kind]} at {offset:#x} lies past the end of the file"
            )
        table = self._decode(kind, buf)
        self._insert(key, _Slot(kind, table, False))
        return table

    def cached(self, offset: int, kind: int) -> _Slot | None:
        """The slot of the table if cached (no LRU update, no load), else None."""
        return self._slots.get(offset | kind)

    def peek(self, offset: int, kind: int = L2) -> Any:
        """The table if cached (no LRU update), else None."""
        slot = self._slots.get(offset | kind)
        return slot.table if slot is not None else None

    def add_new(self, offset: int, kind: int, table: Any) -> None:
        """Insert a freshly allocated table (dirty: it exists only in memory so far)."""
        self._claim(offset, kind)
        self._insert(offset | kind, _Slot(kind, table, True))

    def mark_dirty(self, offset: int, table: Any = None) -> None:
        """Mark a table changed. If it was evicted after the caller fetched it (another
        table was loaded meanwhile), the caller's live object is put back: it is newer than
        what the eviction wrote."""
        kinds: tuple[int, ...]
        if table is None:
            kinds = (L2, REFBLOCK)
        else:
            is_l2 = isinstance(table, array) and not isinstance(table, RefcountBlock)
            kinds = (L2 if is_l2 else REFBLOCK,)
        for kind in kinds:
            slot = self._slots.get(offset | kind)
            if slot is not None and (table is None or slot.table is table):
                slot.dirty = True
                return
        if table is None:
            raise KeyError(offset)
        self._insert(offset | kinds[0], _Slot(kinds[0], table, True))

    def drop(self, offset: int) -> None:
        """Forget a table without writing it (its cluster was freed)."""
        for kind in KIND_NAMES:
            self._slots.pop(offset | kind, None)

    def _insert(self, key: int, slot: _Slot) -> None:
        self._slots[key] = slot
        while len(self._slots) > self.capacity:
            old_key, old = next(iter(self._slots.items()))
            if old_key == key:
                break
            if old.dirty:
                self.before_write(old.kind)
                pwrite_full(self.fd, self._encode(old.kind, old.table), old_key & ~_KIND_MASK)
            del self._slots[old_key]

    # -- write-back -------------------------------------------------------------------------
    def dirty_count(self, kind: int) -> int:
        return sum(1 for s in self._slots.values() if s.dirty and s.kind == kind)

    def write_back(self, kind: int) -> int:
        """Write every dirty table of ``kind`` (in offset order). Returns how many."""
        dirty = sorted(key for key, s in self._slots.items() if s.dirty and s.kind == kind)
        for key in dirty:
            slot = self._slots[key]
            pwrite_full(self.fd, self._encode(kind, slot.table), key & ~_KIND_MASK)
            slot.dirty = False
        return len(dirty)

    def clear(self) -> None:
        self._slots.clear()

    def resize(self, capacity: int) -> None:
        self.capacity = max(capacity, 4)


def default_capacity(
    virtual_size: int,
    cluster_bits: int,
    l2_entry_size: int,
    l2_cache_size: int | None,
    refcount_cache_size: int | None = None,
) -> int:
    """Number of tables to cache, sized like QEMU.

    QEMU (Linux) caches by default enough L2 to cover the whole disk, up to 32 MiB of L2
    tables, and a quarter of that (at least 4 clusters) for refcount blocks.
    """
    cs = 1 << cluster_bits
    if l2_cache_size is None:
        need = (virtual_size >> cluster_bits) * l2_entry_size
        l2_cache_size = min(max(need, 8 * cs), 32 << 20)
    if refcount_cache_size is None:
        refcount_cache_size = max(l2_cache_size // 4, 4 * cs)
    return max((l2_cache_size + refcount_cache_size) // cs, 8)


__all__ = ["L2", "REFBLOCK", "MetadataCache", "decode_l2", "default_capacity", "encode_l2"]
