"""Raw image files and host block devices."""

from __future__ import annotations

import errno
import os
import stat

from ..block import BlockDeviceBase, Extent
from ..errors import VdiskError, from_oserror
from ..fileio import pread_full, pwrite_full

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RawDevice", "create_raw", "fallocate", "punch_hole", "write_zeroes_fd"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate cannot punch holes)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range keeping the file size; False if the filesystem cannot."""
    try:
        fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise


def write_zeroes_fd(fd: int, offset: int, length: int, may_unmap: bool) -> None:
    """Zero a range of a file: punch or zero-range where possible, else write zeros."""
    if may_unmap and punch_hole(fd, offset, length):
        return
    try:
        fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = os.pwrite(fd, memoryview(chunk)[: min(length, len(chunk))], offset)
        offset += n
        length -= n


class RawDevice(BlockDeviceBase):
    """A raw file or host block device, one syscall per request."""

    def __init__(
        self, path: str, readonly: bool = False, size: int | None = None, force_share: bool = False
    ) -> None:
        """Open ``path``, locked as QEMU locks a raw image (``force_share``: qemu-img -U)."""
        from .. import locking
        from ..errors import RequestError

        if force_share and not readonly:
            raise RequestError("force-share=on can only be used with read-only images", path=path)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        mode = locking.mode_for("raw", readonly, force_share)
        try:
            self.lock_mode = mode if locking.lock(self.fd, path, mode) else None
        except BaseException:
            os.close(self.fd)
            raise
        st = os.fstat(self.fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        actual = os.lseek(self.fd, 0, os.SEEK_END) if self.is_blockdev else st.st_size
        super().__init__(actual if size is None else size, readonly, path)
        self.path = path

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf)
        self.check_request(offset, view.nbytes)
        pread_full(self.fd, view, offset)
        return view.nbytes

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        view = memoryview(buf)
        self.check_request(offset, view.nbytes, write=True)
        pwrite_full(self.fd, view, offset)
        if fua:
            os.fdatasync(self.fd)
        return view.nbytes

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if self.is_blockdev:
            pwrite_full(self.fd, bytes(length), offset)
        else:
            write_zeroes_fd(self.fd, offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        if not self.is_blockdev:
            punch_hole(self.fd, offset, length)

    def flush(self) -> None:
        if not self._readonly:
            os.fsync(self.fd)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        end = offset + length
        if self.is_blockdev:
            return [Extent(offset, length, data=True, zero=False, host_offset=offset)]
        extents: list[Extent] = []
        pos = offset
        file_size = os.fstat(self.fd).st_size
        while pos < end:
            if pos >= file_size:
                extents.append(Extent(pos, end - pos, data=False, zero=True))
                break
            try:
                data_start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data_start = end
            if data_start > pos:
                hole_end = min(data_start, end)
                extents.append(Extent(pos, hole_end - pos, data=False, zero=True))
                pos = hole_end
                continue
            data_end = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            extents.append(Extent(pos, data_end - pos, data=True, zero=False, host_offset=pos))
            pos = data_end
        return extents

    def close(self) -> None:
        if not self._closed:
            super().close()
            os.close(self.fd)

    def file_descriptor(self) -> int | None:
        """``block.FileBacked``: the file itself, unless closed, or unless this is a subclass
        (which may give the bytes another meaning)."""
        return self.fd if type(self) is RawDevice and not self._closed else None

    def file_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """``block.FileRanges``: a raw file's bytes are at their own offsets. Not offered under
        force-share (-U), where QEMU's users may shrink the file at will."""
        if self.file_descriptor() is None or offset < 0 or offset + length > self.size:
            return None
        if self.lock_mode is None or self.lock_mode.force_share:
            return None
        return self.fd, offset

    def resize(self, new_size: int) -> None:
        if self.is_blockdev:
            raise VdiskError("cannot resize a block device", path=self.path)
        os.ftruncate(self.fd, new_size)
        self._size = new_size


def create_raw(path: str, size: int, preallocation: str = "off") -> None:
    """Create (or truncate) a raw image of ``size`` bytes."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        os.ftruncate(fd, size)
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full" and size:
            chunk = bytes(1 << 20)
            for pos in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), size - pos)], pos)
        elif preallocation not in ("off", "metadata"):
            raise VdiskError(f"invalid preallocation mode {preallocation!r}", path=path)
        # No fsync, as qemu-img's raw create has none: whoever needs the file durable syncs
        # it with its data (convert with -t writeback/none/directsync/writethrough does).
    finally:
        os.close(fd)
