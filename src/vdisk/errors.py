"""The one error hierarchy of vdisk.

Every error names what is wrong with which file or request, and carries an errno where one fits,
so that exports (NBD, ublk) can map it to a wire error and the CLI can print it in one line.
"""

from __future__ import annotations

import errno as _errno


class VdiskError(Exception):
    """Base of every error vdisk raises on purpose."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        if self.path:
            return f"{self.path}: {self.message}"
        return self.message


class FormatError(VdiskError):
    """The file is not a valid image of the expected format (bad magic, bad header field...)."""

    errno = _errno.EINVAL


class CorruptImageError(FormatError):
    """The image's metadata is inconsistent (or carries the corrupt bit)."""

    errno = _errno.EUCLEAN


class UnsupportedFeatureError(VdiskError):
    """The image uses a feature vdisk does not implement or does not know."""

    errno = _errno.ENOTSUP


class ReadOnlyError(VdiskError):
    """A write was attempted on a read-only device."""

    errno = _errno.EROFS


class RequestError(VdiskError):
    """A request is invalid: out of range, misaligned or malformed."""

    errno = _errno.EINVAL


class NoSpaceError(VdiskError):
    """The request would exceed a size limit (of the image format or of the host)."""

    errno = _errno.ENOSPC


class BackingChainError(FormatError):
    """A backing file is missing, loops, or the chain is too deep."""

    errno = _errno.ENOENT


class LockError(VdiskError):
    """Another open of the image holds, or refuses to share, a permission this open needs."""

    errno = _errno.EAGAIN

    def __init__(
        self, message: str, *, path: str | None = None, permission: str | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.permission = permission  # QEMU's name of it: "write", "consistent read"...


class ClosedError(VdiskError):
    """The device was used after close()."""

    errno = _errno.EBADF


def from_oserror(exc: OSError, path: str | None = None) -> VdiskError:
    """Wrap an OSError as a VdiskError keeping its errno and naming the file."""
    code = exc.errno if exc.errno is not None else _errno.EIO
    message = exc.strerror or str(exc)
    return VdiskError(
        message, path=path or (str(exc.filename) if exc.filename else None), errno=code
    )
