"""A read-only device over one stored (uncompressed) member of a zip archive.

The member's bytes sit contiguously in the archive, so a read is one pread at a fixed offset:
a disk image shipped in a zip can be served without unpacking it.
"""

from __future__ import annotations

import os
import struct
import zipfile

from ..block import BlockDeviceBase, Extent
from ..errors import FormatError, UnsupportedFeatureError, from_oserror
from ..fileio import pread_full

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"


def split_member(spec: str) -> tuple[str, str | None]:
    """'disk.zip:image.raw' -> ('disk.zip', 'image.raw'); a plain path has no member."""
    if ":" in spec and not os.path.exists(spec):
        path, member = spec.split(":", 1)
        return path, member or None
    return spec, None


class ZipMemberDevice(BlockDeviceBase):
    """``member`` of the zip at ``path`` (the only member when None). Always read-only."""

    def __init__(self, path: str, member: str | None = None) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as exc:
            raise FormatError(f"not a zip archive: {exc}", path=path) from None
        except OSError as exc:
            raise from_oserror(exc, path) from None
        if member is None:
            if len(infos) != 1:
                names = ", ".join(i.filename for i in infos[:5]) or "none"
                raise FormatError(
                    f"the archive has {len(infos)} members ({names}); name one as FILE:MEMBER",
                    path=path,
                )
            info = infos[0]
        else:
            matches = [i for i in infos if i.filename == member]
            if not matches:
                raise FormatError(f"no member {member!r} in the archive", path=path)
            info = matches[-1]
        if info.flag_bits & 0x1:
            raise UnsupportedFeatureError(f"member {info.filename!r} is encrypted", path=path)
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedFeatureError(
                f"member {info.filename!r} is compressed; only stored members can be served",
                path=path,
            )
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            header = os.pread(self.fd, _LOCAL_HEADER.size, info.header_offset)
            if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
                raise FormatError(f"bad local header for member {info.filename!r}", path=path)
            fields = _LOCAL_HEADER.unpack(header)
            name_len, extra_len = fields[9], fields[10]
            self.data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            archive_size = os.fstat(self.fd).st_size
            if self.data_offset + info.file_size > archive_size:
                raise FormatError(f"member {info.filename!r} runs past the archive's end",
                                  path=path)
        except BaseException:
            os.close(self.fd)
            raise
        super().__init__(info.file_size, True, f"{path}:{info.filename}")
        self.path = path
        self.member = info.filename

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf)
        self.check_request(offset, view.nbytes)
        pread_full(self.fd, view, self.data_offset + offset)
        return view.nbytes

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        self.check_request(offset, memoryview(buf).nbytes, write=True)
        return 0  # unreachable: check_request raises ReadOnlyError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        return [Extent(offset, length, data=True, zero=False,
                       host_offset=self.data_offset + offset)]

    def close(self) -> None:
        if not self._closed:
            super().close()
            os.close(self.fd)
