"""Read-only access to qcow2 persistent dirty bitmaps (for exporting them over NBD).

Parses the bitmaps header extension (0x23852875), the bitmap directory and a bitmap's table and
data clusters, straight from the file opened read-only, without the rest of the qcow2 library.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..block import DirtyBitmap
from ..errors import (
    CorruptImageError,
    FormatError,
    UnsupportedFeatureError,
    VdiskError,
    from_oserror,
)

QCOW2_MAGIC = 0x514649FB
BITMAPS_EXTENSION = 0x23852875
AUTOCLEAR_BITMAPS = 1 << 0
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BT_DIRTY_TRACKING = 1
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ALL_ONES = 1 << 0
MAX_DIRECTORY = 64 << 20  # as QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE

_DIR_ENTRY = struct.Struct(">QIIBBHI")
_EXT_HEADER = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")


@dataclass(frozen=True)
class BitmapEntry:
    """One entry of the bitmap directory."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        """qcow2's 'auto' flag: the bitmap tracks writes."""
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


@dataclass(frozen=True)
class _Header:
    size: int
    cluster_bits: int
    bitmap_ext: tuple[int, int, int] | None  # (count, directory size, directory offset)


def _pread(fd: int, length: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptImageError(
            f"structure at {offset:#x} lies past the end of the file", path=path
        )
    return data


def _read_header(fd: int, path: str) -> _Header:
    head = os.pread(fd, 104, 0)
    if len(head) < 72 or struct.unpack_from(">I", head, 0)[0] != QCOW2_MAGIC:
        raise FormatError("not a qcow2 image", path=path)
    version = struct.unpack_from(">I", head, 4)[0]
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    size = struct.unpack_from(">Q", head, 24)[0]
    if version < 3 or len(head) < 104:
        return _Header(size, cluster_bits, None)
    autoclear = struct.unpack_from(">Q", head, 88)[0]
    header_length = struct.unpack_from(">I", head, 100)[0]
    cluster_size = 1 << cluster_bits
    pos = header_length
    ext = None
    while pos + 8 <= cluster_size:
        etype, elen = _EXT_HEADER.unpack(_pread(fd, 8, pos, path))
        if etype == 0:
            break
        if etype == BITMAPS_EXTENSION and elen >= _BITMAPS_EXT.size:
            count, _, dir_size, dir_offset = _BITMAPS_EXT.unpack(
                _pread(fd, _BITMAPS_EXT.size, pos + 8, path)
            )
            if autoclear & AUTOCLEAR_BITMAPS:
                ext = (count, dir_size, dir_offset)
        pos += 8 + ((elen + 7) & ~7)
    return _Header(size, cluster_bits, ext)


def read_directory(path: str) -> list[BitmapEntry]:
    """The persistent bitmaps of a qcow2 image (empty when it has none or they are invalid)."""
    fd = _open(path)
    try:
        return _directory(fd, _read_header(fd, path), path)
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None


def _directory(fd: int, header: _Header, path: str) -> list[BitmapEntry]:
    if header.bitmap_ext is None:
        return []
    count, dir_size, dir_offset = header.bitmap_ext
    if dir_size > MAX_DIRECTORY:
        raise CorruptImageError(f"bitmap directory of {dir_size} bytes is too large", path=path)
    data = _pread(fd, dir_size, dir_offset, path)
    entries = []
    pos = 0
    for _ in range(count):
        if pos + _DIR_ENTRY.size > len(data):
            raise CorruptImageError("bitmap directory is truncated", path=path)
        table_offset, table_size, flags, btype, gbits, name_size, extra = _DIR_ENTRY.unpack_from(
            data, pos
        )
        name_at = pos + _DIR_ENTRY.size + extra
        if name_at + name_size > len(data):
            raise CorruptImageError("bitmap directory entry is truncated", path=path)
        name = data[name_at : name_at + name_size].decode("utf-8", "replace")
        entries.append(BitmapEntry(name, table_offset, table_size, flags, btype, gbits))
        pos = (name_at + name_size + 7) & ~7
    return entries


def read_bitmap(path: str, name: str) -> tuple[BitmapEntry, int, bytearray]:
    """(entry, virtual size, bits): one bit per granularity bytes, LSB first, as stored."""
    fd = _open(path)
    try:
        header = _read_header(fd, path)
        entries = _directory(fd, header, path)
        entry = next((e for e in entries if e.name == name), None)
        if entry is None:
            known = ", ".join(e.name for e in entries) or "none"
            raise VdiskError(f"bitmap {name!r} not found (bitmaps: {known})", path=path)
        if entry.in_use:
            raise CorruptImageError(f"bitmap {name!r} is inconsistent (in use)", path=path)
        if entry.type != BT_DIRTY_TRACKING:
            raise UnsupportedFeatureError(
                f"bitmap {name!r} has unknown type {entry.type}", path=path
            )
        if not 9 <= entry.granularity_bits <= 31:
            raise CorruptImageError(f"bitmap {name!r} has invalid granularity", path=path)
        cluster_size = 1 << header.cluster_bits
        nbits = -(-header.size // entry.granularity)
        nbytes = -(-nbits // 8)
        bits_per_cluster = cluster_size * 8
        needed = -(-nbits // bits_per_cluster)
        if entry.table_size < needed:
            raise CorruptImageError(f"bitmap {name!r} table is too small", path=path)
        table = _pread(fd, 8 * entry.table_size, entry.table_offset, path)
        bits = bytearray(nbytes)
        for i in range(needed):
            (value,) = struct.unpack_from(">Q", table, 8 * i)
            lo = i * cluster_size
            hi = min(lo + cluster_size, nbytes)
            host = value & BME_TABLE_OFFSET_MASK
            if host:
                bits[lo:hi] = _pread(fd, hi - lo, host, path)
            elif value & BME_TABLE_ALL_ONES:
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
