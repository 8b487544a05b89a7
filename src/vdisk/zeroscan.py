"""Zero detection without the GIL, and read-only mappings of image files, for convert: the
compiled helper ``zeroscan.c`` through ``vdisk.native`` (switch: ``VDISK_NATIVE_ZEROSCAN``).

Without it convert reads into buffers and finds zeros with ``vdisk.convert.zero_runs``, with
the same outcome.
"""

from __future__ import annotations

import ctypes
import os
import threading

from .errors import VdiskError

_lock = threading.Lock()
_loaded: list[ZeroScan | None] = []


class SourceShrankError(VdiskError):
    """A mapped source file got shorter while the copy read it."""

    errno = 5  # EIO, as a read past the new end would fail


class Mapping:
    """``length`` bytes of a file, mapped read-only through ``view``; ``unmap`` releases the
    view and unmaps them, and no slice of the view may be used after that."""

    __slots__ = ("_lib", "address", "length", "view")

    def __init__(self, lib: ctypes.CDLL, address: int, length: int) -> None:
        self._lib = lib
        self.address = address
        self.length = length
        self.view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")

    def unmap(self) -> None:
        self.view.release()
        self._lib.vdisk_unmap(self.address, self.length)


class ZeroScan:
    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.vdisk_zero_runs.restype = ctypes.c_long
        lib.vdisk_zero_runs.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
            ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        lib.vdisk_map.restype = ctypes.c_void_p
        lib.vdisk_map.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_size_t]
        lib.vdisk_unmap.restype = ctypes.c_int
        lib.vdisk_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.lib = lib

    def map(self, fd: int, offset: int, length: int) -> Mapping | None:
        """[offset, offset+length) of ``fd`` mapped, or None where the file cannot be."""
        address = self.lib.vdisk_map(fd, offset, length)
        return Mapping(self.lib, address, length) if address else None

    def runs(
        self, buf: bytearray | Mapping, dst_offset: int, block: int, length: int
    ) -> list[tuple[int, int, bool]]:
        """``vdisk.convert.zero_runs`` of a buffer or a mapping's first ``length`` bytes."""
        if isinstance(buf, Mapping):
            address, guarded = buf.address, 1
        else:
            address, guarded = ctypes.addressof(ctypes.c_char.from_buffer(buf)), 0
        out = (ctypes.c_uint64 * (length // block + 2))()
        head = min((-dst_offset) % block, length)
        count = self.lib.vdisk_zero_runs(address, length, head, block, out, guarded)
        if count < 0:
            raise SourceShrankError("the source file shrank while it was being copied")
        runs: list[tuple[int, int, bool]] = []
        start = 0
        for word in out[:count]:
            end = word >> 1
            runs.append((start, end, bool(word & 1)))
            start = end
        return runs


def load() -> ZeroScan | None:
    """The helper, built and loaded once per process; None where it is switched off or cannot
    be built."""
    with _lock:
        if not _loaded:
            from . import native

            source = os.path.join(os.path.dirname(__file__), "zeroscan.c")
            lib = native.load(source, "VDISK_NATIVE_ZEROSCAN", "-O2")
            _loaded.append(ZeroScan(lib) if lib is not None else None)
        return _loaded[0]


__all__ = ["Mapping", "SourceShrankError", "ZeroScan", "load"]
