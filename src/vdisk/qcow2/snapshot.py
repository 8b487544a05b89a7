"""Internal snapshots: list, create, apply (revert to), delete, and read-only snapshot views.

A snapshot is an entry in the snapshot table naming a copy of the active L1 table. Refcounts
count every path to a cluster: creating a snapshot adds one reference to every L2 table the
active L1 names and to every cluster those tables map; deleting one drops the references of its
L1 table. OFLAG_COPIED (refcount exactly 1) is kept exact in the active tables after every
operation.

Crash ordering, every operation alike: new structures (an L1 copy, a snapshot table) and the
refcount increases that cover them are synced before one header write inside the first sector
switches to them (``nb_snapshots`` and ``snapshots_offset`` together, or the size and the L1
table together); refcount decreases come after that switch. A crash can then only leave
refcounts too high (leaks) and COPIED flags stale. On a v3 image the dirty bit is set around
the operation, so whoever opens it next (QEMU or vdisk) rebuilds refcounts and flags.

Everything here runs with the image's metadata lock held, after guest I/O has drained and
the image is flushed. A failure half-way forgets what is not on disk yet, as a power cut would,
and leaves the image read-only until it is reopened.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import struct
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    CorruptImageError,
    ReadOnlyError,
    RequestError,
    UnsupportedFeatureError,
    from_oserror,
)
from ..fileio import pread_full, pwrite_full
from . import format as fmt
from .cache import L2, decode_l2, encode_l2
from .cluster import read_snapshots
from .datafile import refuse_on_data_file

if TYPE_CHECKING:
    from .image import Qcow2Image

MAX_TABLE_BYTES = 1024 * fmt.MAX_SNAPSHOTS  # QEMU's bound on the whole snapshot table
EXTRA_SIZE = 24  # the extra data QEMU writes: vm_state_size, disk_size, icount
_HDR_NB_SNAPSHOTS = 60  # u32 nb_snapshots, then u64 snapshots_offset: one write switches both


class SnapshotNotFoundError(RequestError):
    """No snapshot has the given ID or name."""

    errno = _errno.ENOENT


# -- lookup -----------------------------------------------------------------------------------
def find_snapshot(
    snapshots: list[fmt.SnapshotEntry], key: str, by_id: bool = True, by_name: bool = True
) -> int:
    """Index of the snapshot whose ID (first) or name is ``key``, as QEMU looks them up."""
    if by_id:
        for i, sn in enumerate(snapshots):
            if sn.id_str == key:
                return i
    if by_name:
        for i, sn in enumerate(snapshots):
            if sn.name == key:
                return i
    raise SnapshotNotFoundError(f"snapshot {key!r} not found")


def _id_number(id_str: str) -> int:
    """The number C's strtoul reads at the start of ``id_str`` (0 if none)."""
    m = re.match(r"\s*\+?(\d+)", id_str)
    return int(m.group(1)) if m else 0


def next_id(snapshots: list[fmt.SnapshotEntry]) -> str:
    """QEMU's rule: one more than the largest numeric ID."""
    return str(max((_id_number(sn.id_str) for sn in snapshots), default=0) + 1)


# -- walking references -----------------------------------------------------------------------
def _read_l1(img: Qcow2Image, sn: fmt.SnapshotEntry) -> array[int]:
    """A snapshot's L1 table, checked as the active one is on open."""
    cs = img.cluster_size
    what = f"snapshot {sn.id_str} ({sn.name})"
    if sn.l1_size * 8 > fmt.MAX_L1_BYTES:
        raise CorruptImageError(f"{what}: L1 table is too large", path=img.path)
    if sn.l1_table_offset & (cs - 1):
        raise CorruptImageError(f"{what}: L1 table is not cluster aligned", path=img.path)
    file_size = os.fstat(img.fd).st_size
    if sn.l1_size and sn.l1_table_offset + sn.l1_size * 8 > file_size:
        raise CorruptImageError(f"{what}: L1 table lies past the end of the file", path=img.path)
    buf = bytearray(sn.l1_size * 8)
    pread_full(img.fd, buf, sn.l1_table_offset)
    l1 = decode_l2(buf)
    for i, e in enumerate(l1):
        off = e & fmt.L1E_OFFSET_MASK
        if off & (cs - 1) or (off and off + cs > file_size):
            raise CorruptImageError(f"{what}: L1 entry {i} is invalid ({e:#x})", path=img.path)
    return l1


def _tables(l1: array[int]) -> Iterator[tuple[int, int]]:
    """(L1 index, L2 table offset) of every L1 entry that names a table."""
    for i, e in enumerate(l1):
        off = e & fmt.L1E_OFFSET_MASK
        if off:
            yield i, off


_U64 = np.uint64
_COPIED = _U64(fmt.OFLAG_COPIED)
_NOT_COPIED = _U64(~fmt.OFLAG_COPIED & ((1 << 64) - 1))
_COMPRESSED = _U64(fmt.OFLAG_COMPRESSED)
_L2_OFFSET = _U64(fmt.L2E_OFFSET_MASK)


def _entries(img: Qcow2Image, table: array[int]) -> np.ndarray:
    """A writable view of an L2 table's entries (every other word with extended L2)."""
    view = np.frombuffer(table, dtype=np.uint64)
    return view[::2] if img.map.extended else view


def _references(img: Qcow2Image, l1: array[int]) -> tuple[list[int], np.ndarray]:
    """(the L2 tables, every host cluster) one path through ``l1`` holds a reference on:
    each L2 table and each cluster it maps (once per compressed cluster touched)."""
    cb = _U64(img.cluster_bits)
    tables: list[int] = []
    parts: list[np.ndarray] = []
    for _i, off in _tables(l1):
        tables.append(off >> img.cluster_bits)
        entries = _entries(img, img.cache.get(off, L2))
        entries = entries[entries != 0]
        compressed = (entries & _COMPRESSED) != 0
        hosts = (entries[~compressed] & _L2_OFFSET) >> cb
        parts.append(hosts[hosts != 0])
        for e in entries[compressed].tolist():
            parts.append(np.array(fmt.compressed_host_clusters(e, img.cluster_bits), np.uint64))
    parts.append(np.array(tables, dtype=np.uint64))
    return tables, np.concatenate(parts)


def _by_block(img: Qcow2Image, clusters: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(refcount block index, positions in ``clusters``) for each block they fall in."""
    blocks = clusters >> _U64(img.refcounts.rb_bits)
    order = np.argsort(blocks, kind="stable")
    ordered = blocks[order]
    if not ordered.size:
        return
    bounds = [*np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]).tolist(), ordered.size]
    for k in range(len(bounds) - 1):
        yield int(ordered[bounds[k]]), order[bounds[k] : bounds[k + 1]]


def _refcounts_of(img: Qcow2Image, clusters: np.ndarray) -> np.ndarray:
    rc = img.refcounts
    out = np.zeros(clusters.size, dtype=np.uint64)
    mask = _U64(rc.rb_entries - 1)
    for bi, pos in _by_block(img, clusters):
        block = rc._block(bi, create=False)
        if block is not None:  # an array: np.asarray is a view of it
            out[pos] = np.asarray(block)[clusters[pos] & mask]
    return out


def _add_references(img: Qcow2Image, refs: np.ndarray) -> None:
    """One more reference per occurrence in ``refs``: all of them, or (refused before any
    change) none, when a cluster is unknown or the refcount width cannot count them."""
    rc = img.refcounts
    clusters, counts = np.unique(refs, return_counts=True)
    if not clusters.size:
        return
    if int(clusters[-1]) >= rc.end_cluster:
        raise CorruptImageError(
            f"reference to cluster {int(clusters[-1])}, past the end of the file", path=img.path
        )
    current = _refcounts_of(img, clusters)
    if not current.all():
        c = int(clusters[np.flatnonzero(current == 0)[0]])
        raise CorruptImageError(f"referenced cluster {c} has refcount 0", path=img.path)
    over = np.flatnonzero(current + counts.astype(np.uint64) > _U64(rc.max_refcount))
    if over.size:
        raise RequestError(
            f"refcount of cluster {int(clusters[over[0]])} would exceed {rc.max_refcount} "
            f"(refcount_bits={img.header.refcount_bits})",
            path=img.path,
            errno=_errno.EINVAL,
        )
    mask = _U64(rc.rb_entries - 1)
    for bi, pos in _by_block(img, clusters):
        block = rc._block(bi, create=False)
        assert block is not None  # every cluster here has a refcount
        view = np.asarray(block)  # writes through to the cached block
        view[clusters[pos] & mask] += counts[pos].astype(view.dtype)
        rc.cache.mark_dirty(rc.table[bi], block)


def _fix_copied(img: Qcow2Image) -> None:
    """Set OFLAG_COPIED in the active L1 and L2 tables exactly where the refcount is 1."""
    m = img.map
    cb = _U64(img.cluster_bits)
    for i, off in _tables(m.l1):
        ours = img.refcounts.get(off >> img.cluster_bits) == 1
        want = off | (fmt.OFLAG_COPIED if ours else 0)
        if m.l1[i] != want:
            m.l1[i] = want
            m.l1_dirty.add(i)
        table = img.cache.get(off, L2)
        entries = _entries(img, table)
        hosts = entries & _L2_OFFSET
        where = np.flatnonzero((hosts != 0) & ((entries & _COMPRESSED) == 0))
        if not where.size:
            continue
        old = entries[where]
        if ours:
            single = _refcounts_of(img, hosts[where] >> cb) == 1
            new = np.where(single, old | _COPIED, old & _NOT_COPIED)
        else:
            new = old & _NOT_COPIED
        if (new != old).any():
            entries[where] = new
            img.cache.mark_dirty(off, table)


def _drop_references(img: Qcow2Image, refs: np.ndarray, tables: list[int]) -> None:
    """After the switch that unlinked them: one reference less per occurrence in ``refs``,
    made durable; L2 ``tables`` whose last reference went leave the cache.

    While readers hold tickets the drops wait for them, as every free does (pending frees);
    otherwise they are applied at once, a refcount block at a time.
    """
    rc = img.refcounts
    clusters, counts = np.unique(refs, return_counts=True)
    current = _refcounts_of(img, clusters)
    if img._active or (current < counts.astype(np.uint64)).any():
        img._free_later(refs.tolist())  # the general path (it also skips damaged counts)
    else:
        mask = _U64(rc.rb_entries - 1)
        for bi, pos in _by_block(img, clusters):
            block = rc._block(bi, create=False)
            assert block is not None  # every cluster here has a refcount
            view = np.asarray(block)  # writes through to the cached block
            view[clusters[pos] & mask] -= counts[pos].astype(view.dtype)
            rc.cache.mark_dirty(rc.table[bi], block)
        for c in clusters[current == counts.astype(np.uint64)].tolist():
            rc._released(c)  # free for reuse; no longer metadata
    img._flush_locked()
    for c in tables:
        if not rc.get(c):
            img.cache.drop(c << img.cluster_bits)


# -- the operation frame ----------------------------------------------------------------------
@contextmanager
def _operation(img: Qcow2Image) -> Iterator[None]:
    """Hold the metadata lock around an operation; file errors become VdiskErrors.

    Refusals (RequestError, UnsupportedFeatureError) come before any change. Any other
    failure abandons the image's unflushed state, as a crash would (see :func:`_abandon`)."""
    try:
        with img._lock:
            set_dirty = _begin(img)
            try:
                yield
            except (RequestError, UnsupportedFeatureError):
                _end(img, set_dirty)
                raise
            except BaseException:
                _abandon(img)
                raise
            _end(img, set_dirty)
    except OSError as exc:
        raise from_oserror(exc, img.path) from None


def _abandon(img: Qcow2Image) -> None:
    """A failure half-way: forget every change not yet on disk, as a power cut would. What
    reached the disk was ordered to leak at worst, and the dirty bit (v3) makes the next
    open repair the refcounts and flags. The image takes no more writes: reopen it."""
    img.cache.clear()
    img.map.l1_dirty.clear()
    img.refcounts.table_dirty.clear()
    img._pending.clear()
    img._readonly = True
    img._forget_extents()
    img._opened_rw = False  # close() neither flushes nor clears the dirty bit


def _begin(img: Qcow2Image) -> bool:
    """Under the lock: refuse what cannot be done, wait for in-flight writes, flush, and set
    the dirty bit (v3). Returns whether this call set the bit."""
    if img._readonly:
        raise ReadOnlyError("image is read-only", path=img.path)
    refuse_on_data_file(img.header, img.path)
    if img._extents is not None and img._extents.holders:
        # Its I/O runs outside the image (extents.py) and holds tickets: no drain would end.
        raise RequestError("image is being exported with host extents: stop the export first",
                           path=img.path)
    # Drain guest I/O, as QEMU drains before a snapshot: allocating writes (notified) and
    # every request holding a ticket (in-place writes, reads; returned without a notify).
    # New requests wait meanwhile (Qcow2Image._admit), or a busy writer would starve us.
    img._quiescing += 1
    try:
        while img._inflight or img._active:
            img._wait(None if img._inflight else 0.001)
    finally:
        img._quiescing -= 1
        img._cond.notify_all()  # the admitted requests then wait for the lock
    if not img._write_ready:
        img._prepare_first_write()
    img._flush_locked()
    h = img.header
    if h.version >= 3 and not h.dirty:
        img._write_features(incompatible=h.incompatible_features | fmt.INCOMPAT_DIRTY)
        return True
    return False


def _end(img: Qcow2Image, set_dirty: bool) -> None:
    img._flush_locked()
    if set_dirty:
        img._write_features(incompatible=img.header.incompatible_features & ~fmt.INCOMPAT_DIRTY)


def _allocate_and_write(img: Qcow2Image, data: bytes) -> int:
    """Write ``data`` into new contiguous clusters (padded); returns its offset."""
    cs = img.cluster_size
    count = (len(data) + cs - 1) // cs
    start = img.refcounts.allocate_contiguous(count)
    img.metadata.update(range(start, start + count))
    pwrite_full(img.fd, data + bytes(count * cs - len(data)), start << img.cluster_bits)
    return start << img.cluster_bits


def _clusters_of(offset: int, length: int, cluster_bits: int) -> list[int]:
    if not length:
        return []
    return list(range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1))


def _complete(img: Qcow2Image, sn: fmt.SnapshotEntry) -> fmt.SnapshotEntry:
    """As QEMU rewrites an entry: extra data at least 24 bytes; a missing disk size is the
    image's size, a missing icount -1."""
    if len(sn.extra_data) < EXTRA_SIZE:
        sn.extra_data = sn.extra_data + bytes(EXTRA_SIZE - len(sn.extra_data))
        if sn.disk_size is None:
            sn.disk_size = img.size
        if sn.icount is None:
            sn.icount = -1
    return sn


def _switch_table(img: Qcow2Image, entries: list[fmt.SnapshotEntry]) -> None:
    """Write ``entries`` as a new snapshot table and switch the header to it; the old table's
    clusters are freed after the switch."""
    h = img.header
    old = _clusters_of(
        h.snapshots_offset, fmt.snapshot_table_size(read_snapshots(img.fd, h)), img.cluster_bits
    )
    entries = [_complete(img, s) for s in entries]
    # As QEMU sizes the table: the last entry's padding is not part of it.
    data = fmt.encode_snapshot_table(entries)[: fmt.snapshot_table_size(entries)]
    if len(data) > MAX_TABLE_BYTES:
        raise RequestError("snapshot table too large", path=img.path, errno=_errno.EFBIG)
    offset = _allocate_and_write(img, data) if entries else 0
    img.refcounts.write_back()
    os.fdatasync(img.fd)
    pwrite_full(img.fd, struct.pack(">IQ", len(entries), offset), _HDR_NB_SNAPSHOTS)
    os.fdatasync(img.fd)
    h.nb_snapshots = len(entries)
    h.snapshots_offset = offset
    img._free_later(old)


# -- operations -------------------------------------------------------------------------------
def create_snapshot(
    img: Qcow2Image,
    name: str,
    date_ns: int | None = None,
    vm_clock_nsec: int = 0,
    vm_state_size: int = 0,
    icount: int = 0,
) -> fmt.SnapshotEntry:
    """Snapshot the active state under ``name`` (names may repeat, as in QEMU); the new entry
    gets QEMU's next ID. ``date_ns`` defaults to now (microsecond precision, as qemu-img)."""
    if len(name.encode()) > 0xFFFF:
        raise RequestError("snapshot name longer than 65535 bytes", path=img.path)
    if date_ns is None:
        date_ns = time.time_ns() // 1000 * 1000
    with _operation(img):
        snaps = read_snapshots(img.fd, img.header)
        if len(snaps) >= fmt.MAX_SNAPSHOTS:
            raise RequestError("Too many snapshots", path=img.path, errno=_errno.EFBIG)
        # The L1 copy, as it stands (its COPIED flags mean nothing outside the active table).
        l1_copy = array("Q", img.map.l1)
        entry = fmt.SnapshotEntry(
            0,
            len(l1_copy),
            next_id(snaps),
            name,
            date_ns // 1_000_000_000,
            date_ns % 1_000_000_000,
            vm_clock_nsec,
            vm_state_size,
            bytes(EXTRA_SIZE),
            img.size,
            icount,
        )
        if fmt.snapshot_table_size([_complete(img, s) for s in [*snaps, entry]]) > MAX_TABLE_BYTES:
            raise RequestError("snapshot table too large", path=img.path, errno=_errno.EFBIG)
        _add_references(img, _references(img, l1_copy)[1])  # refuses before any change
        entry.l1_table_offset = _allocate_and_write(img, encode_l2(l1_copy)) if l1_copy else 0
        _fix_copied(img)  # every referenced cluster is shared now: COPIED goes
        img._flush_locked()  # increases and the copy are durable before the table names them
        _switch_table(img, [*snaps, entry])
        return entry


def delete_snapshot(
    img: Qcow2Image, key: str, by_id: bool = True, by_name: bool = True
) -> fmt.SnapshotEntry:
    """Delete the snapshot with ID or name ``key``; returns its entry."""
    with _operation(img):
        snaps = read_snapshots(img.fd, img.header)
        sn = snaps[find_snapshot(snaps, key, by_id, by_name)]
        sn_l1 = _read_l1(img, sn)  # checked before anything changes
        _switch_table(img, [s for s in snaps if s is not sn])
        # The table no longer names the snapshot: drop its references.
        tables, refs = _references(img, sn_l1)
        l1_clusters = _clusters_of(sn.l1_table_offset, sn.l1_size * 8, img.cluster_bits)
        _drop_references(img, np.r_[refs, np.array(l1_clusters, np.uint64)], tables)
        _fix_copied(img)
        return sn


def apply_snapshot(img: Qcow2Image, key: str) -> fmt.SnapshotEntry:
    """Revert the active state to the snapshot with ID or name ``key`` (the snapshot stays).
    The image takes the snapshot's disk size."""
    with _operation(img):
        h = img.header
        snaps = read_snapshots(img.fd, h)
        sn = snaps[find_snapshot(snaps, key)]
        sn_l1 = _read_l1(img, sn)
        size = sn.disk_size if sn.disk_size is not None else img.size
        if size != img.size and h.version < 3:
            raise UnsupportedFeatureError(
                "Can't resize a v2 image which has snapshots", path=img.path
            )
        m = img.map
        cb = img.cluster_bits
        entries = max(len(m.l1), sn.l1_size, fmt.l1_entries_for(size, cb, h.l2_bits))
        if entries * 8 > fmt.MAX_L1_BYTES:
            raise CorruptImageError("snapshot disk size needs too large an L1 table", path=img.path)
        _add_references(img, _references(img, sn_l1)[1])
        new_l1 = array("Q", (e & ~fmt.OFLAG_COPIED for e in sn_l1))
        new_l1.extend([0] * (entries - len(new_l1)))
        l1_offset = _allocate_and_write(img, encode_l2(new_l1))
        img._flush_locked()
        # size, crypt_method, l1_size and l1_table_offset are adjacent in the first sector.
        pwrite_full(img.fd, struct.pack(">QIIQ", size, h.crypt_method, entries, l1_offset), 24)
        os.fdatasync(img.fd)
        old_l1, old_offset, old_entries = m.l1, h.l1_table_offset, h.l1_size
        h.size, h.l1_size, h.l1_table_offset = size, entries, l1_offset
        m.l1 = new_l1
        m.l1_dirty.clear()
        img._size = size
        img.metadata.update(off >> cb for _i, off in _tables(new_l1))
        # The old active state's references go.
        tables, refs = _references(img, old_l1)
        l1_clusters = _clusters_of(old_offset, old_entries * 8, cb)
        _drop_references(img, np.r_[refs, np.array(l1_clusters, np.uint64)], tables)
        _fix_copied(img)
        return sn


# -- a read-only view -------------------------------------------------------------------------
def load_view(
    img: Qcow2Image, key: str | dict[str, str], keep_size: bool = False
) -> fmt.SnapshotEntry:
    """Make a read-only image read as a snapshot: its L1 table and its disk size. Nothing on
    disk changes.

    ``key`` is an ID or name (ID first), or ``{"id": ..., "name": ...}`` with one or both
    (both must match), as QEMU's snapshot.id / snapshot.name. ``keep_size`` keeps the
    image's current size, as ``qemu-img convert -l`` reads a snapshot.
    """
    if not img.readonly:
        raise RequestError("a snapshot can only be opened read-only", path=img.path)
    with img._lock:
        snaps = read_snapshots(img.fd, img.header)
        sn = snaps[_find_view(snaps, key)]
        l1 = _read_l1(img, sn)
        size = img.size if keep_size or sn.disk_size is None else sn.disk_size
        h = img.header
        need = fmt.l1_entries_for(size, h.cluster_bits, h.l2_bits)
        if need > len(l1):
            if need * 8 > fmt.MAX_L1_BYTES:
                raise CorruptImageError(
                    f"snapshot {sn.id_str}: disk size {size} is too large", path=img.path
                )
            l1.extend([0] * (need - len(l1)))
        img.map.l1 = l1
        img._size = size
        return sn


def _find_view(snapshots: list[fmt.SnapshotEntry], key: str | dict[str, str]) -> int:
    if isinstance(key, str):
        return find_snapshot(snapshots, key)
    unknown = set(key) - {"id", "name"}
    if unknown:
        raise RequestError(f"unknown snapshot option(s): {', '.join(sorted(unknown))}")
    for i, sn in enumerate(snapshots):
        if key.get("id", sn.id_str) == sn.id_str and key.get("name", sn.name) == sn.name:
            return i
    raise SnapshotNotFoundError(f"snapshot {key} not found")
