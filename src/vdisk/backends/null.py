"""A device that discards writes and reads zeros: for measuring the export path alone."""

from __future__ import annotations

from ..block import BlockDeviceBase, Extent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

_ZEROS = memoryview(bytes(1 << 20))  # copied from, so reads allocate nothing


class NullDevice(BlockDeviceBase):
    def __init__(self, size: int, readonly: bool = False, name: str = "null") -> None:
        super().__init__(size, readonly, name)

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf).cast("B")
        n = len(view)
        self.check_request(offset, n)
        if n <= len(_ZEROS):
            view[:] = _ZEROS[:n]
            return n
        for start in range(0, n, len(_ZEROS)):
            end = min(start + len(_ZEROS), n)
            view[start:end] = _ZEROS[: end - start]
        return n

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        n = memoryview(buf).nbytes
        self.check_request(offset, n, write=True)
        return n

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        return [Extent(offset, length, data=False, zero=True, present=False)]
