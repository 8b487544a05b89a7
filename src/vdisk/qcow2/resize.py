"""Change a QCOW2 image's virtual size (``qemu-img resize``).

Growing only rewrites the header's size, unless the L1 table is too small: then a new, larger L1
table is written at the end of the file (with its refcounts) and synced before one header write
switches size, ``l1_size`` and ``l1_table_offset`` together; the old table is freed afterwards.
A crash leaves either the old image or the new one, at worst with a leaked cluster.
Persistent bitmaps are resized as QEMU does (``BitmapSet.resize_check``/``resized``): stored
IN_USE across the size change, then stored again at the new size.

Shrinking drops every guest cluster past the new end (whole L2 tables past it are unlinked from
L1 and freed), syncs, and only then writes the smaller size into the header.
"""

from __future__ import annotations

import os
import struct
from array import array

import numpy as np

from ..errors import RequestError, UnsupportedFeatureError, from_oserror
from ..fileio import pwrite_full
from . import format as fmt
from .cache import encode_l2
from .image import Qcow2Image

_CHUNK = 1 << 20


def resize(img: Qcow2Image, new_size: int, preallocation: str = "off") -> None:
    """Resize an image opened read-write.

    ``preallocation`` (growing only), as QEMU does it: metadata maps every new cluster to a
    fresh host cluster past the end of the file (reading as zeros, left sparse), falloc also
    allocates those in the file system, full writes zeros through the image.
    """
    if new_size % 512:
        raise RequestError("The new size must be a multiple of 512", path=img.path)
    header = img.header
    if img.snapshots and header.version < 3:
        raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots", path=img.path)
    old_size = img.size
    if preallocation != "off" and img.data_fd != img.fd:
        raise UnsupportedFeatureError(
            "preallocation when resizing an image with an external data file is not supported",
            path=img.path,
        )
    if preallocation != "off" and new_size < old_size:
        raise RequestError("Preallocation can only be used for growing images", path=img.path)
    # A backing file longer than the old size would show through the new area: QEMU zeroes
    # it, which needs zero clusters (v3).
    zero_new = img.backing is not None and img.backing.size > old_size and new_size > old_size
    if zero_new and header.version < 3:
        raise UnsupportedFeatureError(
            "Failed to zero out new clusters: Operation not supported", path=img.path
        )
    try:
        with img._lock:
            if img._readonly:
                raise RequestError("image is read-only", path=img.path)
            if not img._write_ready:
                img._prepare_first_write()
            img._flush_locked()  # the cache is clean and everything is on disk
            # Bitmaps are stored IN_USE while the size changes, then stored at the new size.
            img._bitmaps.resize_check()
            if new_size > old_size:
                _grow(img, new_size)
            elif new_size < old_size:
                _shrink(img, new_size)
            img._size = new_size
            if img.data_fd != img.fd:  # as QEMU: the data file takes the new size too
                os.ftruncate(img.data_fd, new_size)
            img._bitmaps.resized(new_size)
            # With extended L2 entries QEMU leaves even fully preallocated subclusters
            # unallocated (zeros written to the host clusters only).
            by_map = preallocation in ("metadata", "falloc") or (
                preallocation == "full" and header.extended_l2
            )
            if by_map and new_size > old_size:
                _preallocate(img, old_size, new_size, preallocation)
                img._flush_locked()
        if zero_new:
            img.write_zeroes(old_size, new_size - old_size)
            img.flush()
        if preallocation == "full" and not header.extended_l2 and new_size > old_size:
            zeros = bytes(_CHUNK)
            pos = old_size
            while pos < new_size:
                n = min(_CHUNK, new_size - pos)
                img.write(zeros[:n], pos)
                pos += n
            img.flush()
    except OSError as exc:
        raise from_oserror(exc, img.path) from None


def _write_header(img: Qcow2Image, size: int, l1_size: int, l1_offset: int) -> None:
    # size, crypt_method, l1_size and l1_table_offset are adjacent: one write inside the
    # first sector switches them together.
    h = img.header
    data = struct.pack(">QIIQ", size, h.crypt_method, l1_size, l1_offset)
    pwrite_full(img.fd, data, fmt.HDR_SIZE)
    os.fdatasync(img.fd)
    h.size = size
    h.l1_size = l1_size
    h.l1_table_offset = l1_offset


def _grow(img: Qcow2Image, new_size: int) -> None:
    h = img.header
    m = img.map
    need = fmt.l1_entries_for(new_size, h.cluster_bits, h.l2_bits)
    if need <= len(m.l1):
        _write_header(img, new_size, h.l1_size, h.l1_table_offset)
        return
    if need * 8 > fmt.MAX_L1_BYTES:
        raise RequestError("The new size is too large for this image's cluster size", path=img.path)
    cb = img.cluster_bits
    cs = img.cluster_size
    clusters = (need * 8 + cs - 1) // cs
    new_l1: array[int] = array("Q", m.l1)
    new_l1.extend([0] * (need - len(new_l1)))
    start = img.refcounts.allocate_contiguous(clusters)
    img.metadata.update(range(start, start + clusters))
    data = encode_l2(new_l1)
    data += bytes(clusters * cs - len(data))
    pwrite_full(img.fd, data, start << cb)
    img.refcounts.write_back()
    os.fdatasync(img.fd)
    old_offset, old_entries = h.l1_table_offset, h.l1_size
    _write_header(img, new_size, need, start << cb)
    m.l1 = new_l1
    m.l1_dirty.clear()
    # The header switch is durable: the old table is garbage now.
    old_first = old_offset >> cb
    old_clusters = (old_entries * 8 + cs - 1) // cs
    if old_entries:
        for c in range(old_first, old_first + old_clusters):
            img.metadata.discard(c)
        img.refcounts.free(old_first, old_clusters)
    img.refcounts.write_back()
    os.fdatasync(img.fd)


def _preallocate(img: Qcow2Image, old_size: int, new_size: int, mode: str) -> None:
    """Map every unallocated cluster from the one holding ``old_size`` on to new host clusters."""
    m = img.map
    cb = img.cluster_bits
    cs = img.cluster_size
    l2_bits = img.header.l2_bits
    end_gc = (new_size + cs - 1) >> cb
    gc = old_size >> cb
    frees: list[int] = []
    tail = old_size & (cs - 1)
    if tail and not m.extended:
        # The old last cluster is already mapped: zero its bytes past the old end, as QEMU
        # does, so that nothing left there earlier shows through.
        e, _bm = m.entry(gc)
        host = e & fmt.L2E_OFFSET_MASK
        if host and not e & fmt.OFLAG_COMPRESSED and not e & fmt.OFLAG_ZERO:
            pwrite_full(img.fd, bytes(cs - tail), host + tail)
    while gc < end_gc:
        # One L2 table at a time: memory stays bounded for any size.
        stop = min(end_gc, ((gc >> l2_bits) + 1) << l2_bits)
        todo = []
        for g in range(gc, stop):
            e, _bm = m.entry(g)
            if not (e & fmt.L2E_OFFSET_MASK or e & fmt.OFLAG_COMPRESSED):
                todo.append(g)
        gc = stop
        if not todo:
            continue
        l2, l2_off = m.writable_l2(todo[0] >> l2_bits, frees)
        file_size = os.fstat(img.fd).st_size
        start = img.refcounts.allocate_contiguous(len(todo))
        lo, hi = start << cb, (start + len(todo)) << cb
        # full: zeros everywhere; otherwise only where a former owner left data behind.
        zero_end = hi if mode == "full" else min(hi, file_size)
        if lo < zero_end:
            zeros = bytes(min(_CHUNK, zero_end - lo))
            for pos in range(lo, zero_end, len(zeros)):
                pwrite_full(img.fd, zeros[: min(len(zeros), zero_end - pos)], pos)
        if mode == "falloc":
            os.posix_fallocate(img.fd, lo, hi - lo)
        elif os.fstat(img.fd).st_size < hi:
            os.ftruncate(img.fd, hi)
        for k, g in enumerate(todo):
            i = g & ((1 << l2_bits) - 1)
            entry = ((start + k) << cb) | fmt.OFLAG_COPIED
            if m.extended:
                l2[2 * i] = entry
                l2[2 * i + 1] = 0  # subclusters unallocated: they read as zeros
            else:
                l2[i] = entry
        img.cache.mark_dirty(l2_off, l2)
    img._free_later(frees)


def _shrink(img: Qcow2Image, new_size: int) -> None:
    h = img.header
    m = img.map
    cb = img.cluster_bits
    l2_bits = h.l2_bits
    first_gc = (new_size + img.cluster_size - 1) >> cb
    frees: list[int] = []
    # The L2 table that straddles the new end: drop its entries past the end one by one.
    if first_gc & ((1 << l2_bits) - 1):
        i = first_gc >> l2_bits
        if i < len(m.l1) and m.l1[i] & fmt.L1E_OFFSET_MASK:
            for gc in range(first_gc, (i + 1) << l2_bits):
                e, bm = m.entry(gc)
                if e or bm:
                    m.deallocate_cluster(gc, zero=False, frees=frees)
        first_l1 = i + 1
    else:
        first_l1 = first_gc >> l2_bits
    # Whole L2 tables past the end: unlink from L1, then free the table and its clusters.
    for i in range(first_l1, len(m.l1)):
        off = m.l1[i] & fmt.L1E_OFFSET_MASK
        if not off:
            continue
        table = m.l2_table(i)
        assert table is not None
        entries = np.frombuffer(table, dtype=np.uint64)
        if m.extended:
            entries = entries[0::2]  # (entry, subcluster bitmap) pairs
        for e in entries[entries != 0].tolist():
            m.entry_frees(e, frees)
        frees.append(off >> cb)
        m.l1[i] = 0
        m.l1_dirty.add(i)
    img._free_later(frees)
    # L2 and L1 changes reach the disk before any refcount drops.
    img._flush_locked()
    _write_header(img, new_size, h.l1_size, h.l1_table_offset)


def _drop_idle_refblocks(path: str) -> None:
    """Unlink refcount blocks that count nothing but themselves (QEMU's reftable shrink)."""
    from .cache import REFBLOCK

    img = Qcow2Image.open(path, open_backing=False)
    try:
        if img.header.dirty:
            return
        rc = img.refcounts
        cb = img.cluster_bits
        with img._lock:
            img._flush_locked()
            idle: list[tuple[int, int, bool]] = []  # (table index, cluster, counts itself)
            for b in range(len(rc.table)):
                off = rc.table[b]
                if not off:
                    continue
                block = img.cache.get(off, REFBLOCK)
                nz = np.flatnonzero(block)
                own = off >> cb
                base = b << rc.rb_bits
                self_count = base <= own < base + rc.rb_entries
                if nz.size == 0 or (self_count and nz.size == 1 and base + int(nz[0]) == own):
                    idle.append((b, own, self_count))
            if not idle:
                return
            # Unlink first (durably), then drop the blocks' own references.
            base_off = img.header.refcount_table_offset
            for b, _own, _self in idle:
                pwrite_full(img.fd, bytes(8), base_off + b * 8)
                rc.table[b] = 0
            os.fdatasync(img.fd)
            for _b, own, self_count in idle:
                img.cache.drop(own << cb)
                img.metadata.discard(own)
                if not self_count:
                    rc.add(own, -1)
            img._flush_locked()
    finally:
        img.close()


def trim_file(path: str) -> None:
    """Cut the file after its last cluster with a nonzero refcount, as QEMU does after a
    shrink. Call it with the image closed everywhere; only unreferenced clusters go."""
    from .cache import REFBLOCK

    try:
        _drop_idle_refblocks(path)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    img = Qcow2Image.open(path, readonly=True, open_backing=False)
    try:
        if img.header.dirty:
            return  # refcounts may be stale (lazy refcounts): leave the file alone
        rc = img.refcounts
        end = 0
        for b in range(len(rc.table) - 1, -1, -1):
            if rc.table[b]:
                nz = np.flatnonzero(img.cache.get(rc.table[b], REFBLOCK))
                if nz.size:
                    end = ((b << rc.rb_bits) + int(nz[-1]) + 1) << img.cluster_bits
                    break
    finally:
        img.close()
    try:
        if end and end < os.stat(path).st_size:
            os.truncate(path, end)
    except OSError as exc:
        raise from_oserror(exc, path) from None
