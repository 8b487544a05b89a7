"""qcow2 persistent dirty bitmaps: read them, change them, keep them up to date on write.

* ``read_directory`` / ``read_bitmap`` / ``load_bitmap`` read a closed (or shared) image by
  path, for exports that only look at a bitmap.
* ``PersistentBitmap`` is one bitmap of an open image: name, granularity, flags and its bits
  (``dirty_ranges()`` for incremental backup).
* ``BitmapSet`` holds the bitmaps of an open ``Qcow2Image``; the image calls it at its first
  write, on every write/zero/discard (``mark``) and at close (``store``). As in QEMU, a flush
  leaves the tracked bitmaps IN_USE (storing them at every flush would cost several syncs and
  a rewrite of their bits per guest flush); ``Qcow2Image.store_bitmaps()`` stores them now.

Crash safety, as QEMU does it: at the first write every enabled bitmap is marked IN_USE in
the stored directory (autoclear bit cleared, directory rewritten in place, bit set again), so
a crash leaves it inconsistent, never stale. Storing writes new data clusters, new tables and
a new directory, syncs them with their refcounts, and only then switches the header's bitmaps
extension with one write; the old structures are freed afterwards, so a crash can only leak.
The structures are encoded by ``format.py``.
"""

from __future__ import annotations

import os

from ..block import DirtyBitmap
from ..errors import (
    CorruptImageError,
    FormatError,
    UnsupportedFeatureError,
    VdiskError,
    from_oserror,
)
from ..fileio import pread_full, pwrite_full
from . import format as fmt

TYPE_CHECKING = False  # typing itself costs `vdisk convert` about a bare start
if TYPE_CHECKING:
    from collections.abc import Callable

    from .image import Qcow2Image

BitmapEntry = fmt.BitmapDirectoryEntry
MAX_GRANULARITY_BITS = 31  # as QEMU's BME_MAX_GRANULARITY_BITS
MIN_GRANULARITY_BITS = 9
MAX_BITMAPS = 65535
MAX_NAME_BYTES = 1023
MAX_BITS_BYTES = 0x20000000  # QEMU's BME_MAX_PHYS_SIZE: memory bound per bitmap
# Bound on the bits a read-write open holds for tracking; past it a bitmap is not loaded and
# so cannot be kept consistent: it is stored IN_USE at the first write, as the spec asks.
MAX_TRACKED_BYTES = 1 << 30
MAX_DIRECTORY_BYTES = 64 << 20


class BitmapError(VdiskError):
    """A bitmap operation is refused (unknown name, duplicate, bad granularity...)."""


def _inconsistent(name: str) -> str:
    """QEMU's words (two lines, as qemu-img prints them)."""
    return (
        f"Bitmap '{name}' is inconsistent and cannot be used\n"
        "Try block-dirty-bitmap-remove to delete this bitmap from disk"
    )


def default_granularity(cluster_size: int) -> int:
    """QEMU's default: the cluster size, but at least 4 KiB and at most 64 KiB."""
    return min(max(cluster_size, 4096), 65536)


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


def _check_usable(entry: BitmapEntry, path: str) -> None:
    if entry.in_use:
        raise CorruptImageError(f"bitmap {entry.name!r} is inconsistent (in use)", path=path)
    _check_shape(entry, path)


def _check_shape(entry: BitmapEntry, path: str) -> None:
    if entry.type != fmt.BITMAP_TYPE_DIRTY_TRACKING:
        raise UnsupportedFeatureError(
            f"bitmap {entry.name!r} has unknown type {entry.type}", path=path
        )
    if not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS:
        raise CorruptImageError(f"bitmap {entry.name!r} has invalid granularity", path=path)


def _find_usable(entries: list[BitmapEntry], name: str, path: str) -> BitmapEntry:
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        known = ", ".join(e.name for e in entries) or "none"
        raise VdiskError(f"bitmap {name!r} not found (bitmaps: {known})", path=path)
    _check_usable(entry, path)
    return entry


def _bits_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of bits a disk of ``size`` bytes needs at this granularity."""
    nbits = -(-size >> granularity_bits)  # ceiling division
    return -(-nbits // 8)


def _extension(h: fmt.Header) -> fmt.BitmapsExtension | None:
    """The bitmaps extension when autoclear bit 0 vouches for it (else QEMU ignores it)."""
    if not h.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        return None
    try:
        return h.bitmaps
    except VdiskError:
        return None


def _read_bits(fd: int, header: fmt.Header, entry: BitmapEntry, path: str) -> bytearray:
    """The stored bits of ``entry`` for the image's current size (one bit per granule, LSB
    first); memory is bounded by QEMU's limit on a bitmap's size."""
    _check_shape(entry, path)
    cluster_size = header.cluster_size
    nbits = -(-header.size >> entry.granularity_bits)
    nbytes = -(-nbits // 8)
    if nbytes > MAX_BITS_BYTES:
        raise UnsupportedFeatureError(f"bitmap {entry.name!r} is too large", path=path)
    needed = -(-nbytes // cluster_size)
    if entry.bitmap_table_size < needed:
        raise CorruptImageError(f"bitmap {entry.name!r} table is too small", path=path)
    if entry.bitmap_table_offset % cluster_size:
        raise CorruptImageError(f"bitmap {entry.name!r} table is misaligned", path=path)
    table = _pread(fd, 8 * needed, entry.bitmap_table_offset, path)
    bits = bytearray(nbytes)
    for i, (host, all_ones) in enumerate(fmt.decode_bitmap_table(table, needed)):
        lo = i * cluster_size
        hi = min(lo + cluster_size, nbytes)
        if host:
            if host % cluster_size:
                raise CorruptImageError(
                    f"bitmap {entry.name!r}: data cluster {host:#x} is misaligned", path=path
                )
            bits[lo:hi] = _pread(fd, hi - lo, host, path)
        elif all_ones:
            bits[lo:hi] = b"\xff" * (hi - lo)
    # Bits past the end of the disk are not part of the bitmap.
    if nbits % 8:
        bits[-1] &= (1 << (nbits % 8)) - 1
    return bits


def read_bitmap(path: str, name: str) -> tuple[BitmapEntry, int, bytearray]:
    """(entry, virtual size, bits): one bit per granularity bytes, LSB first, as stored."""
    fd = _open(path)
    try:
        header = _read_header(fd, path)
        entry = _find_usable(_directory(fd, header, path), name, path)
        return entry, header.size, _read_bits(fd, header, entry, path)
    finally:
        os.close(fd)


def load_bitmap(path: str, name: str) -> DirtyBitmap:
    """The named bitmap as the dirty-bitmap view exports consume."""
    entry, size, bits = read_bitmap(path, name)
    return DirtyBitmap(name, size, entry.granularity, bits, enabled=entry.enabled)


def _set_bit_range(bits: bytearray, first: int, last: int) -> None:
    """Set bits first..last (inclusive), whole bytes at a time in the middle."""
    lo_byte, hi_byte = first >> 3, last >> 3
    if lo_byte == hi_byte:
        bits[lo_byte] |= ((0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))) & 0xFF
        return
    bits[lo_byte] |= (0xFF << (first & 7)) & 0xFF
    if hi_byte > lo_byte + 1:
        bits[lo_byte + 1 : hi_byte] = b"\xff" * (hi_byte - lo_byte - 1)
    bits[hi_byte] |= 0xFF >> (7 - (last & 7))


class PersistentBitmap(DirtyBitmap):
    """One bitmap of an open image's directory, with its bits once they are read."""

    def __init__(self, entry: BitmapEntry, size: int, bits: bytearray | None) -> None:
        super().__init__(entry.name, size, entry.granularity, bits or bytearray(), entry.enabled)
        self.entry = entry
        self.gbits = entry.granularity_bits  # a plain attribute for the write hook
        self.loaded = bits is not None
        self.reader: Callable[[PersistentBitmap], bytearray] | None = None  # reads the bits
        self.changed = False  # the bits in memory differ from the stored ones
        # Stored IN_USE, or could not be read while enabled: never used, never cleared.
        self.inconsistent = entry.in_use

    @property
    def granularity_bits(self) -> int:
        return self.entry.granularity_bits

    @property
    def in_use(self) -> bool:
        return self.inconsistent

    @property
    def flags(self) -> list[str]:
        """As ``qemu-img info`` lists them."""
        out = ["in-use"] if self.inconsistent else []
        if self.entry.enabled:
            out.append("auto")
        return out

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a write to [offset, offset+length) (only while the bitmap is enabled)."""
        if not self.enabled or length <= 0:
            return
        gb = self.entry.granularity_bits
        end = min(offset + length, self.size)
        if end <= offset:
            return
        with self._lock:
            _set_bit_range(self.bits, offset >> gb, (end - 1) >> gb)
            self.changed = True

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        self.ensure_loaded()
        return super().dirty_extents(offset, length)

    def ensure_loaded(self) -> None:
        if not self.loaded and self.reader is not None:
            bits = self.reader(self)
            with self._lock:
                if not self.loaded:
                    self.bits, self.loaded = bits, True

    def dirty_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """(guest offset, length) of every dirty run within the range (default: the disk)."""
        if length is None:
            length = self.size - offset
        return [
            (pos, n)
            for pos, (n, dirty) in _positions(offset, self.dirty_extents(offset, length))
            if dirty
        ]

    def dirty_bytes(self) -> int:
        return sum(n for _pos, n in self.dirty_ranges())


def _positions(offset: int, runs: list[tuple[int, bool]]) -> list[tuple[int, tuple[int, bool]]]:
    out = []
    for run in runs:
        out.append((offset, run))
        offset += run[0]
    return out


class BitmapSet:
    """The persistent bitmaps of an open image. Every method but ``mark`` expects the image's
    metadata lock held; a read-only image reads its directory on first use."""

    def __init__(self, image: Qcow2Image, readonly: bool) -> None:
        self.image = image
        self.items: list[PersistentBitmap] = []
        # Bitmaps that follow writes; the image checks this list on its write paths.
        self.tracked: list[PersistentBitmap] = []
        self.usable = True  # False: the directory cannot be read, QEMU's rule drops it
        self._read = False
        self._marked = False  # the tracked bitmaps are stored IN_USE
        self._changed = False  # the directory differs from the stored one
        if not readonly:
            self._load(track=True)

    # -- loading ------------------------------------------------------------------------
    def _load(self, track: bool) -> None:
        self._read = True
        img = self.image
        try:
            entries = _directory(img.fd, img.header, img.path)
        except (VdiskError, OSError):
            self.usable = False
            return
        budget = MAX_TRACKED_BYTES
        for entry in entries:
            bm = PersistentBitmap(entry, img.header.size, None)
            bm.reader = self._read_stored
            self.items.append(bm)
            if track and entry.enabled and not entry.in_use:
                try:
                    budget -= _bits_bytes(img.header.size, entry.granularity_bits)
                    if budget < 0:
                        raise BitmapError(f"bitmap {entry.name!r}: too many bits to track")
                    self._fill(bm)
                except (VdiskError, OSError):
                    bm.inconsistent = True  # marked IN_USE at the first write, kept so
                    continue
                self.tracked.append(bm)

    def _fill(self, bm: PersistentBitmap) -> None:
        bm.ensure_loaded()

    def _read_stored(self, bm: PersistentBitmap) -> bytearray:
        img = self.image
        if bm.inconsistent:
            raise BitmapError(_inconsistent(bm.name), path=img.path)
        return _read_bits(img.fd, img.header, bm.entry, img.path)

    def all(self) -> list[PersistentBitmap]:
        if not self._read:
            self._load(track=False)
        return list(self.items)

    def find(self, name: str, usable: bool = True) -> PersistentBitmap:
        """The named bitmap with its bits read; ``usable``: refuse an inconsistent one."""
        bm = next((b for b in self.all() if b.name == name), None)
        if bm is None:
            raise BitmapError(f"Dirty bitmap '{name}' not found", path=self.image.path)
        if usable and bm.inconsistent:
            raise BitmapError(_inconsistent(name), path=self.image.path)
        if usable:
            self._fill(bm)
        return bm

    def kept_autoclear(self) -> int:
        """The autoclear bits a write may leave set: ours, while the bitmaps are readable."""
        if self.usable and _extension(self.image.header) is not None:
            return fmt.AUTOCLEAR_BITMAPS
        return 0

    # -- write path -----------------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        """A write, zero write or discard of [offset, offset+length): set the tracked bits.
        The common case, one granule already dirty, is a lock-free read (bits only go from
        0 to 1 while tracking)."""
        if length <= 0:
            return
        last = offset + length - 1
        for bm in self.tracked:
            gb = bm.gbits
            index = offset >> gb
            if index == last >> gb and bm.bits[index >> 3] >> (index & 7) & 1:
                continue
            bm.mark_dirty(offset, length)

    def begin_write(self) -> None:
        """Before the first change: store every enabled bitmap as IN_USE (in place), so a
        crash leaves them inconsistent rather than stale."""
        targets = [b for b in self.items if b.entry.enabled]
        if self._marked or not targets or not self.kept_autoclear():
            return
        for bm in targets:
            if bm not in self.tracked:
                bm.inconsistent = True
        self._marked = True
        if not self._rewrite_in_place(set(map(id, targets))):
            self._changed = True  # a directory of another size: store a new one instead
            self.store(final=False)

    def _rewrite_in_place(self, in_use: set[int]) -> bool:
        """Rewrite the stored directory with IN_USE on ``in_use`` (ids): autoclear bit off
        while the directory is being written, as QEMU, so a torn write only drops bitmaps.
        False when the new directory would not have the stored one's size."""
        img = self.image
        h = img.header
        ext = _extension(h)
        assert ext is not None
        entries = [_stored_entry(b, id(b) in in_use) for b in self.items]
        data = fmt.encode_bitmap_directory(entries)
        if len(data) != ext.directory_size:
            return False
        img._write_features(autoclear=h.autoclear_features & ~fmt.AUTOCLEAR_BITMAPS)
        pwrite_full(img.fd, data, ext.directory_offset)
        os.fdatasync(img.fd)
        img._write_features(autoclear=h.autoclear_features | fmt.AUTOCLEAR_BITMAPS)
        return True

    # -- changes --------------------------------------------------------------------------
    def add(self, name: str, granularity: int | None, enabled: bool) -> PersistentBitmap:
        img = self.image
        h = img.header
        # QEMU's words; it names the node where we name the file.
        unstorable = f"Can't make bitmap '{name}' persistent in '{img.path}'"
        if h.version < 3:
            raise BitmapError(f"{unstorable}: Cannot store dirty bitmaps in qcow2 v2 files")
        if any(b.name == name for b in self.all()):
            raise BitmapError(f"Bitmap already exists: {name}", path=img.path)
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BitmapError(
                f"{unstorable}: Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
            )
        if len(self.items) >= MAX_BITMAPS:
            raise BitmapError("Too many bitmaps in the image", path=img.path)
        g = default_granularity(img.cluster_size) if granularity is None else granularity
        gbits = g.bit_length() - 1
        if g & (g - 1) or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise BitmapError("Granularity must be power of 2 and at least 512", path=img.path)
        if _bits_bytes(h.size, gbits) > MAX_BITS_BYTES:
            raise BitmapError(f"bitmap {name!r} would be too large", path=img.path)
        flags = fmt.BME_FLAG_AUTO if enabled else 0
        entry = BitmapEntry(0, 0, flags, fmt.BITMAP_TYPE_DIRTY_TRACKING, gbits, name, b"")
        bm = PersistentBitmap(entry, h.size, bytearray(_bits_bytes(h.size, gbits)))
        bm.changed = True
        self.items.append(bm)
        if enabled:
            self.tracked.append(bm)
        self._changed = True
        return bm

    def remove(self, name: str, frees: list[int]) -> None:
        bm = self.find(name, usable=False)
        self.items.remove(bm)
        if bm in self.tracked:
            self.tracked.remove(bm)
        frees.extend(self._clusters_of(bm.entry))
        self._changed = True

    def set_enabled(self, name: str, enabled: bool) -> None:
        bm = self.find(name)
        if enabled:
            bm.entry.flags |= fmt.BME_FLAG_AUTO
            if bm not in self.tracked:
                self.tracked.append(bm)
        else:
            bm.entry.flags &= ~fmt.BME_FLAG_AUTO
            if bm in self.tracked:
                self.tracked.remove(bm)
        bm.enabled = enabled
        self._changed = True

    def clear(self, name: str) -> None:
        bm = self.find(name)
        with bm._lock:
            bm.bits[:] = bytes(len(bm.bits))
            bm.changed = True

    def merge(self, name: str, source: PersistentBitmap) -> None:
        """OR ``source``'s dirty ranges (any granularity, same disk size) into ``name``."""
        import numpy as np

        bm = self.find(name)
        if source is bm:
            return
        if source.size != bm.size:
            raise BitmapError(
                f"Bitmaps are of different sizes (destination size is {bm.size}, "
                f"source size is {source.size}) and can't be merged",
                path=self.image.path,
            )
        if source.granularity == bm.granularity:
            with bm._lock, source._lock:
                merged = np.bitwise_or(
                    np.frombuffer(bm.bits, dtype=np.uint8),
                    np.frombuffer(bytes(source.bits), dtype=np.uint8),
                )
                bm.bits[:] = merged.tobytes()
                bm.changed = True
            return
        was = bm.enabled
        bm.enabled = True  # mark_dirty marks only enabled bitmaps
        try:
            for pos, n in source.dirty_ranges():
                bm.mark_dirty(pos, n)
        finally:
            bm.enabled = was
        bm.changed = True

    def resize_check(self) -> None:
        """Before a resize: every bitmap must be readable and consistent (QEMU's rule), and
        all are stored IN_USE while the size changes."""
        for bm in self.all():
            self.find(bm.name)
        in_use = {id(b) for b in self.items}
        if self.items and self.kept_autoclear() and not self._rewrite_in_place(in_use):
            raise BitmapError("bitmap directory has an unexpected size", path=self.image.path)

    def resized(self, new_size: int) -> None:
        """After the header took ``new_size``: every bitmap to that size, stored again."""
        for bm in self.items:
            nbytes = _bits_bytes(new_size, bm.granularity_bits)
            with bm._lock:
                if nbytes < len(bm.bits):
                    del bm.bits[nbytes:]
                else:
                    bm.bits.extend(bytes(nbytes - len(bm.bits)))
                nbits = -(-new_size >> bm.granularity_bits)
                if nbits % 8 and bm.bits:
                    bm.bits[-1] &= (1 << (nbits % 8)) - 1
                bm.size = new_size
                bm.changed = True
        if self.items:
            self.store(final=False)

    # -- storing --------------------------------------------------------------------------
    def needs_store(self) -> bool:
        return self._changed or self._marked or any(b.changed for b in self.items)

    def store(self, final: bool) -> None:
        """Write changed bitmaps and a new directory, then switch the header to them.
        ``final`` (close): tracked bitmaps are stored consistent, IN_USE cleared."""
        if not self.needs_store():
            return
        img = self.image
        img._flush_locked()  # the data the bits describe is durable first
        frees: list[int] = []
        for bm in self.items:
            if bm.changed and bm.loaded and not bm.inconsistent:
                self._write_bits(bm, frees)
        # While the image is open for writing, a tracked bitmap on disk is IN_USE: writes
        # may change it at any moment (even one added after the first write).
        still_marked = not final
        tracked = set(map(id, self.tracked))
        entries = [
            _stored_entry(b, b.inconsistent or (still_marked and id(b) in tracked))
            for b in self.items
        ]
        old_ext = _extension(img.header) if self.usable else None
        new_ext = self._write_directory(entries) if entries else None
        img.refcounts.write_back()
        os.fdatasync(img.fd)
        self._switch_header(new_ext)
        if old_ext is not None:
            frees.extend(_cluster_range(old_ext.directory_offset, old_ext.directory_size, img))
        img._free_later(frees)
        self._changed = False
        self._marked = still_marked
        for bm in self.items:
            bm.changed = False

    def _write_bits(self, bm: PersistentBitmap, frees: list[int]) -> None:
        """New data clusters and table for ``bm``; the old ones go to ``frees``."""
        img = self.image
        cs = img.cluster_size
        cb = img.cluster_bits
        with bm._lock:
            bits = bytes(bm.bits)
        chunks = [bits[i : i + cs] for i in range(0, len(bits), cs)]
        busy = [i for i, c in enumerate(chunks) if c.count(0) != len(c)]
        hosts = img.refcounts.allocate(len(busy)) if busy else []
        table = [0] * len(chunks)
        for i, cluster in zip(busy, hosts, strict=True):
            img.metadata.add(cluster)
            table[i] = cluster << cb
            pwrite_full(img.fd, chunks[i] + bytes(cs - len(chunks[i])), cluster << cb)
        table_offset = 0
        if table:
            table_offset = self._write_blob(fmt.encode_bitmap_table(table))
        frees.extend(self._clusters_of(bm.entry))
        bm.entry.bitmap_table_offset = table_offset
        bm.entry.bitmap_table_size = len(table)

    def _write_blob(self, data: bytes) -> int:
        """``data`` in new contiguous clusters (padded); returns its host offset."""
        img = self.image
        cs = img.cluster_size
        count = -(-len(data) // cs)
        start = img.refcounts.allocate_contiguous(count)
        img.metadata.update(range(start, start + count))
        pwrite_full(img.fd, data + bytes(count * cs - len(data)), start << img.cluster_bits)
        return start << img.cluster_bits

    def _write_directory(self, entries: list[BitmapEntry]) -> fmt.BitmapsExtension:
        data = fmt.encode_bitmap_directory(entries)
        if len(data) > MAX_DIRECTORY_BYTES:
            raise BitmapError("bitmap directory would be too large", path=self.image.path)
        return fmt.BitmapsExtension(len(entries), len(data), self._write_blob(data))

    def _switch_header(self, ext: fmt.BitmapsExtension | None) -> None:
        """Point the header at the new directory (or drop the extension). The header may
        span two sectors and a torn write could mix old and new bytes, so, as for the
        in-place rewrite: autoclear bit 0 off (synced), the new header (synced), bit on."""
        img = self.image
        h = img.header
        new = h.copy()
        new.set_extension(fmt.EXT_BITMAPS, ext.encode() if ext else None)
        new.autoclear_features &= ~fmt.AUTOCLEAR_BITMAPS
        try:
            blob = new.encode()
        except FormatError:
            raise BitmapError("No space left in the file header", path=img.path) from None
        if h.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
            img._write_features(autoclear=h.autoclear_features & ~fmt.AUTOCLEAR_BITMAPS)
        pwrite_full(img.fd, blob + bytes(img.cluster_size - len(blob)), 0)
        os.fdatasync(img.fd)
        h.extensions = new.extensions
        h.backing_file_offset = new.backing_file_offset
        h.backing_file_size = new.backing_file_size
        if ext:
            img._write_features(autoclear=h.autoclear_features | fmt.AUTOCLEAR_BITMAPS)

    def _clusters_of(self, entry: BitmapEntry) -> list[int]:
        """Host clusters of a stored bitmap's table and data (for freeing)."""
        img = self.image
        if not entry.bitmap_table_offset or not entry.bitmap_table_size:
            return []
        out = _cluster_range(entry.bitmap_table_offset, entry.bitmap_table_size * 8, img)
        try:
            raw = bytearray(entry.bitmap_table_size * 8)
            pread_full(img.fd, raw, entry.bitmap_table_offset)
        except (OSError, VdiskError):
            return out  # an unreadable table: its data clusters leak
        for host, _ones in fmt.decode_bitmap_table(raw, entry.bitmap_table_size):
            if host:
                out.append(host >> img.cluster_bits)
        return out


def _cluster_range(offset: int, length: int, img: Qcow2Image) -> list[int]:
    first = offset >> img.cluster_bits
    return list(range(first, first + -(-length // img.cluster_size)))


def _stored_entry(bm: PersistentBitmap, in_use: bool) -> BitmapEntry:
    e = bm.entry
    flags = (e.flags & ~fmt.BME_FLAG_IN_USE) | (fmt.BME_FLAG_IN_USE if in_use else 0)
    return BitmapEntry(
        e.bitmap_table_offset,
        e.bitmap_table_size,
        flags,
        e.type,
        e.granularity_bits,
        e.name,
        e.extra_data,
    )


# -- convert --bitmaps ----------------------------------------------------------------------
def check_copy_args(sources: int, out_fmt: str, skip_without_bitmaps: bool) -> None:
    """qemu-img convert's checks of --bitmaps / --skip-broken-bitmaps, before any open."""
    if skip_without_bitmaps:
        raise BitmapError("Use of --skip-broken-bitmaps requires --bitmaps")
    if sources != 1:
        raise BitmapError("Copying bitmaps only possible with single source")
    if out_fmt != "qcow2":
        raise BitmapError(f"Format driver '{out_fmt}' does not support bitmaps")


def copyable_bitmaps(
    source: object, skip_broken: bool, warn: Callable[..., object]
) -> list[PersistentBitmap]:
    """The source's bitmaps to copy, bits read; an inconsistent one is refused (or skipped
    with a warning under --skip-broken-bitmaps), before anything is copied."""
    from .image import Qcow2Image

    if not isinstance(source, Qcow2Image):
        raise BitmapError("Source lacks bitmap support")
    out = []
    for bm in source.bitmaps():
        if bm.in_use:
            if not skip_broken:
                raise BitmapError(
                    f"Cannot copy inconsistent bitmap '{bm.name}'\n"
                    "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"
                )
            warn(f"vdisk: warning: Skipping inconsistent bitmap '{bm.name}'", err=True)
            continue
        out.append(source.bitmap(bm.name))
    return out


def check_copy_target(target: object) -> None:
    from .image import Qcow2Image

    if not isinstance(target, Qcow2Image) or target.header.version < 3:
        raise BitmapError("Format driver 'qcow2' does not support bitmaps")


def copy_bitmaps(bitmaps: list[PersistentBitmap], target: object) -> None:
    """Each bitmap into ``target`` (after the data copy, so the copy marks nothing): same
    name, granularity and enabled flag, then its bits merged in."""
    from .image import Qcow2Image

    assert isinstance(target, Qcow2Image)  # check_copy_target said so
    for bm in bitmaps:
        target.add_bitmap(bm.name, bm.granularity, enabled=True)
        target.merge_bitmap(bm.name, "", source_bitmap=bm)
        if not bm.entry.enabled:
            target.enable_bitmap(bm.name, False)
