"""The one seam: the BlockDevice protocol every image and backend implements.

Exports (convert, NBD, ublk) consume only this protocol; they never learn which format they
serve. ``BlockDeviceBase`` gives implementations the shared bookkeeping: range checks, read-only
and closed state, context management and a default ``pread``.

Also here, because every consumer of a device needs it the same way: ``SectorPadded`` (a raw
file sized as QEMU sizes it, in whole 512-byte sectors).
"""

from __future__ import annotations

from _thread import allocate_lock  # threading.Lock, without threading's imports

from .errors import ClosedError, ReadOnlyError, RequestError
from .record import record
from .sizes import round_up_to_sector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Protocol, Self, runtime_checkable

    from typing_extensions import Buffer
else:
    from .record import Protocol, runtime_checkable  # typing costs `vdisk convert` a start


@record(frozen=True)
class Extent:
    """One run of a device with uniform status, as ``qemu-img map`` reports it.

    ``present``: allocated somewhere in the chain (False: a hole that reads as zeros).
    ``data``: reading returns stored data (False: reads as zeros without touching data).
    ``zero``: known to read as zeros.
    ``depth``: 0 for this image, 1 for its backing file, ...; for a hole, the chain length.
    ``host_offset``: where the data lives in the file at that depth, where that is meaningful.
    """

    offset: int
    length: int
    data: bool
    zero: bool
    present: bool = True
    depth: int = 0
    host_offset: int | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def same_status(self, other: Extent) -> bool:
        """True when two adjacent extents can merge (ignoring host offsets)."""
        return (
            self.data == other.data
            and self.zero == other.zero
            and self.present == other.present
            and self.depth == other.depth
            and self.compressed == other.compressed
        )


@runtime_checkable
class BlockDevice(Protocol):
    """A byte-addressed block device. All offsets and lengths are in bytes.

    Implementations are thread-safe: any number of threads may call any method at once.
    """

    @property
    def size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def readinto(self, buf: Buffer, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns len(buf). Reads past the end are an error."""
        ...

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        """Write ``buf`` at ``offset``; with ``fua`` it is durable on return. Returns len(buf)."""
        ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeros; ``may_unmap`` allows deallocating it."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; afterwards it may read as zeros or as old data."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable."""
        ...

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering [offset, offset+length), adjacent ones of equal status merged."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class BlockDeviceBase:
    """Shared state and checks for BlockDevice implementations."""

    #: Smallest unit the device tracks allocation in (used for block-status granularity).
    granularity: int = 512

    def __init__(self, size: int, readonly: bool, name: str) -> None:
        self._size = size
        self._readonly = readonly
        self._closed = False
        self.name = name

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._closed

    def check_request(self, offset: int, length: int, write: bool = False) -> None:
        """Raise unless [offset, offset+length) lies in the device (and it is writable)."""
        if self._closed:
            raise ClosedError("device is closed", path=self.name)
        if write and self._readonly:
            raise ReadOnlyError("device is read-only", path=self.name)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise RequestError(
                f"request [{offset}, {offset + length}) is outside the device (size {self._size})",
                path=self.name,
            )

    def pread(self, length: int, offset: int) -> bytes:
        """Read ``length`` bytes at ``offset`` into a new bytes object."""
        buf = bytearray(length)
        self.readinto(buf, offset)  # type: ignore[attr-defined]
        return bytes(buf)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} size={self._size}>"


def merge_extents(extents: Iterator[Extent] | list[Extent]) -> list[Extent]:
    """Merge adjacent extents of equal status; host offsets merge only when contiguous."""
    merged: list[Extent] = []
    for ext in extents:
        if ext.length == 0:
            continue
        if merged:
            last = merged[-1]
            contiguous_host = (last.host_offset is None and ext.host_offset is None) or (
                last.host_offset is not None
                and ext.host_offset is not None
                and last.host_offset + last.length == ext.host_offset
            )
            if last.end == ext.offset and last.same_status(ext) and contiguous_host:
                merged[-1] = Extent(
                    last.offset,
                    last.length + ext.length,
                    last.data,
                    last.zero,
                    last.present,
                    last.depth,
                    last.host_offset,
                    last.compressed,
                )
                continue
        merged.append(ext)
    return merged


def is_zero(buf: Buffer) -> bool:
    """True if every byte of ``buf`` is zero (for detect-zeroes and convert)."""
    view = memoryview(buf).cast("B")
    if not view:
        return True
    if view[0] or view[-1]:
        return False
    import numpy as np  # here, not at the top: the CLI's import path stays free of numpy

    return not np.frombuffer(view, dtype=np.uint8).any()


class SectorPadded:
    """A raw file as QEMU sees it: rounded up to whole sectors, the tail reading as zeros.

    Only what readers need (``size``, ``readinto``, ``block_status``); the wrapped device stays
    the caller's to close."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.size = round_up_to_sector(dev.size)

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf).cast("B")
        real = max(0, min(len(view), self.dev.size - offset))
        if real:
            self.dev.readinto(view[:real], offset)
        view[real:] = bytes(len(view) - real)
        return len(view)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        real = max(0, min(length, self.dev.size - offset))
        out = self.dev.block_status(offset, real) if real else []
        if real < length:
            tail = offset + real
            out.append(Extent(tail, length - real, data=False, zero=True, host_offset=tail))
        return out


class DirtyBitmap:
    """A dirty bitmap as an export sees it: dirty runs in a range, and marking on writes.

    Formats build it (qcow2 persistent bitmaps); exports such as NBD's qemu:dirty-bitmap
    context consume it. ``bits`` holds one bit per ``granularity`` bytes, LSB first as qcow2
    stores it.
    """

    def __init__(
        self, name: str, size: int, granularity: int, bits: bytearray, enabled: bool = False
    ) -> None:
        self.name = name
        self.size = size
        self.granularity = granularity
        self.bits = bits
        self.enabled = enabled
        self._lock = allocate_lock()

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, dirty) runs covering [offset, offset+length) within the bitmap's size."""
        g = self.granularity
        end = min(offset + length, self.size)
        if end <= offset:
            return [(length, False)]
        import numpy as np  # only exports of bitmaps need it

        first, last = offset // g, (end - 1) // g
        with self._lock:
            raw = np.frombuffer(bytes(self.bits[first >> 3 : (last >> 3) + 1]), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[first & 7 : (first & 7) + last - first + 1]
        if not len(bits):
            return [(length, False)]
        changes = (np.flatnonzero(np.diff(bits.astype(np.int8))) + 1).tolist()
        out: list[tuple[int, bool]] = []
        for s, e in zip([0, *changes], [*changes, len(bits)], strict=True):
            lo = max(offset, (first + s) * g)
            hi = min(end, (first + e) * g)
            out.append((hi - lo, bool(bits[s])))
        return out

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a write to [offset, offset+length) (only while the bitmap is enabled)."""
        if not self.enabled or length <= 0:
            return
        g = self.granularity
        first, last = offset // g, (offset + length - 1) // g
        with self._lock:
            for index in range(first, last + 1):
                self.bits[index >> 3] |= 1 << (index & 7)


@runtime_checkable
class FileBacked(Protocol):
    """A device whose bytes are one host file's, at the same offsets: an export may run its
    reads, writes and flushes on that file directly (ublk hands it to io_uring), and still
    calls the device for everything else and for the rare odd case (a short read).

    The file is open read-write unless the device is read-only, and stays open until the
    device is closed."""

    def file_descriptor(self) -> int | None:
        """The open file, or None when this device must be served through its own methods."""
        ...


@runtime_checkable
class FileRanges(Protocol):
    """A device that can say where a range of its bytes is stored as it is, in one run of a
    host file, so that a copy may map that file instead of reading it (``vdisk convert``)."""

    def file_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) of guest bytes [offset, offset+length), or None when they are not
        stored so, or when the file may shrink under a mapping (another user may resize it)."""
        ...
