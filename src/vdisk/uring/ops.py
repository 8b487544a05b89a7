"""SQE builders: each claims one SQE of a Ring, fills it in place and returns nothing.

The SQE layout (struct io_uring_sqe, 64 bytes; 128 with SQE128, the extra 64 bytes extending
the command area that starts at byte 48):

    0 opcode u8, 1 flags u8, 2 ioprio u16, 4 fd s32, 8 off/addr2/cmd_op u64, 16 addr u64,
    24 len u32, 28 op flags u32, 32 user_data u64, 40 buf_index u16, 42 personality u16,
    44 file_index s32, 48 addr3 / cmd[...]
"""

from __future__ import annotations

import ctypes
import struct

from .ring import Ring

IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_READ_FIXED = 4
IORING_OP_WRITE_FIXED = 5
IORING_OP_FALLOCATE = 17
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_OP_URING_CMD = 46

# sqe->flags
IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_DRAIN = 1 << 1
IOSQE_IO_LINK = 1 << 2
IOSQE_ASYNC = 1 << 4
IOSQE_CQE_SKIP_SUCCESS = 1 << 6  # post a CQE only on failure (5.17+, IORING_FEAT_CQE_SKIP)

IORING_FSYNC_DATASYNC = 1 << 0
RWF_DSYNC = 0x00000002

CMD_OFFSET = 48  # where the uring_cmd payload starts in an SQE

_HEAD = struct.Struct("<BBHiQQIIQH")  # opcode .. buf_index (42 bytes)
_pack_head = _HEAD.pack_into

#: A whole 64-byte SQE for READ/WRITE-like ops, zero tail included, packed in one call on hot
#: paths (with ``Ring.push``): opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data,
#: buf_index, personality, file_index.
RW_SQE = struct.Struct("<BBHiQQIIQHHi16x")
#: A whole 64-byte URING_CMD SQE with a 16-byte payload: opcode, flags, ioprio, fd, cmd_op, pad,
#: addr, len, op flags, user_data, buf_index, personality, file_index, then the payload as
#: two u16, an s32 and a u64 (the shape of ublk's io_cmd).
CMD16_SQE = struct.Struct("<BBHiIIQIIQHHiHHiQ")
assert RW_SQE.size == CMD16_SQE.size == 64


def nop(ring: Ring, user_data: int, flags: int = 0) -> None:
    off = ring.sqe()
    _pack_head(ring.sqes, off, IORING_OP_NOP, flags, 0, -1, 0, 0, 0, 0, user_data, 0)


def rw(
    ring: Ring,
    opcode: int,
    fd: int,
    addr: int,
    length: int,
    offset: int,
    user_data: int,
    *,
    flags: int = 0,
    rw_flags: int = 0,
    buf_index: int = 0,
) -> None:
    """READ/WRITE (addr is a buffer), READV/WRITEV (addr is an iovec array, length its count),
    READ_FIXED/WRITE_FIXED (addr inside registered buffer ``buf_index``)."""
    off = ring.sqe()
    _pack_head(
        ring.sqes, off, opcode, flags, 0, fd, offset, addr, length, rw_flags, user_data, buf_index
    )


def read(ring: Ring, fd: int, addr: int, length: int, offset: int, user_data: int, **kw: int) -> None:
    rw(ring, IORING_OP_READ, fd, addr, length, offset, user_data, **kw)


def write(
    ring: Ring, fd: int, addr: int, length: int, offset: int, user_data: int, **kw: int
) -> None:
    rw(ring, IORING_OP_WRITE, fd, addr, length, offset, user_data, **kw)


class IovecArray:
    """A ctypes iovec array kept alive by its owner until the request completes."""

    def __init__(self, buffers: list[tuple[int, int]]) -> None:
        self.array = (ctypes.c_uint64 * (2 * len(buffers)))()
        for i, (addr, length) in enumerate(buffers):
            self.array[2 * i] = addr
            self.array[2 * i + 1] = length
        self.count = len(buffers)
        self.address = ctypes.addressof(self.array)


def readv(ring: Ring, fd: int, iov: IovecArray, offset: int, user_data: int, **kw: int) -> None:
    rw(ring, IORING_OP_READV, fd, iov.address, iov.count, offset, user_data, **kw)


def writev(ring: Ring, fd: int, iov: IovecArray, offset: int, user_data: int, **kw: int) -> None:
    rw(ring, IORING_OP_WRITEV, fd, iov.address, iov.count, offset, user_data, **kw)


def read_fixed(
    ring: Ring, fd: int, addr: int, length: int, offset: int, buf_index: int, user_data: int,
    flags: int = 0,
) -> None:
    rw(ring, IORING_OP_READ_FIXED, fd, addr, length, offset, user_data, flags=flags,
       buf_index=buf_index)


def write_fixed(
    ring: Ring, fd: int, addr: int, length: int, offset: int, buf_index: int, user_data: int,
    flags: int = 0, rw_flags: int = 0,
) -> None:
    rw(ring, IORING_OP_WRITE_FIXED, fd, addr, length, offset, user_data, flags=flags,
       rw_flags=rw_flags, buf_index=buf_index)


def fsync(ring: Ring, fd: int, user_data: int, datasync: bool = False, flags: int = 0) -> None:
    off = ring.sqe()
    _pack_head(
        ring.sqes, off, IORING_OP_FSYNC, flags, 0, fd, 0, 0, 0,
        IORING_FSYNC_DATASYNC if datasync else 0, user_data, 0,
    )


def fallocate(
    ring: Ring, fd: int, mode: int, offset: int, length: int, user_data: int, flags: int = 0
) -> None:
    """fallocate(fd, mode, offset, length): the length travels in addr, the mode in len."""
    off = ring.sqe()
    _pack_head(ring.sqes, off, IORING_OP_FALLOCATE, flags, 0, fd, offset, length, mode, 0,
               user_data, 0)


def uring_cmd(
    ring: Ring, fd: int, cmd_op: int, payload: bytes, user_data: int, flags: int = 0
) -> None:
    """IORING_OP_URING_CMD: ``payload`` (16 bytes, or up to 80 on an SQE128 ring) goes to the
    command area at SQE byte 48; ``cmd_op`` sits at byte 8."""
    limit = ring.sqe_size - CMD_OFFSET
    if len(payload) > limit:
        raise ValueError(f"uring_cmd payload of {len(payload)} bytes exceeds {limit}")
    off = ring.sqe()
    _pack_head(ring.sqes, off, IORING_OP_URING_CMD, flags, 0, fd, cmd_op, 0, 0, 0, user_data, 0)
    start = off + CMD_OFFSET
    ring.sqes[start : start + len(payload)] = payload


def uring_cmd_into(ring: Ring, fd: int, cmd_op: int, user_data: int, flags: int = 0) -> int:
    """Like uring_cmd but returns the payload's byte offset in ``ring.sqes`` for the caller to
    pack in place (saves building a bytes object per command on the hot path)."""
    off = ring.sqe()
    _pack_head(ring.sqes, off, IORING_OP_URING_CMD, flags, 0, fd, cmd_op, 0, 0, 0, user_data, 0)
    return off + CMD_OFFSET
