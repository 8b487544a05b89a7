"""Read-only access to qcow2 persistent dirty bitmaps (for exporting them over NBD).

Reads the bitmap directory and one bitmap's table and data clusters straight from the file
opened read-only; the structures are decoded by ``format.py``.
"""

from __future__ import annotations

import os

from ..block import DirtyBitmap
from ..errors import CorruptImageError, UnsupportedFeatureError, VdiskError, from_oserror
from . import format as fmt

BitmapEntry = fmt.BitmapDirectoryEntry
MAX_GRANULARITY_BITS = 31  # as QEMU's BME_MAX_GRANULARITY_BITS
MIN_GRANULARITY_BITS = 9


def _pread(fd: int, length: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptImageError(
            f"structure at {offset:#x} lies past the end of the file", path=path
        )
    return data


def _read_header(fd: int, path: str) -> fmt.Header:
    head = os.pread(fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
    try:
        return fmt.Header.decode(head)
    except VdiskError as exc:
        exc.path = path
        raise


def _directory(fd: int, header: fmt.Header, path: str) -> list[BitmapEntry]:
    """The bitmap directory; empty when there is none or the autoclear bit says it is stale."""
    ext = header.bitmaps
    if ext is None or not header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        return []
    data = _pread(fd, ext.directory_size, ext.directory_offset, path)
    try:
        return fmt.decode_bitmap_directory(data, ext.nb_bitmaps)
    except VdiskError as exc:
        exc.path = path
        raise


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None


def read_directory(path: str) -> list[BitmapEntry]:
    """The persistent bitmaps of a qcow2 image (empty when it has none or they are stale)."""
    fd = _open(path)
    try:
        return _directory(fd, _read_header(fd, path), path)
    finally:
        os.close(fd)


def _find_usable(entries: list[BitmapEntry], name: str, path: str) -> BitmapEntry:
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        known = ", ".join(e.name for e in entries) or "none"
        raise VdiskError(f"bitmap {name!r} not found (bitmaps: {known})", path=path)
    if entry.in_use:
        raise CorruptImageError(f"bitmap {name!r} is inconsistent (in use)", path=path)
    if entry.type != fmt.BITMAP_TYPE_DIRTY_TRACKING:
        raise UnsupportedFeatureError(f"bitmap {name!r} has unknown type {entry.type}", path=path)
    if not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS:
        raise CorruptImageError(f"bitmap {name!r} has invalid granularity", path=path)
    return entry


def read_bitmap(path: str, name: str) -> tuple[BitmapEntry, int, bytearray]:
    """(entry, virtual size, bits): one bit per granularity bytes, LSB first, as stored."""
    fd = _open(path)
    try:
        header = _read_header(fd, path)
        entry = _find_usable(_directory(fd, header, path), name, path)
        cluster_size = header.cluster_size
        nbits = -(-header.size // entry.granularity)
        nbytes = -(-nbits // 8)
        needed = -(-nbits // (cluster_size * 8))
        if entry.bitmap_table_size < needed:
            raise CorruptImageError(f"bitmap {name!r} table is too small", path=path)
        table = _pread(fd, 8 * needed, entry.bitmap_table_offset, path)
        bits = bytearray(nbytes)
        for i, (host, all_ones) in enumerate(fmt.decode_bitmap_table(table, needed)):
            lo = i * cluster_size
            hi = min(lo + cluster_size, nbytes)
            if host:
                bits[lo:hi] = _pread(fd, hi - lo, host, path)
            elif all_ones:
                bits[lo:hi] = b"\xff" * (hi - lo)
        # Bits past the end of the disk are not part of the bitmap.
        if nbits % 8:
            bits[-1] &= (1 << (nbits % 8)) - 1
        return entry, header.size, bits
    finally:
        os.close(fd)


def load_bitmap(path: str, name: str) -> DirtyBitmap:
    """The named bitmap as the dirty-bitmap view exports consume."""
    entry, size, bits = read_bitmap(path, name)
    return DirtyBitmap(name, size, entry.granularity, bits, enabled=entry.enabled)
