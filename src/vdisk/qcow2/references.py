"""The one walk over every host-cluster reference of a qcow2 image (QEMU's calculate_refcounts).

Everything that holds a reference on a host cluster is visited here, and only here: the header
cluster, the active L1 table and every snapshot's L1 table, the L2 tables they point at, data
clusters, compressed clusters (one reference per host cluster a compressed run touches), the
snapshot table, the bitmap directory, bitmap tables and bitmap data clusters, the crypto (LUKS)
header area, the refcount table and the refcount blocks.

Two users share the walk:

* :class:`ReferenceWalk` reads every L2 table and returns the refcount each host cluster should
  have, plus what ``check`` reports (findings: misaligned or reserved-bit entries, references
  past the end of the file, refcount blocks referenced twice, overflows...). Its counts array is
  sized by the file's real extent: a reference past the end is a finding, never an allocation.
* :func:`metadata_clusters` walks only the structures (L2 offsets come from the active L1
  table; no L2 table and no snapshot L1 table is read) and returns the host clusters that
  hold metadata, which the allocator and the write guard must never hand out for data.

Comparing the counts with the stored refcounts, rebuilding and COPIED repairs live in
``check.py``; :class:`StoredRefcounts` reads the stored side.
"""

from __future__ import annotations

import errno as _errno
import os
from array import array

from ..errors import CorruptImageError, VdiskError
from ..fileio import pread_full, pwrite_full
from ..record import field, record
from . import format as fmt
from .cluster import read_snapshots

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import NamedTuple

    import numpy as np
else:
    from ..record import NamedTuple  # typing costs `vdisk convert` about a bare start

MAX_GROW_CLUSTERS = 1 << 24  # how far past the end a refcount block may pull the file (repair)
_INT64_MAX = (1 << 63) - 1


class CheckFailed(VdiskError):
    """The check itself could not complete (qemu-img check exits 1)."""


def table_ok(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    """QEMU's validate_table_offset: aligned, and the table end addressable."""
    return entries * entry_len <= _INT64_MAX - offset and offset % cluster_size == 0


@record
class Findings:
    """What the walk found, in qemu-img check's terms; ``messages`` as qemu prints them."""

    messages: list[str] = field(default_factory=list)
    corruptions: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    rebuild: bool = False  # the refcount structure itself is broken

    def corruption(self, message: str) -> None:
        self.messages.append(message)
        self.corruptions += 1


class StoredRefcounts:
    """The refcounts as stored on disk, read one refcount block at a time."""

    def __init__(self, fd: int, header: fmt.Header) -> None:

        self.fd = fd
        self.header = header
        self.cluster_size = header.cluster_size
        self.rb_bits = header.refblock_bits
        buf = bytearray(header.refcount_table_clusters * self.cluster_size)
        pread_full(fd, buf, header.refcount_table_offset)
        self.table = fmt.decode_table(buf)
        self.blocks: dict[int, np.ndarray | None] = {}

    def block(self, index: int) -> np.ndarray | None:
        """Refcount block ``index`` (None: not allocated). OSError(EIO) if it cannot be read."""

        if index in self.blocks:
            return self.blocks[index]
        block: np.ndarray | None = None
        if index < self.table.size:
            off = int(self.table[index]) & fmt.REFT_OFFSET_MASK
            if off & (self.cluster_size - 1):
                raise OSError(_errno.EIO, "refcount block offset is not cluster aligned")
            if off > _INT64_MAX - self.cluster_size:
                raise OSError(_errno.EIO, "refcount block offset is not addressable")
            if off:
                buf = bytearray(self.cluster_size)
                pread_full(self.fd, buf, off)  # past the end of the file: zeros, as QEMU
                block = fmt.decode_refcount_block(buf, self.header.refcount_order).copy()
        self.blocks[index] = block
        return block

    def _by_block(self, clusters: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(block index, positions in ``clusters``) per refcount block, in one sort."""
        import numpy as np

        bidx = clusters >> np.uint64(self.rb_bits)
        order = np.argsort(bidx, kind="stable")
        ordered = bidx[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], ordered.size]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            yield int(ordered[start]), order[start:end]

    def range_values(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of clusters 0..count-1 and a mask of those that could not be read
        (one block at a time: linear in ``count``)."""
        import numpy as np

        out = np.zeros(count, dtype=np.uint64)
        bad = np.zeros(count, dtype=bool)
        per_block = 1 << self.rb_bits
        for index in range(-(-count // per_block)):
            start = index * per_block
            stop = min(count, start + per_block)
            if index >= self.table.size:
                break
            try:
                block = self.block(index)
            except OSError:
                bad[start:stop] = True
                continue
            if block is not None:
                out[start:stop] = block[: stop - start]
        return out, bad

    def values(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of ``clusters`` and a mask of those that could not be read."""
        import numpy as np

        out = np.zeros(clusters.size, dtype=np.uint64)
        bad = np.zeros(clusters.size, dtype=bool)
        if not clusters.size:
            return out, bad
        mask = np.uint64((1 << self.rb_bits) - 1)
        for index, where in self._by_block(clusters):
            try:
                block = self.block(index)
            except OSError:
                bad[where] = True
                continue
            if block is not None:
                out[where] = block[(clusters[where] & mask).astype(np.int64)]
        return out, bad

    def set(self, clusters: np.ndarray, values: np.ndarray) -> None:
        """Write new refcounts (their blocks exist: only nonzero refcounts get fixed)."""
        import numpy as np

        mask = np.uint64((1 << self.rb_bits) - 1)
        for index, where in self._by_block(clusters):
            block = self.block(index)
            assert block is not None
            block[(clusters[where] & mask).astype(np.int64)] = values[where]
            off = int(self.table[index]) & fmt.REFT_OFFSET_MASK
            pwrite_full(self.fd, fmt.encode_refcount_block(block, self.header.refcount_order), off)


# A repair hook for a misaligned preallocated L2 entry: (l2_offset, index, raw table, active)
# -> True when the entry was rewritten (it then references nothing).
if TYPE_CHECKING:
    PreallocRepair = Callable[[int, int, np.ndarray, bool], bool]
    L1Entries = np.ndarray | array[int]  # a table decoded by numpy, or an image's own


class _Walk:
    """The structures every walk visits; subclasses say what a reference does."""

    def __init__(self, fd: int, header: fmt.Header, file_size: int, path: str) -> None:
        self.fd = fd
        self.h = header
        self.path = path
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.file_size = file_size
        self.file_clusters = (file_size + self.cs - 1) >> self.cb
        self.found = Findings()

    # -- what subclasses define ---------------------------------------------------------------
    def _inc(self, offset: int, size: int) -> None:
        raise NotImplementedError

    def _l2(self, l2_off: int, active: bool) -> None:
        raise NotImplementedError

    def _bad(self, message: str) -> None:
        """A structure that cannot be walked further (check: a corruption; open: an error)."""
        self.found.corruption(message)

    def _fatal(self, message: str, code: int, reason: str) -> CheckFailed:
        """A structure the walk cannot get past (the check stops, as QEMU's)."""
        self.found.messages.append(message)
        self.found.check_errors += 1
        return CheckFailed(reason, path=self.path, errno=code)

    # -- the structures -----------------------------------------------------------------------
    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        pread_full(self.fd, buf, offset)
        return buf

    def _structures(self, l1: L1Entries | None = None) -> None:
        """Header, L1/L2 (active, then snapshots), snapshot table, bitmaps, crypto, reftable."""
        h = self.h
        self._inc(0, self.cs)
        self._l1(h.l1_table_offset, h.l1_size, True, l1)
        self._snapshots()
        self._bitmaps()
        crypto = h.crypto
        if crypto is not None:
            self._inc(crypto.offset, crypto.length)
        self._inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)

    def _l1(self, offset: int, size: int, active: bool, l1: L1Entries | None = None) -> None:
        if not size:
            return
        self._inc(offset, size * 8)
        if l1 is None:
            l1 = fmt.decode_table(self._read(offset, size * 8))
        # An image's own (native) table is walked in Python: opening needs no numpy.
        used = [e for e in l1 if e] if isinstance(l1, array) else l1[l1 != 0].tolist()
        for entry in used:
            if entry & fmt.L1E_RESERVED_MASK:
                self.found.corruption(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_off = entry & fmt.L1E_OFFSET_MASK
            self._l2_table(l2_off)
            if l2_off & (self.cs - 1):
                self.found.corruption(
                    f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                )
            self._l2(l2_off, active)

    def _l2_table(self, l2_off: int) -> None:
        """An L1 entry's L2 table holds one reference to its cluster."""
        self._inc(l2_off, self.cs)

    def _snapshots(self) -> None:
        h = self.h
        if not table_ok(h.snapshots_offset, h.nb_snapshots, fmt.SNAPSHOT_HEADER_SIZE, self.cs):
            raise self._fatal(
                "ERROR snapshot table offset invalid", _errno.EINVAL, "Invalid argument"
            )
        if not h.nb_snapshots:
            return
        if h.nb_snapshots > fmt.MAX_SNAPSHOTS:
            raise self._fatal("ERROR snapshot table too large", _errno.EFBIG, "File too large")
        try:
            snaps = read_snapshots(self.fd, h)
        except CorruptImageError as exc:
            raise self._fatal(
                f"ERROR failed to read the snapshot table: {exc.message}",
                _errno.EINVAL,
                "Invalid argument",
            ) from None
        for i, s in enumerate(snaps):
            if len(s.extra_data) < 16:  # no vm_state_size_large and disk_size
                self.found.corruption(f"ERROR snapshot table entry {i} is incomplete")
            if s.l1_table_offset & (self.cs - 1):
                self._bad(
                    f"ERROR snapshot {s.id_str} ({s.name}) l1_offset={s.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                continue
            if s.l1_size * 8 > fmt.MAX_L1_BYTES:
                self._bad(
                    f"ERROR snapshot {s.id_str} ({s.name}) l1_size={s.l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                continue
            self._l1(s.l1_table_offset, s.l1_size, active=False)
        self._inc(h.snapshots_offset, fmt.snapshot_table_size(snaps))

    def _bitmaps(self) -> None:
        h = self.h
        ext = h.bitmaps
        if ext is None or not h.autoclear_features & fmt.AUTOCLEAR_BITMAPS or not ext.nb_bitmaps:
            return
        self._inc(ext.directory_offset, ext.directory_size)
        directory = bytes(self._read(ext.directory_offset, ext.directory_size))
        try:
            entries = fmt.decode_bitmap_directory(directory, ext.nb_bitmaps)
        except CorruptImageError as exc:
            self._bad(f"ERROR bitmap directory: {exc.message}")
            raise CheckFailed("Invalid argument", path=self.path, errno=_errno.EINVAL) from None
        for bm in entries:
            tsize = bm.bitmap_table_size * 8
            self._inc(bm.bitmap_table_offset, tsize)
            if tsize > fmt.MAX_L1_BYTES:
                self._bad(f"ERROR bitmap {bm.name!r}: bitmap table is too large")
                break
            table = fmt.decode_table(self._read(bm.bitmap_table_offset, tsize))
            for e in table[table != 0].tolist():
                off = e & fmt.BME_TABLE_OFFSET_MASK
                bad = e & fmt.BME_TABLE_RESERVED_MASK or off & (self.cs - 1)
                if bad or (e & fmt.BME_TABLE_ALL_ONES and off):
                    self._bad(f"ERROR bitmap table entry {e:#x} is corrupted")
                    continue
                if off:
                    self._inc(off, self.cs)


class ReferenceWalk(_Walk):
    """Expected refcount of every host cluster, and the findings of the walk.

    With ``fix_errors``, the walk makes QEMU's in-walk repairs: a refcount block a little
    past the end grows the file, and ``repair_prealloc`` may rewrite a misaligned
    preallocated L2 entry.
    """

    def __init__(
        self,
        fd: int,
        header: fmt.Header,
        file_size: int,
        path: str,
        fix_errors: bool = False,
        repair_prealloc: PreallocRepair | None = None,
    ) -> None:

        super().__init__(fd, header, file_size, path)
        self.fix_errors = fix_errors
        self.repair_prealloc = repair_prealloc
        self.max_refcount = (1 << header.refcount_bits) - 1
        self.refs: list[np.ndarray] = []  # referenced host cluster indices, one per reference

    def expected_refcounts(self) -> np.ndarray:
        """Refcounts per host cluster (sized by the file, after any growth the walk made)."""
        self.refs = []
        self._structures()
        return self._refcount_blocks(self._count())

    # -- references -----------------------------------------------------------------------
    def _past_eof(self, offset: int, size: int) -> bool:
        """QEMU tolerates references into a partial last cluster, nothing further."""
        if offset + size - self.file_size < self.cs:
            return False
        self.found.corruption(
            "ERROR: counting reference for region exceeding the end of the file by one cluster "
            f"or more: offset 0x{offset:x} size 0x{size:x}"
        )
        return True

    def _inc(self, offset: int, size: int) -> None:
        import numpy as np

        if size <= 0 or self._past_eof(offset, size):
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        self.refs.append(np.arange(first, last + 1, dtype=np.int64))

    def _inc_clusters(self, hosts: np.ndarray) -> None:
        """One reference to each cluster at the (cluster-sized) host offsets ``hosts``."""
        import numpy as np

        past = hosts >= np.uint64(self.file_size)
        for off in hosts[past].tolist():
            self._past_eof(off, self.cs)
        self.refs.append((hosts[~past] >> np.uint64(self.cb)).astype(np.int64))

    def _count(self) -> np.ndarray:
        import numpy as np

        if not self.refs:
            return np.zeros(self.file_clusters, dtype=np.uint64)
        refs = np.concatenate(self.refs)
        n = max(self.file_clusters, int(refs.max()) + 1 if refs.size else 0)
        return np.bincount(refs, minlength=n).view(np.uint64)  # counts are never negative

    # -- L2 tables ------------------------------------------------------------------------
    def _l2(self, l2_off: int, active: bool) -> None:
        import numpy as np

        raw = fmt.decode_table(self._read(l2_off, self.cs))
        ext = self.h.extended_l2
        ent = raw[0::2] if ext else raw
        bm = raw[1::2] if ext else np.zeros(ent.size, dtype=np.uint64)
        comp = (ent & np.uint64(fmt.OFLAG_COMPRESSED)) != 0
        std = ~comp
        for e in ent[std & ((ent & np.uint64(fmt.L2E_STD_RESERVED_MASK)) != 0)].tolist():
            self.found.corruption(f"ERROR found l2 entry with reserved bits set: {e:x}")
        self._compressed(ent, bm, comp, active)
        self._standard(l2_off, raw, ent, bm, std, active)

    def _compressed(self, ent: np.ndarray, bm: np.ndarray, comp: np.ndarray, active: bool) -> None:
        import numpy as np

        found = self.found
        for i in np.flatnonzero(comp).tolist():  # rare enough for a loop
            e = int(ent[i])
            if e & fmt.OFLAG_COPIED:
                omask = fmt.compressed_geometry(self.cb)[0]
                found.corruption(
                    f"ERROR: coffset=0x{e & omask:x}: copied flag must never be set for "
                    "compressed clusters"
                )
                e &= ~fmt.OFLAG_COPIED
            if self.h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
                found.corruption(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
                continue
            if int(bm[i]):
                found.corruption(
                    f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                    f"entry=0x{e:x}"
                )
                continue
            coffset, csize = fmt.decode_compressed(e, self.cb)
            self._inc(coffset, csize)
            if active:
                found.allocated_clusters += 1
                found.compressed_clusters += 1
                found.fragmented_clusters += 1

    def _standard(
        self,
        l2_off: int,
        raw: np.ndarray,
        ent: np.ndarray,
        bm: np.ndarray,
        std: np.ndarray,
        active: bool,
    ) -> None:
        """Standard clusters with a host offset (normal data and preallocated zeros)."""
        import numpy as np

        found, cs = self.found, self.cs
        host = ent & np.uint64(fmt.L2E_OFFSET_MASK)
        alloc = std & (host != 0)
        data_file = bool(self.h.incompatible_features & fmt.INCOMPAT_DATA_FILE)
        if data_file:  # COPIED marks an allocated cluster, at host offset 0 too
            copied = (ent & np.uint64(fmt.OFLAG_COPIED)) != 0
            if not self.h.extended_l2:  # a zero flag at offset 0 is a plain zero cluster
                copied &= (ent & np.uint64(fmt.OFLAG_ZERO)) == 0
            alloc |= std & copied
        if self.h.extended_l2:
            bad_bm = alloc & (((bm >> np.uint64(32)) & bm) != 0)
            for off in host[bad_bm].tolist():
                found.corruption(
                    f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                    "allocation bitmap"
                )
            unalloc_bad = std & ~alloc & ((bm & np.uint64(0xFFFFFFFF)) != 0)
            for _ in range(int(unalloc_bad.sum())):
                found.corruption(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                )
        hosts = host[alloc]
        unaligned = (hosts & np.uint64(cs - 1)) != 0
        if unaligned.any():
            keep = self._misaligned(l2_off, raw, ent, bm, alloc, unaligned, active)
            hosts, unaligned = hosts[keep], unaligned[keep]
        if active and hosts.size:
            found.allocated_clusters += int(hosts.size)
            found.fragmented_clusters += int(
                np.count_nonzero(hosts[1:] != hosts[:-1] + np.uint64(cs))
            )
        if data_file:
            return  # data clusters live in the data file: no refcounts
        self._inc_clusters(hosts[~unaligned])
        for off in hosts[unaligned].tolist():
            self._inc(off, cs)

    def _misaligned(
        self,
        l2_off: int,
        raw: np.ndarray,
        ent: np.ndarray,
        bm: np.ndarray,
        alloc: np.ndarray,
        unaligned: np.ndarray,
        active: bool,
    ) -> np.ndarray:
        """Report misaligned host offsets; returns which allocated entries still reference."""
        import numpy as np

        found = self.found
        host = ent[alloc] & np.uint64(fmt.L2E_OFFSET_MASK)
        where = np.flatnonzero(alloc)
        zero_flag = (ent[alloc] & np.uint64(fmt.OFLAG_ZERO)) != 0
        data = (bm[alloc] & np.uint64(0xFFFFFFFF)) != 0 if self.h.extended_l2 else ~zero_flag
        keep = np.ones(host.size, dtype=bool)
        for k in np.flatnonzero(unaligned).tolist():
            off = int(host[k])
            found.corruptions += 1
            if data[k]:
                found.messages.append(
                    f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                    "L2 entry corrupted."
                )
                continue
            fixing = self.fix_errors and self.repair_prealloc is not None
            tag = "Repairing" if fixing else "ERROR"
            found.messages.append(
                f"{tag} offset={off:x}: Preallocated cluster is not properly aligned; "
                "L2 entry corrupted."
            )
            if fixing:
                assert self.repair_prealloc is not None
                if self.repair_prealloc(l2_off, int(where[k]), raw, active):
                    found.corruptions -= 1
                    found.corruptions_fixed += 1
                    keep[k] = False  # the entry no longer references anything
        return keep

    # -- the refcount structure -------------------------------------------------------------
    def _refcount_blocks(self, counts: np.ndarray) -> np.ndarray:
        """Each refcount block must be referenced exactly once; then overflowing counts."""
        import numpy as np

        found = self.found
        table = StoredRefcounts(self.fd, self.h).table
        for i in np.flatnonzero(table).tolist():
            entry = int(table[i])
            off = entry & fmt.REFT_OFFSET_MASK
            if entry & fmt.REFT_RESERVED_MASK:
                found.corruption(f"ERROR refcount table entry {i} has reserved bits set")
                found.rebuild = True
                continue
            if off & (self.cs - 1):
                found.corruption(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                found.rebuild = True
                continue
            c = off >> self.cb
            if c >= counts.size:
                if self.fix_errors and c < counts.size + MAX_GROW_CLUSTERS:
                    counts = self._grow_to(counts, i, off)
                    continue
                found.corruption(f"ERROR refcount block {i} is outside image")
                if self.fix_errors:
                    found.rebuild = True  # too far out to grow the file: rebuild instead
                continue
            counts[c] += 1
            if counts[c] != 1:
                found.corruption(f"ERROR refcount block {i} refcount={int(counts[c])}")
                found.rebuild = True
        for c in np.flatnonzero(counts > np.uint64(self.max_refcount)).tolist():
            found.messages.append(f"ERROR: overflow cluster offset=0x{c << self.cb:x}")
            found.corruptions += int(counts[c]) - self.max_refcount
            counts[c] = self.max_refcount
        return counts

    def _grow_to(self, counts: np.ndarray, index: int, off: int) -> np.ndarray:
        """As QEMU: grow the file so that refcount block ``index`` lies inside it."""
        import numpy as np

        self.found.messages.append(f"Repairing refcount block {index} is outside image")
        os.ftruncate(self.fd, off + self.cs)
        self.file_size = off + self.cs
        c = off >> self.cb
        self.file_clusters = c + 1
        counts = np.concatenate([counts, np.zeros(c + 1 - counts.size, dtype=np.uint64)])
        counts[c] += 1
        self.found.corruptions_fixed += 1
        return counts


class _MetadataScan(_Walk):
    """The host clusters holding metadata, from the structures alone (no L2 table is read)."""

    def __init__(self, fd: int, header: fmt.Header, file_size: int, path: str) -> None:
        super().__init__(fd, header, file_size, path)
        self.clusters: set[int] = set()  # everything but the active L2 tables
        self.l2_tables: set[int] = set()

    def _l2_table(self, l2_off: int) -> None:
        self.l2_tables.add(l2_off >> self.cb)

    def _inc(self, offset: int, size: int) -> None:
        if size > 0:
            self.clusters.update(range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1))

    def _bad(self, message: str) -> None:
        raise CorruptImageError(message.removeprefix("ERROR "), path=self.path)

    def _l1(self, offset: int, size: int, active: bool, l1: L1Entries | None = None) -> None:
        if active:
            super()._l1(offset, size, active, l1)
        elif size:
            # A snapshot's L1 table, not read: opening stays cheap however many snapshots
            # there are. (Snapshot-only L2 tables are fenced by their refcounts alone.)
            self._inc(offset, size * 8)

    def _l2(self, l2_off: int, active: bool) -> None:
        pass  # the L2 table itself was counted by _inc; its entries point at data

    def _refcount_blocks(self, reftable: L1Entries) -> None:
        mask = fmt.REFT_OFFSET_MASK
        entries = reftable if isinstance(reftable, array) else reftable.tolist()
        self.clusters.update((e & mask) >> self.cb for e in entries if e & mask)


class MetadataClusters(NamedTuple):
    """Where metadata lives, as host cluster indices: the active L2 tables, and the rest
    (header, L1s, refcount structures, snapshot and bitmap structures, crypto area)."""

    l2_tables: set[int]
    others: set[int]

    @property
    def all(self) -> set[int]:
        return self.l2_tables | self.others


def metadata_clusters(
    fd: int,
    header: fmt.Header,
    file_size: int,
    path: str,
    l1: L1Entries | None = None,
    reftable: L1Entries | None = None,
) -> MetadataClusters:
    """Host clusters that hold metadata, for the allocator and the write guard.

    ``l1`` and ``reftable`` may be passed when the caller has them loaded already. Structures
    the walk cannot trust (an unreadable snapshot table, an oversized snapshot L1 or bitmap
    table) raise CorruptImageError: nothing may be written before they are known.
    """
    scan = _MetadataScan(fd, header, file_size, path)
    try:
        scan._structures(l1)
    except CheckFailed as exc:
        raise CorruptImageError(scan.found.messages[-1].removeprefix("ERROR "), path=path) from exc
    if reftable is None:
        reftable = StoredRefcounts(fd, header).table
    scan._refcount_blocks(reftable)
    return MetadataClusters(scan.l2_tables, scan.clusters)


__all__ = [
    "CheckFailed",
    "Findings",
    "MetadataClusters",
    "ReferenceWalk",
    "StoredRefcounts",
    "metadata_clusters",
    "table_ok",
]
