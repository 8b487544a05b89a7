"""Refcounts: the two-level refcount structure, the free-space index and cluster allocation.

The refcount table lives in memory (at most 8 MiB); refcount blocks go through the shared
metadata cache. Free clusters are found with a scan cursor that walks the file once, block by
block (numpy over a whole block), feeding a min-heap of free cluster indices; clusters freed
later go straight onto the heap. Allocation is therefore amortised O(log n), never a full scan
per request. Past the scanned area the file end is the next free cluster.

Whatever the refcounts say, no allocation hands out a cluster of the shared ``metadata`` set
(header, L1, refcount structures, L2 tables, snapshot and bitmap structures, crypto area): a
damaged refcount block must never turn into an overwritten header.

:func:`rebuild_refcount_structure` is the one rebuild of the whole structure from expected
refcounts (``check -r all`` and the open-time repair of a dirty lazy-refcounts image both reach
it through ``check.py``; the expected refcounts come from ``references.py``).

Not thread-safe by itself: the image calls it with its metadata lock held.
"""

from __future__ import annotations

import heapq
import os
import struct
from array import array

from ..errors import CorruptImageError, NoSpaceError
from ..fileio import pread_full, pwrite_full
from . import format as fmt
from .cache import (
    REFBLOCK,
    MetadataCache,
    decode_l2,
    encode_l2,
    fill_refcounts,
    last_nonzero,
    zero_entries,
)

TYPE_CHECKING = False  # typing itself costs `vdisk convert` about a bare start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    import numpy as np

    # A refcount block as the cache keeps it: cache.RefcountBlock (an array), or a numpy
    # uint8 array for widths under 8 bits; both index and assign by entry.
    RefBlock = Any


class RefcountManager:
    def __init__(
        self,
        fd: int,
        header: fmt.Header,
        cache: MetadataCache,
        file_size: int,
        metadata: set[int],
        path: str,
        load: bool = True,
    ) -> None:
        self.fd = fd
        self.header = header
        self.cache = cache
        self.path = path
        self.metadata = metadata  # host cluster indices holding metadata (shared with image)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.rb_bits = header.refblock_bits
        self.rb_entries = 1 << self.rb_bits
        self.max_refcount = (1 << header.refcount_bits) - 1
        self.end_cluster = (file_size + self.cluster_size - 1) >> self.cluster_bits
        self.scan_cursor = 0
        self.free_heap: list[int] = []
        self.table_dirty: set[int] = set()
        # A refcount-table move that failed half-way: memory describes the new table, the
        # header may still name the old one, so no refcount metadata may be written again.
        self.move_failed: OSError | None = None
        self.table = array("Q")
        self.tail_used = self.end_cluster
        # Told of every cluster whose refcount falls to 0 (compressed writes stop packing
        # into it).
        self.on_release: Callable[[int], None] | None = None
        if load:
            self._load_table(file_size)
        self.metadata.add(0)  # the header cluster

    def _load_table(self, file_size: int) -> None:
        h = self.header
        size = h.refcount_table_clusters * self.cluster_size
        buf = bytearray(size)
        pread_full(self.fd, buf, h.refcount_table_offset)
        self.table = decode_l2(buf)
        # In Python, not numpy (a read-only open then never loads it): one pass over the
        # table's used entries, 8 KiB of them per cluster of table.
        used = [(i, e) for i, e in enumerate(self.table) if e]
        unaligned = fmt.REFT_RESERVED_MASK | (self.cluster_size - 1)
        for i, e in used:
            if e & unaligned:
                raise CorruptImageError(
                    f"refcount table entry {i}: refcount block offset is not cluster aligned",
                    path=self.path,
                )
        for i, e in used:
            if e + self.cluster_size > file_size:
                raise CorruptImageError(
                    f"refcount table entry {i}: refcount block lies past the end of the file",
                    path=self.path,
                )
        # Clusters past the file end may still carry refcounts; find the last one so that
        # allocation at the end only checks refcounts below it.
        self.tail_used = self.end_cluster
        for b in range(len(self.table) - 1, (self.end_cluster >> self.rb_bits) - 1, -1):
            if self.table[b]:
                last = last_nonzero(self.cache.get(self.table[b], REFBLOCK))
                if last >= 0:
                    self.tail_used = max(self.end_cluster, (b << self.rb_bits) + last + 1)
                    break

    # -- lookups --------------------------------------------------------------------------
    def _block(self, block_index: int, create: bool) -> RefBlock | None:

        if block_index < len(self.table):
            off = self.table[block_index]
            if off:
                block: RefBlock = self.cache.get(off, REFBLOCK)
                return block
        if not create:
            return None
        if block_index >= len(self.table):
            self.grow_table(block_index + 1)
            return self._block(block_index, create)
        # A new refcount block. Put it at the file end; if that lies in the range it covers,
        # it describes itself, else its own refcount lives in another block (recursion ends
        # because the end of the file is covered by the newest block).
        base = block_index << self.rb_bits
        c = self._take_end(1)
        new: RefBlock = self.cache.empty_table(REFBLOCK)
        self.metadata.add(c)
        if base <= c < base + self.rb_entries:
            new[c - base] = 1
        else:
            self.add(c, 1)  # before the new block enters the cache, so it cannot evict it
        self.table[block_index] = c << self.cluster_bits
        self.table_dirty.add(block_index)
        self.cache.add_new(c << self.cluster_bits, REFBLOCK, new)
        return new

    def get(self, cluster: int) -> int:
        block = self._block(cluster >> self.rb_bits, create=False)
        if block is None:
            return 0
        return int(block[cluster & (self.rb_entries - 1)])

    def unreferenced_metadata(self) -> int | None:
        """A metadata cluster whose refcount reads 0, or None.

        Every metadata cluster holds a reference, so one at 0 shows the refcounts themselves
        are wrong (a damaged ``refcount_order``, say): allocating from them is guesswork.
        """
        mask = self.rb_entries - 1
        block: RefBlock | None = None
        block_index = -1
        for c in sorted(self.metadata):
            if c >> self.rb_bits != block_index:
                block_index = c >> self.rb_bits
                block = self._block(block_index, create=False)
            if block is None or not block[c & mask]:
                return c
        return None

    def add(self, cluster: int, delta: int) -> int:
        """Change one refcount; returns the new value. Frees the cluster at zero."""
        if delta > 0 and cluster >= self.end_cluster:
            # Only clusters inside the file (or just allocated at its end) gain references;
            # anything else is a garbage offset and must not grow the refcount table.
            raise CorruptImageError(
                f"refcount increase for cluster {cluster}, past the end of the file",
                path=self.path,
            )
        block = self._block(cluster >> self.rb_bits, create=delta > 0)
        if block is None:
            raise CorruptImageError(
                f"refcount of cluster {cluster} would drop below zero", path=self.path
            )
        i = cluster & (self.rb_entries - 1)
        value = int(block[i]) + delta
        if value < 0:
            raise CorruptImageError(
                f"refcount of cluster {cluster} would drop below zero", path=self.path
            )
        if value > self.max_refcount:
            raise NoSpaceError(
                f"refcount of cluster {cluster} would exceed {self.max_refcount} "
                f"(refcount_bits={self.header.refcount_bits})",
                path=self.path,
            )
        block[i] = value
        self.cache.mark_dirty(self.table[cluster >> self.rb_bits], block)
        if value == 0:
            self._released(cluster)
        return value

    def _released(self, cluster: int) -> None:
        self.metadata.discard(cluster)
        if self.on_release is not None:
            self.on_release(cluster)
        if cluster < self.scan_cursor:
            heapq.heappush(self.free_heap, cluster)

    # -- allocation -----------------------------------------------------------------------
    def _scan_step(self) -> None:
        start = self.scan_cursor
        bi = start >> self.rb_bits
        base = bi << self.rb_bits
        stop = min(base + self.rb_entries, self.end_cluster)
        block = self._block(bi, create=False)
        if block is None:
            found = list(range(start, stop))
        else:
            found = [base + i for i in zero_entries(block, start - base, stop - base)]
        self.scan_cursor = stop
        if found:
            self.free_heap.extend(found)
            heapq.heapify(self.free_heap)

    def _take_free(self) -> int | None:
        meta = self.metadata
        while True:
            if self.free_heap:
                c = heapq.heappop(self.free_heap)
                if c in meta:
                    continue  # refcount 0 but holds metadata: never hand it out
                return c
            if self.scan_cursor >= self.end_cluster:
                return None
            self._scan_step()

    def _last_used(self, start: int, count: int) -> int | None:
        """The last cluster of [start, start+count) that holds metadata or a refcount."""
        meta = self.metadata
        check_refcounts = start < self.tail_used
        for c in range(start + count - 1, start - 1, -1):
            if c in meta or (check_refcounts and self.get(c)):
                return c
        return None

    def _take_end(self, count: int) -> int:
        """``count`` contiguous clusters at the end of the file (refcounts still 0)."""
        while True:
            start = self.end_cluster
            used = self._last_used(start, count)
            if used is None:
                break
            # Something past the file end already has a refcount (QEMU may leave such
            # clusters) or is metadata; step over it rather than hand it out twice.
            self.end_cluster = used + 1
            self.scan_cursor = max(self.scan_cursor, self.end_cluster)
        if self.scan_cursor == start:
            self.scan_cursor = start + count
        self.end_cluster = start + count
        return start

    def allocate_end_fast(self, count: int = 1) -> int | None:
        """The first of ``count`` contiguous clusters at the file end when that is trivial
        (no free clusters to reuse, no metadata among them, one cached refcount block covers
        them); None means: use :meth:`allocate`."""
        c = self.end_cluster
        end = c + count
        if (
            self.free_heap
            or self.scan_cursor < c
            or c < self.tail_used
            or self.move_failed is not None
            or (end - 1) >> self.rb_bits != c >> self.rb_bits
        ):
            return None
        if c in self.metadata if count == 1 else not self.metadata.isdisjoint(range(c, end)):
            return None
        bi = c >> self.rb_bits
        if bi >= len(self.table):
            return None
        off = self.table[bi]
        slot = self.cache.cached(off, REFBLOCK) if off else None
        if slot is None:
            return None
        first = c & (self.rb_entries - 1)
        if count == 1:
            slot.table[first] = 1
        else:
            fill_refcounts(slot.table, first, first + count, 1)
        slot.dirty = True
        self.end_cluster = self.scan_cursor = end
        return c

    def refuse_after_failed_move(self) -> None:
        if self.move_failed is not None:
            raise OSError(
                self.move_failed.errno,
                f"moving the refcount table failed ({self.move_failed.strerror}); the image "
                "stays as it was at its last flush: reopen it",
            )

    def allocate(self, count: int) -> list[int]:
        """``count`` clusters (refcount 1), reusing freed ones first, contiguous at the end."""
        self.refuse_after_failed_move()
        out: list[int] = []
        while len(out) < count:
            c = self._take_free()
            if c is None:
                break
            out.append(c)
        if len(out) < count:
            start = self._take_end(count - len(out))
            out.extend(range(start, start + count - len(out)))
        for c in out:
            self.add(c, 1)
        return out

    def allocate_contiguous(self, count: int) -> int:
        """``count`` contiguous clusters (refcount 1), from the end of the file."""
        self.refuse_after_failed_move()
        start = self._take_end(count)
        for c in range(start, start + count):
            self.add(c, 1)
        return start

    def free(self, cluster: int, count: int = 1) -> None:
        for c in range(cluster, cluster + count):
            self.add(c, -1)

    # -- growth ---------------------------------------------------------------------------
    def grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger one at the end of the file.

        The new table and any refcount blocks needed to describe it (and themselves) are
        laid out together, written and synced before the header switches to them.
        """

        cs = self.cluster_size
        per_cluster = cs // 8
        old_clusters = self.header.refcount_table_clusters
        old_offset = self.header.refcount_table_offset
        want = min(
            len(self.table) + len(self.table) // 2 + per_cluster, fmt.MAX_REFTABLE_BYTES // 8
        )
        want = max(min_entries, want)
        start, t_clusters, new_blocks = self._layout_table(want)
        total = t_clusters + len(new_blocks)
        self.end_cluster = start + total
        if self.scan_cursor == start:
            self.scan_cursor = self.end_cluster
        table = array("Q", self.table)
        table.extend([0] * (t_clusters * per_cluster - len(table)))
        block_arrays: dict[int, RefBlock] = {}
        for i, b in enumerate(new_blocks):
            c = start + t_clusters + i
            table[b] = c << self.cluster_bits
            block_arrays[b] = self.cache.empty_table(REFBLOCK)
        self.table = table
        for c in range(start, start + total):
            b = c >> self.rb_bits
            if b in block_arrays:
                block_arrays[b][c & (self.rb_entries - 1)] += 1
            else:
                self.add(c, 1)
        for b, arr in block_arrays.items():
            off = table[b]
            self.cache.add_new(off, REFBLOCK, arr)
        self.metadata.update(range(start, start + total))
        try:
            # Order: blocks, then the table, then the header pointing at it.
            self.cache.write_back(REFBLOCK)
            pwrite_full(self.fd, encode_l2(self.table), start << self.cluster_bits)
            os.fdatasync(self.fd)
            self.table_dirty.clear()
            _write_header_table(self.fd, self.header, start << self.cluster_bits, t_clusters)
        except OSError as exc:
            self.move_failed = exc
            raise
        # The old table is unreferenced now (the header switch is durable).
        old_first = old_offset >> self.cluster_bits
        for c in range(old_first, old_first + old_clusters):
            self.metadata.discard(c)
            self.add(c, -1)

    def _layout_table(self, want: int) -> tuple[int, int, list[int]]:
        """Place a refcount table of ``want`` entries, plus the new refcount blocks that must
        describe it, in one free run at the file end: (start, table clusters, block indices)."""
        cs = self.cluster_size
        per_cluster = cs // 8
        while True:
            start = self._take_end(0)
            t_clusters = (want + per_cluster - 1) // per_cluster
            new_blocks: list[int] = []
            while True:
                end = start + t_clusters + len(new_blocks)
                needed = [
                    b
                    for b in range(start >> self.rb_bits, ((end - 1) >> self.rb_bits) + 1)
                    if b >= len(self.table) or not self.table[b]
                ]
                entries = max(want, needed[-1] + 1 if needed else 0)
                t_new = (entries + per_cluster - 1) // per_cluster
                if len(needed) == len(new_blocks) and t_new == t_clusters:
                    break
                new_blocks = needed
                t_clusters = max(t_clusters, t_new)
            if t_clusters * cs > fmt.MAX_REFTABLE_BYTES:
                raise NoSpaceError(
                    "refcount table would exceed QEMU's 8 MiB limit; use larger clusters",
                    path=self.path,
                )
            used = self._last_used(start, t_clusters + len(new_blocks))
            if used is None:
                return start, t_clusters, new_blocks
            self.end_cluster = used + 1  # the run is not free: lay it out past ``used``
            self.scan_cursor = max(self.scan_cursor, self.end_cluster)

    # -- write-back -----------------------------------------------------------------------
    def has_dirty(self) -> bool:
        return bool(self.table_dirty) or self.cache.dirty_count(REFBLOCK) > 0

    def write_back(self) -> bool:
        """Write dirty refcount blocks, then dirty refcount table entries.

        A table entry may name a new block only once the block is on disk and the block's own
        refcount is reachable: so blocks are synced first, and an entry whose block is counted
        in another new block goes out in a later round than that block's entry, a sync between.
        Without new blocks nothing is synced here."""
        self.refuse_after_failed_move()
        wrote = self.cache.write_back(REFBLOCK) > 0
        if not self.table_dirty:
            return wrote
        if wrote:
            os.fdatasync(self.fd)
        base = self.header.refcount_table_offset
        pending = set(self.table_dirty)
        while pending:
            # The table index of the block that counts block i's own cluster.
            home = {i: (self.table[i] >> self.cluster_bits) >> self.rb_bits for i in pending}
            ready = {i for i in pending if home[i] == i or home[i] not in pending} or pending
            for i in sorted(ready):
                pwrite_full(self.fd, struct.pack(">Q", self.table[i]), base + i * 8)
            pending -= ready
            if pending:
                os.fdatasync(self.fd)
        self.table_dirty.clear()
        return True


# -- rebuild ----------------------------------------------------------------------------------
def rebuild_refcount_structure(fd: int, header: fmt.Header, counts: np.ndarray, path: str) -> None:
    """Write a new refcount structure holding ``counts`` and switch the header to it.

    The one rebuild, used by ``check -r all`` and by the open-time repair of a dirty
    lazy-refcounts image. As QEMU's rebuild_refcount_structure, new refcount blocks and the
    new table go into the first free clusters of ``counts`` (appended at the end when there is
    no room). The old structure stays counted in ``counts`` so nothing is placed over it: a
    crash before the header switch leaves the old structure intact, and after it the old
    clusters are merely leaked (the caller's second check pass frees them). ``header`` is
    updated to the new table.
    """
    import numpy as np

    if counts.size and int(counts.max()) > (1 << header.refcount_bits) - 1:
        bad = int(np.argmax(counts > (1 << header.refcount_bits) - 1))
        raise CorruptImageError(
            f"cluster {bad} has {int(counts[bad])} references, more than "
            f"refcount_bits={header.refcount_bits} can hold",
            path=path,
        )
    offset, clusters = _FirstFitRebuild(fd, header, counts, path).run()
    _write_header_table(fd, header, offset, clusters)


def _write_header_table(fd: int, header: fmt.Header, offset: int, clusters: int) -> None:
    """Switch the header to the refcount table at ``offset`` (one write, synced)."""
    pwrite_full(fd, struct.pack(">QI", offset, clusters), fmt.HDR_REFCOUNT_TABLE_OFFSET)
    os.fdatasync(fd)
    header.refcount_table_offset = offset
    header.refcount_table_clusters = clusters


def _first_free_run(free: np.ndarray, count: int) -> int:
    """Index of the first run of ``count`` True values in ``free``, or -1 (memory: one byte
    per cluster plus the run edges)."""
    import numpy as np

    pad = np.zeros(1, dtype=np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate((pad, free.view(np.int8), pad))))
    starts, ends = edges[0::2], edges[1::2]
    long_enough = np.flatnonzero(ends - starts >= count)
    return int(starts[long_enough[0]]) if long_enough.size else -1


class _FirstFitRebuild:
    """Refcount blocks and table placed first-fit over an in-memory refcount array."""

    def __init__(self, fd: int, header: fmt.Header, counts: np.ndarray, path: str) -> None:
        import numpy as np

        self.fd = fd
        self.path = path
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.rb_bits = header.refblock_bits
        self.order = header.refcount_order
        self.arr = counts.astype(np.uint64, copy=True)
        self.reftable: list[int] = []

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """First run of ``count`` free clusters at or after ``first_free`` (growing the array
        when there is none); marks it used. Returns (cluster, updated first_free)."""
        import numpy as np

        arr = self.arr
        free = arr[first_free:] == 0
        any_free = bool(free.any())
        if any_free:
            first_free = first_free + int(np.argmax(free))
        start = -1
        if count == 1:
            if any_free:
                start = first_free
        elif free.size >= count:
            hit = _first_free_run(free, count)
            if hit >= 0:
                start = (arr.size - free.size) + hit
        if start < 0:
            tail = 0
            while tail < min(count, free.size) and free[free.size - 1 - tail]:
                tail += 1
            start = arr.size - tail
            grow = start + count - arr.size
            self.arr = arr = np.concatenate([arr, np.zeros(grow, dtype=np.uint64)])
        arr[start : start + count] = 1
        return start, first_free

    def _next_used(self, cluster: int, end: int) -> int | None:
        """The first cluster in [cluster, end) with a nonzero count (scanned in windows, so
        the whole rebuild stays linear in the file's extent)."""
        import numpy as np

        window = 1 << (self.rb_bits + 4)
        while cluster < end:
            stop = min(end, cluster + window)
            used = self.arr[cluster:stop] != 0
            if used.any():
                return cluster + int(np.argmax(used))
            cluster = stop
        return None

    def write_refblocks(self, first: int, end: int) -> bool:
        """Write the blocks covering used clusters in [first, end); True if the table grew."""
        import numpy as np

        rb = 1 << self.rb_bits
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            found = self._next_used(cluster, end)
            if found is None:
                break
            cluster = found
            index = cluster >> self.rb_bits
            block_start = index << self.rb_bits
            if index < len(self.reftable) and self.reftable[index]:
                off = self.reftable[index]
            else:
                first_free = max(first_free, block_start)
                new, first_free = self.alloc(1, first_free)
                end = max(end, new + 1)
                if len(self.reftable) <= index:
                    entries = -(-(index + 1) * 8 // self.cs) * self.cs // 8
                    self.reftable.extend([0] * (entries - len(self.reftable)))
                    grown = True
                off = new << self.cb
                self.reftable[index] = off
            block = np.zeros(rb, dtype=np.uint64)
            part = self.arr[block_start : block_start + rb]
            block[: part.size] = part
            pwrite_full(self.fd, fmt.encode_refcount_block(block, self.order), off)
            cluster = block_start + rb
        return grown

    def run(self) -> tuple[int, int]:
        """Write blocks and table (synced); returns the table's (offset, clusters)."""
        import numpy as np

        self.write_refblocks(0, self.arr.size)
        while True:
            length = len(self.reftable) * 8
            clusters = -(-length // self.cs)
            start, _ = self.alloc(clusters, 0)
            if not self.write_refblocks(start, start + clusters):
                break
            self.arr[start : start + clusters] = 0
        if length > fmt.MAX_REFTABLE_BYTES:
            raise NoSpaceError("the rebuilt refcount table would exceed 8 MiB", path=self.path)
        table = np.array(self.reftable, dtype=np.uint64)
        pwrite_full(self.fd, fmt.encode_table(table), start << self.cb)
        os.fdatasync(self.fd)
        return start << self.cb, clusters
