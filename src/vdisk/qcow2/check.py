"""Consistency check and repair of a QCOW2 image, with qemu-img check's accounting.

The check rebuilds the reference count every host cluster should have from all metadata
(header, active and snapshot L1/L2 tables, snapshot table, refcount table and blocks, bitmap
directory, bitmap tables and their data) and compares it with the stored refcounts:

* stored > expected: a leak (wasted space, harmless);
* stored < expected: a corruption (a cluster in use may be handed out again);
* stored == 0 while referenced: the refcount structure itself needs rebuilding;
* COPIED flags that disagree with refcount == 1, misaligned or reserved-bit entries: corruptions.

Repairs (``fix``): FIX_LEAKS lowers leaked refcounts; FIX_ERRORS also raises refcounts that are
too low, rebuilds the refcount structure when needed and fixes COPIED flags. The numbers follow
QEMU's ``qcow2_check_refcounts`` so that ``vdisk check`` and ``qemu-img check`` agree.

The checker works on the file directly (not through Qcow2Image) so that it sees a dirty or
corrupt-marked image as it is: opening one through the library would repair it first.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptImageError, UnsupportedFeatureError, VdiskError, from_oserror
from ..fileio import pread_full, pwrite_full
from . import format as fmt
from .cluster import read_snapshots

FIX_LEAKS = 1
FIX_ERRORS = 2

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_FLAG_ALL_ONES = 1

# Header field offsets (the on-disk layout of the fixed header).
_HDR_REFTABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
_HDR_INCOMPAT = 72
_MAX_GROW_CLUSTERS = 1 << 24  # how far past the end a refcount block may pull the file (repair)


class CheckFailed(VdiskError):
    """The check itself could not complete (qemu-img check exits 1)."""


@dataclass
class CheckResult:
    """What one check pass found, in qemu-img check's terms (its JSON keys, with underscores)."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)  # what qemu prints on stderr

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


_INT64_MAX = (1 << 63) - 1


def _table_ok(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    return entries * entry_len <= _INT64_MAX - offset and offset % cluster_size == 0


def _validate_for_check(h: fmt.Header, path: str) -> None:
    """The table checks QEMU makes when it opens an image for ``qemu-img check``."""
    cs = h.cluster_size
    if h.l1_size < fmt.l1_entries_for(h.size, h.cluster_bits, h.l2_bits):
        raise CorruptImageError("L1 table is too small", path=path)
    if not _table_ok(h.l1_table_offset, h.l1_size, 8, cs):
        raise CorruptImageError("Active L1 table offset invalid", path=path)
    if not _table_ok(h.refcount_table_offset, h.refcount_table_clusters, cs, cs):
        raise CorruptImageError("Reference count table offset invalid", path=path)
    bitmaps = h.bitmaps
    if bitmaps is not None and bitmaps.directory_offset % cs:
        raise CorruptImageError("bitmaps_ext: invalid bitmap directory offset", path=path)


class _Stored:
    """The refcounts as stored on disk, read one refcount block at a time."""

    def __init__(self, fd: int, header: fmt.Header) -> None:
        self.fd = fd
        self.header = header
        self.cs = header.cluster_size
        self.rb_bits = header.refblock_bits
        buf = bytearray(header.refcount_table_clusters * self.cs)
        pread_full(fd, buf, header.refcount_table_offset)
        self.table = fmt.decode_table(buf)
        self.blocks: dict[int, np.ndarray | None] = {}

    def block(self, index: int) -> np.ndarray | None:
        """Refcount block ``index`` (None: not allocated). Raises OSError(EIO) if misaligned."""
        if index in self.blocks:
            return self.blocks[index]
        block: np.ndarray | None = None
        if index < self.table.size:
            off = int(self.table[index]) & fmt.REFT_OFFSET_MASK
            if off & (self.cs - 1):
                raise OSError(_errno.EIO, "refcount block offset is not cluster aligned")
            if off:
                buf = bytearray(self.cs)
                pread_full(self.fd, buf, off)
                block = fmt.decode_refcount_block(buf, self.header.refcount_order).copy()
        self.blocks[index] = block
        return block

    def values(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of ``clusters`` and a mask of those that could not be read."""
        out = np.zeros(clusters.size, dtype=np.uint64)
        bad = np.zeros(clusters.size, dtype=bool)
        if not clusters.size:
            return out, bad
        bidx = clusters >> np.uint64(self.rb_bits)
        mask = np.uint64((1 << self.rb_bits) - 1)
        for b in np.unique(bidx).tolist():
            sel = bidx == b
            try:
                block = self.block(int(b))
            except OSError:
                bad[sel] = True
                continue
            if block is not None:
                out[sel] = block[(clusters[sel] & mask).astype(np.int64)]
        return out, bad

    def set(self, clusters: np.ndarray, values: np.ndarray) -> None:
        """Write new refcounts (their blocks exist: only nonzero refcounts get fixed)."""
        bidx = clusters >> np.uint64(self.rb_bits)
        mask = np.uint64((1 << self.rb_bits) - 1)
        for b in np.unique(bidx).tolist():
            block = self.block(int(b))
            assert block is not None
            sel = bidx == b
            block[(clusters[sel] & mask).astype(np.int64)] = values[sel]
            off = int(self.table[int(b)]) & fmt.REFT_OFFSET_MASK
            pwrite_full(self.fd, fmt.encode_refcount_block(block, self.header.refcount_order), off)


class _Checker:
    def __init__(self, fd: int, path: str, fix: int) -> None:
        self.fd = fd
        self.path = path
        self.fix = fix
        file_size = os.fstat(fd).st_size
        head = bytearray(min(file_size, 1 << 21))
        pread_full(fd, head, 0)
        h = fmt.Header.decode(head)
        try:
            h.validate(file_size)
        except CorruptImageError:
            # Table placement errors: QEMU opens such an image for checking as long as its
            # tables are aligned and addressable, and the check reports what they cause.
            _validate_for_check(h, path)
        unknown = h.incompatible_features & ~fmt.INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedFeatureError(
                f"unsupported incompatible feature bits {unknown:#x}", path=path
            )
        if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            raise UnsupportedFeatureError("external data files are not supported", path=path)
        if h.crypt_method:
            raise UnsupportedFeatureError("encrypted images are not supported", path=path)
        self.h = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.file_size = file_size
        self.file_clusters = (file_size + self.cs - 1) >> self.cb
        self.max_refcount = (1 << h.refcount_bits) - 1
        self.res = CheckResult(path)
        self.res.total_clusters = (h.size + self.cs - 1) >> self.cb
        self.refs: list[np.ndarray] = []  # referenced host cluster indices, one per reference
        self.rebuild = False

    # -- counting references ----------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.res.messages.append(text)

    def _past_eof(self, offset: int, size: int) -> bool:
        """QEMU tolerates references into a partial last cluster, nothing further."""
        if offset + size - self.file_size < self.cs:
            return False
        self._say(
            "ERROR: counting reference for region exceeding the end of the file by one cluster "
            f"or more: offset 0x{offset:x} size 0x{size:x}"
        )
        self.res.corruptions += 1
        return True

    def _inc(self, offset: int, size: int) -> None:
        if size <= 0 or self._past_eof(offset, size):
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        self.refs.append(np.arange(first, last + 1, dtype=np.int64))

    def _inc_clusters(self, hosts: np.ndarray) -> None:
        """One reference to each cluster at the (cluster-sized) host offsets ``hosts``."""
        past = hosts >= np.uint64(self.file_size)
        for off in hosts[past].tolist():
            self._past_eof(off, self.cs)
        self.refs.append((hosts[~past] >> np.uint64(self.cb)).astype(np.int64))

    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        pread_full(self.fd, buf, offset)
        return buf

    def _l1(self, offset: int, size: int, active: bool) -> None:
        if not size:
            return
        self._inc(offset, size * 8)
        l1 = fmt.decode_table(self._read(offset, size * 8))
        for i in np.flatnonzero(l1).tolist():
            entry = int(l1[i])
            if entry & L1E_RESERVED_MASK:
                self._say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_off = entry & fmt.L1E_OFFSET_MASK
            self._inc(l2_off, self.cs)
            if l2_off & (self.cs - 1):
                self._say(
                    f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                )
                self.res.corruptions += 1
            self._l2(l2_off, active)

    def _l2(self, l2_off: int, active: bool) -> None:
        res, cs = self.res, self.cs
        raw = fmt.decode_table(self._read(l2_off, cs))
        ext = self.h.extended_l2
        ent = raw[0::2] if ext else raw
        bm = raw[1::2] if ext else np.zeros(ent.size, dtype=np.uint64)
        comp = (ent & np.uint64(fmt.OFLAG_COMPRESSED)) != 0
        std = ~comp
        host = ent & np.uint64(fmt.L2E_OFFSET_MASK)
        for e in ent[std & ((ent & np.uint64(L2E_STD_RESERVED_MASK)) != 0)].tolist():
            self._say(f"ERROR found l2 entry with reserved bits set: {e:x}")
            res.corruptions += 1
        # Compressed clusters (rare enough for a loop).
        for i in np.flatnonzero(comp).tolist():
            e = int(ent[i])
            if e & fmt.OFLAG_COPIED:
                omask = fmt.compressed_geometry(self.cb)[0]
                self._say(
                    f"ERROR: coffset=0x{e & omask:x}: copied flag must never be set for "
                    "compressed clusters"
                )
                e &= ~fmt.OFLAG_COPIED
                res.corruptions += 1
            if int(bm[i]):
                self._say(
                    f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                    f"entry=0x{e:x}"
                )
                res.corruptions += 1
                continue
            coffset, csize = fmt.decode_compressed(e, self.cb)
            self._inc(coffset, csize)
            if active:
                res.allocated_clusters += 1
                res.compressed_clusters += 1
                res.fragmented_clusters += 1
        # Standard clusters with a host offset (normal data and preallocated zeros).
        alloc = std & (host != 0)
        if ext:
            bad_bm = alloc & (((bm >> np.uint64(32)) & bm) != 0)
            for off in host[bad_bm].tolist():
                self._say(
                    f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                    "allocation bitmap"
                )
                res.corruptions += 1
            unalloc_bad = std & (host == 0) & ((bm & np.uint64(0xFFFFFFFF)) != 0)
            for _ in range(int(unalloc_bad.sum())):
                self._say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                res.corruptions += 1
        hosts = host[alloc]
        unaligned = (hosts & np.uint64(cs - 1)) != 0
        if unaligned.any():
            where = np.flatnonzero(alloc)
            zero_flag = (ent[alloc] & np.uint64(fmt.OFLAG_ZERO)) != 0
            data = (bm[alloc] & np.uint64(0xFFFFFFFF)) != 0 if ext else ~zero_flag
            keep = np.ones(hosts.size, dtype=bool)
            for k in np.flatnonzero(unaligned).tolist():
                off = int(hosts[k])
                res.corruptions += 1
                if data[k]:
                    self._say(
                        f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                        "L2 entry corrupted."
                    )
                    continue
                tag = "Repairing" if self.fix & FIX_ERRORS else "ERROR"
                self._say(
                    f"{tag} offset={off:x}: Preallocated cluster is not properly aligned; "
                    "L2 entry corrupted."
                )
                if self.fix & FIX_ERRORS:
                    self._zero_l2_entry(l2_off, int(where[k]), raw, active)
                    keep[k] = False  # the entry no longer references anything
            hosts, unaligned = hosts[keep], unaligned[keep]
        if active and hosts.size:
            res.allocated_clusters += int(hosts.size)
            res.fragmented_clusters += int(
                np.count_nonzero(hosts[1:] != hosts[:-1] + np.uint64(cs))
            )
        self._inc_clusters(hosts[~unaligned])
        for off in hosts[unaligned].tolist():
            self._inc(off, cs)

    def _zero_l2_entry(self, l2_off: int, index: int, raw: np.ndarray, active: bool) -> None:
        """Turn a misaligned preallocated zero cluster into a plain zero cluster (QEMU's fix)."""
        ext = self.h.extended_l2
        size = 16 if ext else 8
        offset = l2_off + index * size
        if self._overlaps_metadata(offset, size, active):
            # As QEMU: refuse the write and mark the image corrupt.
            self._say(
                "qcow2: Marking image as corrupt: Preventing invalid write on metadata; "
                "further corruption events will be suppressed"
            )
            if self.h.version >= 3:
                self.h.incompatible_features |= fmt.INCOMPAT_CORRUPT
                pwrite_full(self.fd, struct.pack(">Q", self.h.incompatible_features), _HDR_INCOMPAT)
                os.fdatasync(self.fd)
            self._say("ERROR: Overlap check failed")
            self.res.check_errors += 1
            raise CheckFailed("Input/output error", path=self.path, errno=_errno.EIO)
        if ext:
            bitmap = int(raw[2 * index + 1])
            bitmap = ((bitmap | bitmap << 32) & 0xFFFFFFFF00000000) & ((1 << 64) - 1)
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", fmt.OFLAG_ZERO)
        pwrite_full(self.fd, data, offset)
        os.fdatasync(self.fd)
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1

    def _overlaps_metadata(self, offset: int, size: int, active: bool) -> bool:
        """QEMU's default ("cached") overlap check before it rewrites an L2 entry."""
        h, cs, cb = self.h, self.cs, self.cb
        ranges = [
            (0, cs),
            (h.l1_table_offset, h.l1_size * 8),
            (h.refcount_table_offset, h.refcount_table_clusters * cs),
        ]
        reftable = _Stored(self.fd, h).table & np.uint64(fmt.REFT_OFFSET_MASK)
        ranges += [(int(o), cs) for o in reftable[reftable != 0].tolist()]
        if h.nb_snapshots:
            for snap in read_snapshots(self.fd, h):
                ranges.append((snap.l1_table_offset, snap.l1_size * 8))
            ranges.append((h.snapshots_offset, h.nb_snapshots * 40))
        bitmaps = h.bitmaps
        if bitmaps is not None:
            ranges.append((bitmaps.directory_offset, bitmaps.directory_size))
        if not active:
            l1 = fmt.decode_table(self._read(h.l1_table_offset, h.l1_size * 8))
            l2s = l1 & np.uint64(fmt.L1E_OFFSET_MASK)
            ranges += [(int(o), cs) for o in l2s[l2s != 0].tolist()]
        first, last = offset >> cb, (offset + size - 1) >> cb
        for start, length in ranges:
            if length > 0 and start >> cb <= last and (start + length - 1) >> cb >= first:
                return True
        return False

    def _snapshots(self) -> None:
        h = self.h
        if not _table_ok(h.snapshots_offset, h.nb_snapshots, 40, self.cs):
            self._say("ERROR snapshot table offset invalid")
            self.res.check_errors += 1
            raise CheckFailed("Invalid argument", path=self.path, errno=_errno.EINVAL)
        if not h.nb_snapshots:
            return
        if h.nb_snapshots > fmt.MAX_SNAPSHOTS:
            self._say("ERROR snapshot table too large")
            self.res.check_errors += 1
            raise CheckFailed("File too large", path=self.path, errno=_errno.EFBIG)
        try:
            snaps = read_snapshots(self.fd, h)
        except CorruptImageError as exc:
            self._say(f"ERROR failed to read the snapshot table: {exc.message}")
            self.res.check_errors += 1
            raise CheckFailed("Invalid argument", path=self.path, errno=_errno.EINVAL) from None
        size = 0
        for i, s in enumerate(snaps):
            if len(s.extra_data) < 16:  # no vm_state_size_large and disk_size
                self._say(f"ERROR snapshot table entry {i} is incomplete")
                self.res.corruptions += 1
            size += (
                40 + len(s.extra_data) + len(s.id_str.encode()) + len(s.name.encode()) + 7
            ) & ~7
            if s.l1_table_offset & (self.cs - 1):
                self._say(
                    f"ERROR snapshot {s.id_str} ({s.name}) l1_offset={s.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            if s.l1_size * 8 > fmt.MAX_L1_BYTES:
                self._say(
                    f"ERROR snapshot {s.id_str} ({s.name}) l1_size={s.l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            self._l1(s.l1_table_offset, s.l1_size, active=False)
        self._inc(h.snapshots_offset, size)

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
            self._say(f"ERROR bitmap directory: {exc.message}")
            self.res.corruptions += 1
            raise CheckFailed("Invalid argument", path=self.path, errno=_errno.EINVAL) from None
        for bm in entries:
            tsize = bm.bitmap_table_size * 8
            self._inc(bm.bitmap_table_offset, tsize)
            if tsize > fmt.MAX_L1_BYTES:
                self.res.corruptions += 1
                break
            table = fmt.decode_table(self._read(bm.bitmap_table_offset, tsize))
            for e in table[table != 0].tolist():
                off = e & BME_OFFSET_MASK
                if e & BME_RESERVED_MASK or off & (self.cs - 1) or (e & BME_FLAG_ALL_ONES and off):
                    self._say(f"ERROR bitmap table entry {e:#x} is corrupted")
                    self.res.corruptions += 1
                    continue
                if off:
                    self._inc(off, self.cs)

    def _count(self) -> np.ndarray:
        """Expected refcounts per host cluster from the references gathered so far."""
        if not self.refs:
            return np.zeros(self.file_clusters, dtype=np.uint64)
        refs = np.concatenate(self.refs)
        n = max(self.file_clusters, int(refs.max()) + 1 if refs.size else 0)
        return np.bincount(refs, minlength=n).astype(np.uint64)

    def calculate(self) -> np.ndarray:
        """Expected refcount of every host cluster (reported mismatches go to ``res``)."""
        h = self.h
        self.refs = []
        self._inc(0, self.cs)
        self._l1(h.l1_table_offset, h.l1_size, active=True)
        self._snapshots()
        self._bitmaps()
        self._inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        counts = self._count()
        # Refcount blocks: each must be referenced exactly once.
        table = _Stored(self.fd, h).table
        for i in np.flatnonzero(table).tolist():
            entry = int(table[i])
            off = entry & fmt.REFT_OFFSET_MASK
            if entry & fmt.REFT_RESERVED_MASK:
                self._say(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if off & (self.cs - 1):
                self._say(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                self.res.corruptions += 1
                self.rebuild = True
                continue
            c = off >> self.cb
            if c >= counts.size:
                if self.fix & FIX_ERRORS and c < counts.size + _MAX_GROW_CLUSTERS:
                    # As QEMU: grow the file so that the block lies inside it.
                    self._say(f"Repairing refcount block {i} is outside image")
                    os.ftruncate(self.fd, off + self.cs)
                    self.file_size = off + self.cs
                    self.file_clusters = c + 1
                    counts = np.concatenate(
                        [counts, np.zeros(c + 1 - counts.size, dtype=np.uint64)]
                    )
                    counts[c] += 1
                    self.res.corruptions_fixed += 1
                    continue
                self._say(f"ERROR refcount block {i} is outside image")
                self.res.corruptions += 1
                if self.fix & FIX_ERRORS:
                    self.rebuild = True  # too far out to grow the file: rebuild instead
                continue
            counts[c] += 1
            if counts[c] != 1:
                self._say(f"ERROR refcount block {i} refcount={int(counts[c])}")
                self.res.corruptions += 1
                self.rebuild = True
        over = np.flatnonzero(counts > np.uint64(self.max_refcount))
        for c in over.tolist():
            excess = int(counts[c]) - self.max_refcount
            self._say(f"ERROR: overflow cluster offset=0x{c << self.cb:x}")
            self.res.corruptions += excess
            counts[c] = self.max_refcount
        return counts

    # -- comparing with the stored refcounts -------------------------------------------------
    def compare(self, counts: np.ndarray, fix: int, stored: _Stored) -> int:
        """Compare every cluster; fix what ``fix`` allows. Returns the highest used cluster."""
        res = self.res
        clusters = np.arange(counts.size, dtype=np.uint64)
        have, bad = stored.values(clusters)
        for c in np.flatnonzero(bad).tolist():
            self._say(f"Can't get refcount for cluster {c}: Input/output error")
        res.check_errors += int(bad.sum())
        ok = ~bad
        used = np.flatnonzero(ok & ((have > 0) | (counts > 0)))
        highest = int(used[-1]) if used.size else 0
        diff = np.flatnonzero(ok & (have != counts))
        fixes: list[int] = []
        for c in diff.tolist():
            r1, r2 = int(have[c]), int(counts[c])
            fixed = False
            if r1 == 0:
                self.rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                res.leaks_fixed += 1
                fixed = True
            elif r1 < r2 and fix & FIX_ERRORS:
                res.corruptions_fixed += 1
                fixed = True
            tag = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
            self._say(f"{tag} cluster {c} refcount={r1} reference={r2}")
            if fixed:
                fixes.append(c)
            elif r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        if fixes:
            idx = np.array(fixes, dtype=np.uint64)
            stored.set(idx, counts[idx.astype(np.int64)])
        return highest

    # -- rebuilding the refcount structure ---------------------------------------------------
    def rebuild_refcounts(self, counts: np.ndarray) -> None:
        """Write a new refcount structure holding ``counts``, placed as QEMU places it.

        New refcount blocks and the new table go into the first free clusters (first fit over
        ``counts``), appended at the end when there is no room. The old structure stays
        counted here; the caller's second pass finds it leaked and frees it.
        """
        _Rebuild(self, counts).run()
        self.file_size = os.fstat(self.fd).st_size
        self.file_clusters = (self.file_size + self.cs - 1) >> self.cb
        self.h.refcount_table_offset, self.h.refcount_table_clusters = struct.unpack(
            ">QI", self._read(_HDR_REFTABLE, 12)
        )

    # -- COPIED flags -------------------------------------------------------------------------
    def check_copied(self, stored: _Stored) -> None:
        res, h = self.res, self.h
        if self.fix & FIX_ERRORS:
            repair = True
        elif self.fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        tag = "Repairing" if repair else "ERROR"
        l1 = fmt.decode_table(self._read(h.l1_table_offset, h.l1_size * 8))
        for i in np.flatnonzero(l1).tolist():
            l1e = int(l1[i])
            l2_off = l1e & fmt.L1E_OFFSET_MASK
            if not l2_off:
                continue
            rc, bad = stored.values(np.array([l2_off >> self.cb], dtype=np.uint64))
            if not bad[0] and (int(rc[0]) == 1) != bool(l1e & fmt.OFLAG_COPIED):
                refcount = int(rc[0])
                res.corruptions += 1
                self._say(
                    f"{tag} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    new = l1e | fmt.OFLAG_COPIED if refcount == 1 else l1e & ~fmt.OFLAG_COPIED
                    pwrite_full(self.fd, struct.pack(">Q", new), h.l1_table_offset + 8 * i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = fmt.decode_table(self._read(l2_off, self.cs))
            step = 2 if h.extended_l2 else 1
            ent = raw[0::step]
            host = ent & np.uint64(fmt.L2E_OFFSET_MASK)
            sel = np.flatnonzero(((ent & np.uint64(fmt.OFLAG_COMPRESSED)) == 0) & (host != 0))
            if not sel.size:
                continue
            rcs, bad = stored.values(host[sel] >> np.uint64(self.cb))
            copied = (ent[sel] & np.uint64(fmt.OFLAG_COPIED)) != 0
            wrong = ~bad & ((rcs == 1) != copied)
            if not wrong.any():
                continue
            for k in np.flatnonzero(wrong).tolist():
                e = int(ent[sel[k]])
                self._say(f"{tag} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={int(rcs[k])}")
            n = int(wrong.sum())
            res.corruptions += n
            if repair:
                idx = sel[wrong]
                flip = np.uint64(fmt.OFLAG_COPIED)
                raw[idx * step] = np.where(rcs[wrong] == 1, ent[idx] | flip, ent[idx] & ~flip)
                pwrite_full(self.fd, fmt.encode_table(raw), l2_off)
                res.corruptions -= n
                res.corruptions_fixed += n

    # -- the whole pass -----------------------------------------------------------------------
    def run(self) -> CheckResult:
        res, fix = self.res, self.fix
        counts = self.calculate()
        stored = _Stored(self.fd, self.h)
        before = (res.corruptions, res.leaks, res.check_errors)
        highest = self.compare(counts, 0, stored)
        if self.rebuild and fix & FIX_ERRORS:
            old_corruptions, old_leaks = res.corruptions, res.leaks
            self._say("Rebuilding refcount structure")
            self.rebuild_refcounts(counts)
            res.corruptions = res.leaks = 0
            res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
            self.rebuild = False
            counts = self.calculate()
            stored = _Stored(self.fd, self.h)
            saved = (res.corruptions, res.leaks, res.leaks_fixed, res.corruptions_fixed)
            highest = self.compare(counts, FIX_LEAKS, stored)
            fresh_leaks = res.leaks
            res.corruptions, res.leaks, res.leaks_fixed, res.corruptions_fixed = saved
            if self.rebuild:
                self._say("ERROR rebuilt refcount structure is still broken")
            if res.corruptions < old_corruptions:
                res.corruptions_fixed += old_corruptions - res.corruptions
            if res.leaks < old_leaks:
                res.leaks_fixed += old_leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self._say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed("Input/output error", path=self.path, errno=_errno.EIO)
            if res.leaks or res.corruptions:
                res.corruptions, res.leaks, res.check_errors = before
                stored = _Stored(self.fd, self.h)
                highest = self.compare(counts, fix, stored)
        self.check_copied(stored)
        res.image_end_offset = (highest + 1) * self.cs
        if fix and not res.check_errors and not res.corruptions:
            self._mark_clean()
        if fix:
            os.fdatasync(self.fd)
        return res

    def _mark_clean(self) -> None:
        h = self.h
        clear = fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_CORRUPT
        if h.version >= 3 and h.incompatible_features & clear:
            h.incompatible_features &= ~clear
            os.fdatasync(self.fd)
            pwrite_full(self.fd, struct.pack(">Q", h.incompatible_features), _HDR_INCOMPAT)


class _Rebuild:
    """QEMU's refcount rebuild: refblocks and reftable allocated first-fit in memory."""

    def __init__(self, checker: _Checker, counts: np.ndarray) -> None:
        self.c = checker
        self.fd = checker.fd
        self.cs = checker.cs
        self.cb = checker.cb
        self.rb_bits = checker.h.refblock_bits
        self.order = checker.h.refcount_order
        self.arr = counts.astype(np.uint64, copy=True)
        self.reftable: list[int] = []

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """First run of ``count`` free clusters at or after ``first_free`` (growing the array
        when there is none); marks it used. Returns (cluster, updated first_free)."""
        arr = self.arr
        free = arr[first_free:] == 0
        frees = np.flatnonzero(free)
        if frees.size:
            first_free = first_free + int(frees[0])
        start = -1
        if count == 1:
            if frees.size:
                start = first_free
        elif free.size >= count:
            run = np.convolve(free.astype(np.int64), np.ones(count, dtype=np.int64), "valid")
            hits = np.flatnonzero(run == count)
            if hits.size:
                start = (arr.size - free.size) + int(hits[0])
        if start < 0:
            tail = 0
            while tail < min(count, free.size) and free[free.size - 1 - tail]:
                tail += 1
            start = arr.size - tail
            grow = start + count - arr.size
            self.arr = arr = np.concatenate([arr, np.zeros(grow, dtype=np.uint64)])
        arr[start : start + count] = 1
        return start, first_free

    def write_refblocks(self, first: int, end: int) -> bool:
        rb = 1 << self.rb_bits
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            nz = np.flatnonzero(self.arr[cluster:end])
            if not nz.size:
                break
            cluster += int(nz[0])
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

    def run(self) -> None:
        self.write_refblocks(0, self.arr.size)
        while True:
            length = len(self.reftable) * 8
            clusters = -(-length // self.cs)
            start, _ = self.alloc(clusters, 0)
            if not self.write_refblocks(start, start + clusters):
                break
            self.arr[start : start + clusters] = 0
        if length > fmt.MAX_REFTABLE_BYTES:
            raise CheckFailed("the rebuilt refcount table would exceed 8 MiB", path=self.c.path)
        table = np.array(self.reftable, dtype=np.uint64)
        pwrite_full(self.fd, fmt.encode_table(table), start << self.cb)
        os.fdatasync(self.fd)
        pwrite_full(self.fd, struct.pack(">QI", start << self.cb, clusters), _HDR_REFTABLE)
        os.fdatasync(self.fd)


def check(path: str, fix: int = 0) -> CheckResult:
    """One check pass over the qcow2 image at ``path``; ``fix`` is FIX_LEAKS | FIX_ERRORS."""
    try:
        fd = os.open(path, (os.O_RDWR if fix else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        return _Checker(fd, path, fix).run()
    except OSError as exc:
        raise from_oserror(exc, path) from None
    except VdiskError as exc:
        if exc.path is None:
            exc.path = path
        raise
    finally:
        os.close(fd)


def check_and_repair(path: str, fix: int = 0) -> tuple[CheckResult, CheckResult | None]:
    """qemu-img check's flow: check (repairing what ``fix`` allows); if anything was repaired,
    check again without repairing. Returns (final result, the repairing pass or None); the
    final result carries the repairing pass's fixed counts."""
    first = check(path, fix)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return first, None
    final = check(path, 0)
    final.corruptions_fixed = first.corruptions_fixed
    final.leaks_fixed = first.leaks_fixed
    return final, first


__all__ = ["FIX_ERRORS", "FIX_LEAKS", "CheckFailed", "CheckResult", "check", "check_and_repair"]
