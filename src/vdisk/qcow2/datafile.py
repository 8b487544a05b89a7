"""External data files (incompatible bit 2; autoclear bit 1, data_file_raw).

An image with an external data file keeps its metadata in the qcow2 file and its guest data
in a second file, at host offset == guest offset. L2 entries still say which clusters are
allocated: an entry with the COPIED flag is allocated even at host offset 0, and data clusters
have no refcounts (the refcount structures describe the qcow2 file only). With data_file_raw
the data file is always a valid raw image of the guest.

What lives here: where the data file is (the header extension's name as QEMU 7.2 opens it,
relative to the working directory, else beside the image; or an explicit override), opening and locking it as QEMU does,
QEMU's words for what such images refuse, and what ``amend -o data_file/data_file_raw`` may
change in the header (QEMU 7.2's rules: a new name only where the data-file bit is already set,
data_file_raw only switched off).
"""

from __future__ import annotations

import errno
import os

from .. import locking
from ..errors import RequestError, UnsupportedFeatureError, from_oserror
from ..filenames import resolve_backing
from . import format as fmt

# QEMU's locks on a data file (qemu-io 7.2, measured): a writer holds consistent read, write and
# resize and shares everything but resize; a reader holds consistent read, shares all but resize.
_ALL_BUT_RESIZE = locking.ALL & ~locking.Permission.RESIZE
DATA_FILE_READ_WRITE = locking.LockMode(
    locking.Permission.CONSISTENT_READ | locking.Permission.WRITE | locking.Permission.RESIZE,
    _ALL_BUT_RESIZE,
)
DATA_FILE_READ_ONLY = locking.LockMode(locking.Permission.CONSISTENT_READ, _ALL_BUT_RESIZE)

# What QEMU answers (qemu-io write -c; qemu-img snapshot -c) on an image with a data file.
COMPRESSED_REFUSED = "Operation not supported"
SNAPSHOT_REFUSED = "-95 (Operation not supported)"


def has_data_file(header: fmt.Header) -> bool:
    return bool(header.incompatible_features & fmt.INCOMPAT_DATA_FILE)


def is_raw(header: fmt.Header) -> bool:
    return has_data_file(header) and bool(header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW)


def data_file_path(image_path: str, header: fmt.Header, override: str | None) -> str | None:
    """Where the data file of the image at ``image_path`` is, or None if it has none."""
    if not has_data_file(header):
        if override:
            raise RequestError("'data-file' can only be set for images with an external data file")
        return None
    if override:
        return override
    name = header.data_file
    if not name:
        raise RequestError("'data-file' is required for this image")
    # QEMU 7.2 opens the name as given (relative to the working directory, where qemu-img
    # create made it). Where that finds nothing, the image's directory, as for backing files.
    if os.path.isabs(name) or os.path.exists(name):
        return name
    beside = resolve_backing(image_path, name)
    return beside if os.path.exists(beside) else name


def open_data_file(path: str, readonly: bool, force_share: bool) -> tuple[int, bool]:
    """Open and lock a data file as QEMU does; returns (fd, whether locks were taken)."""
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    if force_share:
        mode = locking.FORCE_SHARE
    else:
        mode = DATA_FILE_READ_ONLY if readonly else DATA_FILE_READ_WRITE
    try:
        locked = locking.lock(fd, path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, locked


def refuse_on_data_file(header: fmt.Header, path: str | None = None) -> None:
    """Compressed writes and internal snapshots: QEMU answers ENOTSUP on an image with an
    external data file (qemu-io ``write -c``: "write failed: Operation not supported";
    qemu-img snapshot -c: "Could not create snapshot 'NAME': -95 (Operation not supported)")."""
    if has_data_file(header):
        raise UnsupportedFeatureError(COMPRESSED_REFUSED, errno=errno.ENOTSUP, path=path)


def extension_name(data_file: str) -> bytes:
    """The data-file name header extension's payload (the name as given, as qemu-img)."""
    name = data_file.encode()
    if not name or len(name) > 1023:
        raise RequestError(f"data file name {data_file!r}: must be 1 to 1023 bytes")
    return name


def check_data_file_opens(image_path: str, header: fmt.Header) -> None:
    """QEMU opens the current data file before it amends; a missing one stops the amend."""
    name = data_file_path(image_path, header, None)
    if name is None:
        return
    try:
        os.close(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise RequestError(
            f"Could not open '{image_path}': Could not open '{name}': {os.strerror(exc.errno or 0)}",
            errno=exc.errno or errno.EIO,
        ) from None


def amend_header(header: fmt.Header, data_file: str | None, data_file_raw: bool | None) -> None:
    """Apply ``amend -o data_file=NAME,data_file_raw=on|off`` to ``header`` in memory, refusing
    (before any change) what QEMU 7.2 refuses. An empty NAME drops the name extension and keeps
    the data-file bit, as QEMU does (the image then needs ``data-file`` to open)."""
    if data_file is not None and not has_data_file(header):
        raise RequestError("data-file can only be set for images that use an external data file")
    if data_file_raw and not is_raw(header):
        raise RequestError("data-file-raw cannot be set on existing images")
    if data_file is not None:
        header.set_extension(fmt.EXT_DATA_FILE, extension_name(data_file) if data_file else None)
    if data_file_raw is False:
        header.autoclear_features &= ~fmt.AUTOCLEAR_DATA_FILE_RAW


__all__ = [
    "COMPRESSED_REFUSED",
    "DATA_FILE_READ_ONLY",
    "DATA_FILE_READ_WRITE",
    "SNAPSHOT_REFUSED",
    "amend_header",
    "check_data_file_opens",
    "data_file_path",
    "extension_name",
    "has_data_file",
    "is_raw",
    "open_data_file",
    "refuse_on_data_file",
]
