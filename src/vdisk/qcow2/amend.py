"""Small in-place header changes: the backing file name and the backing-format extension.

The whole first cluster (header, extensions, backing name) is rebuilt in memory and written
with one pwrite, then fdatasync'd: a crash leaves either the old or the new header (a sector
write is atomic on the devices QEMU also relies on, and the header lives in the first
sectors). A header that no longer fits in the first cluster is refused, as QEMU refuses it.
"""

from __future__ import annotations

import errno
import os

from ..errors import FormatError, VdiskError, from_oserror
from . import format as fmt


class HeaderSpaceError(VdiskError):
    """The new header, extensions and backing name do not fit in the first cluster."""

    errno = errno.ENOSPC


def set_backing(path: str, backing_file: str | None, backing_format: str | None) -> None:
    """Point the closed qcow2 image at ``path`` to ``backing_file`` (None: no backing file),
    recording ``backing_format`` (None: no format extension). Only the header changes."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        head = os.pread(fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
        try:
            header = fmt.Header.decode(head)
        except VdiskError as exc:
            exc.path = path
            raise
        header.backing_file = backing_file or None
        fmt_ext = backing_format.encode() if backing_file and backing_format else None
        header.set_extension(fmt.EXT_BACKING_FORMAT, fmt_ext)
        cs = header.cluster_size
        try:
            blob = header.encode()
        except FormatError:  # encode refuses a header past the first cluster
            blob = b""
        if not blob or len(blob) > cs:
            raise HeaderSpaceError("No space left in the file header")
        first = blob + bytes(max(0, min(cs, len(head)) - len(blob)))
        if os.pwrite(fd, first, 0) != len(first):
            raise VdiskError("short write of the image header", path=path)
        os.fdatasync(fd)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    finally:
        os.close(fd)
