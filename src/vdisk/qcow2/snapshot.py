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

Everything here runs with the image's metadata lock held, after a flush.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import struct
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from .image import Qcow2Image

MAX_TABLE_BYTES = 1024 * fmt.MAX_SNAPSHOTS  # QEMU's bound on the whole snapshot table
EXTRA_SIZE = 24  # the extra data QEMU writes: vm_state_size, disk_size, icount
_HDR_NB_SNAPSHOTS = 60  # u32 nb_snapshots, then u64 snapshots_offset: one write switches both
_DATA_FILE_REFUSAL = "internal snapshots are not supported with an external data file"


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


def _references(img: Qcow2Image, l1: array[int]) -> list[int]:
    """Host clusters one path through ``l1`` holds a reference on: each L2 table and each
    cluster it maps (once per compressed cluster touched). Tables come first in the list."""
    cb = img.cluster_bits
    step = 2 if img.map.extended else 1
    tables: list[int] = []
    data: list[int] = []
    for _i, off in _tables(l1):
        tables.append(off >> cb)
        table = img.cache.get(off, L2)
        for k in range(0, len(table), step):
            e = table[k]
            if e:
                img.map.entry_frees(e, data)
    return tables + data


def _check_room(img: Qcow2Image, refs: list[int]) -> None:
    """Refuse, before anything changes, references the refcount width cannot count."""
    top = img.refcounts.max_refcount
    for c, n in Counter(refs).items():
        if img.refcounts.get(c) + n > top:
            raise RequestError(
                f"refcount of cluster {c} would exceed {top} "
                f"(refcount_bits={img.header.refcount_bits})",
                path=img.path,
                errno=_errno.EINVAL,
            )


def _fix_copied(img: Qcow2Image) -> None:
    """Set OFLAG_COPIED in the active L1 and L2 tables exactly where the refcount is 1."""
    rc = img.refcounts
    m = img.map
    cb = img.cluster_bits
    step = 2 if m.extended else 1
    for i, off in _tables(m.l1):
        ours = rc.get(off >> cb) == 1
        want = off | (fmt.OFLAG_COPIED if ours else 0)
        if m.l1[i] != want:
            m.l1[i] = want
            m.l1_dirty.add(i)
        table = img.cache.get(off, L2)
        changed = False
        for k in range(0, len(table), step):
            e = table[k]
            host = e & fmt.L2E_OFFSET_MASK
            if not host or e & fmt.OFLAG_COMPRESSED:
                continue
            copied = ours and rc.get(host >> cb) == 1
            new = (e | fmt.OFLAG_COPIED) if copied else (e & ~fmt.OFLAG_COPIED)
            if new != e:
                table[k] = new
                changed = True
        if changed:
            img.cache.mark_dirty(off, table)


def _drop_freed_tables(img: Qcow2Image, clusters: list[int]) -> None:
    """Forget cached copies of L2 tables whose last reference went."""
    for c in clusters:
        if not img.refcounts.get(c):
            img.cache.drop(c << img.cluster_bits)


# -- the operation frame ----------------------------------------------------------------------
@contextmanager
def _operation(img: Qcow2Image) -> Iterator[None]:
    """Hold the metadata lock around an operation; file errors become VdiskErrors."""
    try:
        with img._lock:
            set_dirty = _begin(img)
            yield
            _end(img, set_dirty)
    except OSError as exc:
        raise from_oserror(exc, img.path) from None


def _begin(img: Qcow2Image) -> bool:
    """Under the lock: refuse what cannot be done, wait for in-flight writes, flush, and set
    the dirty bit (v3). Returns whether this call set the bit."""
    if img._readonly:
        raise ReadOnlyError("image is read-only", path=img.path)
    if img.header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError(_DATA_FILE_REFUSAL, path=img.path)
    while img._inflight:
        img._waiters += 1
        try:
            img._cond.wait()
        finally:
            img._waiters -= 1
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
        refs = _references(img, l1_copy)
        _check_room(img, refs)
        l1_offset = _allocate_and_write(img, encode_l2(l1_copy)) if len(l1_copy) else 0
        for c in refs:
            img.refcounts.add(c, 1)
        _fix_copied(img)  # every referenced cluster is shared now: COPIED goes
        img._flush_locked()  # increases and the copy are durable before the table names them
        entry = fmt.SnapshotEntry(
            l1_offset,
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
        refs = _references(img, sn_l1)
        tables = refs[: sum(1 for _ in _tables(sn_l1))]
        refs += _clusters_of(sn.l1_table_offset, sn.l1_size * 8, img.cluster_bits)
        img._free_later(refs)
        img._flush_locked()
        _drop_freed_tables(img, tables)
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
        rc = img.refcounts
        cb = img.cluster_bits
        entries = max(len(m.l1), sn.l1_size, fmt.l1_entries_for(size, cb, h.l2_bits))
        if entries * 8 > fmt.MAX_L1_BYTES:
            raise CorruptImageError("snapshot disk size needs too large an L1 table")
        refs = _references(img, sn_l1)
        _check_room(img, refs)
        for c in refs:
            rc.add(c, 1)
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
        refs = _references(img, old_l1)
        tables = refs[: sum(1 for _ in _tables(old_l1))]
        refs += _clusters_of(old_offset, old_entries * 8, cb)
        img._free_later(refs)
        img._flush_locked()
        _drop_freed_tables(img, tables)
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
