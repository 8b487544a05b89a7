"""A read-only look at a qcow2 image's header, snapshot table and bitmap directory: what
``qemu-img info`` shows, without the mapping machinery of ``Qcow2Image`` (and so without numpy,
which the tables' bulk checks use). ``vdisk info`` opens images this way, to start quickly.

The file is locked as a read-only ``Qcow2Image`` locks it, and the header is validated as QEMU's
open validates it; L1/L2 and refcount tables are not read (``qemu-img info`` does not read them
either).
"""

from __future__ import annotations

import os

from .. import locking
from ..errors import CorruptImageError, UnsupportedFeatureError, VdiskError, from_oserror
from ..fileio import pread_full
from . import format as fmt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SNAPSHOT_ENTRY_MAX = 40 + 1024 + 2 * 65536 + 8  # fixed part, extra data, id and name, padding


def read_header(fd: int) -> fmt.Header:
    """The header of the qcow2 file ``fd``, validated as QEMU's open validates it (against
    the file's size) and refused where it needs an incompatible feature we do not know."""
    file_size = os.fstat(fd).st_size
    # The header, its extensions and the backing file name lie in the first cluster: read
    # 64 KiB (the usual cluster) and the rest of a bigger first cluster only if it has one.
    head = bytearray(min(file_size, 1 << 16))
    pread_full(fd, head, 0)
    if len(head) >= 24:
        cluster_bits = int.from_bytes(head[20:24], "big")
        first_cluster = 1 << min(max(cluster_bits, fmt.MIN_CLUSTER_BITS), fmt.MAX_CLUSTER_BITS)
        if first_cluster > len(head) and file_size > len(head):
            head += bytearray(min(file_size, first_cluster) - len(head))
            pread_full(fd, memoryview(head)[1 << 16 :], 1 << 16)
    header = fmt.Header.decode(head)
    header.validate(file_size)
    unknown = header.incompatible_features & ~fmt.INCOMPAT_KNOWN
    if unknown:
        names = [
            header.feature_name(fmt.FEATURE_INCOMPAT, b) for b in range(64) if unknown >> b & 1
        ]
        raise UnsupportedFeatureError(f"unsupported incompatible feature(s): {', '.join(names)}")
    return header


def read_snapshots(fd: int, header: fmt.Header) -> list[fmt.SnapshotEntry]:
    """The snapshot table. Entries vary in length: read in growing chunks until all decode,
    bounded by the largest table the header's count allows."""
    if not header.nb_snapshots:
        return []
    chunk = 64 << 10
    buf = bytearray()
    limit = header.nb_snapshots * _SNAPSHOT_ENTRY_MAX
    while True:
        part = bytearray(chunk)
        got = pread_full(fd, part, header.snapshots_offset + len(buf))
        buf += part
        try:
            return fmt.decode_snapshot_table(bytes(buf), header.nb_snapshots)
        except CorruptImageError:
            if got < chunk or len(buf) >= limit:
                raise
        chunk *= 2


class Qcow2Summary:
    """The header-level facts of a qcow2 image, open read-only (use as a context manager)."""

    def __init__(self, path: str, force_share: bool = False) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            locking.lock(self.fd, path, locking.mode_for("qcow2", True, force_share))
            self.header = read_header(self.fd)
        except VdiskError as exc:
            os.close(self.fd)
            if exc.path is None:
                exc.path = path
            raise
        except OSError as exc:
            os.close(self.fd)
            raise from_oserror(exc, path) from None
        self.size = self.header.size
        self.cluster_size = self.header.cluster_size


    @property
    def snapshots(self) -> list[fmt.SnapshotEntry]:
        """The internal snapshot table."""
        return read_snapshots(self.fd, self.header)

    def specific_info(self) -> dict[str, Any]:
        """What ``qemu-img info`` prints under "Format specific information"."""
        from .queries import specific_info

        return specific_info(self)  # type: ignore[arg-type]  # reads .fd and .header only

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Qcow2Summary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Qcow2Summary"]
