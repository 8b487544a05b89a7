"""The ublk kernel ABI (include/uapi/linux/ublk_cmd.h) as constants and struct codecs.

Sizes and offsets are checked against the C header by tests/ublk/test_uapi.py.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from .errors import UblkError

# -- control commands (legacy numbers; the ioctl-encoded forms wrap them) ------------------
UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12
UBLK_CMD_GET_FEATURES = 0x13  # exists only ioctl-encoded

# -- I/O commands -------------------------------------------------------------------------
UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22

UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -errno.ENODEV

UBLKSRV_CMD_BUF_OFFSET = 0
UBLKSRV_IO_BUF_OFFSET = 0x80000000
UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_MAX_NR_QUEUES = 4096
UBLK_FEATURES_LEN = 8

# -- device flags -------------------------------------------------------------------------
UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_UNPRIVILEGED_DEV = 1 << 5
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_USER_COPY = 1 << 7
UBLK_F_ZONED = 1 << 8
UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9
UBLK_F_UPDATE_SIZE = 1 << 10
UBLK_F_AUTO_BUF_REG = 1 << 11
UBLK_F_QUIESCE = 1 << 12
UBLK_F_PER_IO_DAEMON = 1 << 13

FEATURE_NAMES = {
    UBLK_F_SUPPORT_ZERO_COPY: "ZERO_COPY",
    UBLK_F_URING_CMD_COMP_IN_TASK: "COMP_IN_TASK",
    UBLK_F_NEED_GET_DATA: "NEED_GET_DATA",
    UBLK_F_USER_RECOVERY: "USER_RECOVERY",
    UBLK_F_USER_RECOVERY_REISSUE: "RECOVERY_REISSUE",
    UBLK_F_UNPRIVILEGED_DEV: "UNPRIVILEGED_DEV",
    UBLK_F_CMD_IOCTL_ENCODE: "CMD_IOCTL_ENCODE",
    UBLK_F_USER_COPY: "USER_COPY",
    UBLK_F_ZONED: "ZONED",
    UBLK_F_USER_RECOVERY_FAIL_IO: "RECOVERY_FAIL_IO",
    UBLK_F_UPDATE_SIZE: "UPDATE_SIZE",
    UBLK_F_AUTO_BUF_REG: "AUTO_BUF_REG",
    UBLK_F_QUIESCE: "QUIESCE",
    UBLK_F_PER_IO_DAEMON: "PER_IO_DAEMON",
}

# -- device states ------------------------------------------------------------------------
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2
UBLK_S_DEV_FAIL_IO = 3
STATE_NAMES = {0: "DEAD", 1: "LIVE", 2: "QUIESCED", 3: "FAIL_IO"}

# -- request ops and flags (ublksrv_io_desc.op_flags) -------------------------------------
UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4
UBLK_IO_OP_WRITE_ZEROES = 5
#: the ops a server serves, by the names metrics and logs use (WRITE_SAME is never sent)
IO_OP_NAMES = {
    UBLK_IO_OP_READ: "read",
    UBLK_IO_OP_WRITE: "write",
    UBLK_IO_OP_FLUSH: "flush",
    UBLK_IO_OP_DISCARD: "discard",
    UBLK_IO_OP_WRITE_ZEROES: "write_zeroes",
}

UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16

# -- params -------------------------------------------------------------------------------
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2
UBLK_PARAM_TYPE_ZONED = 1 << 3
UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4
UBLK_PARAM_TYPE_SEGMENT = 1 << 5

# -- ioctl encoding -----------------------------------------------------------------------
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("u") << 8) | nr


def ioctl_encode_ctrl(nr: int) -> int:
    """UBLK_U_CMD_*: GET_* and DEV_INFO are _IOR, the rest _IOWR, over ublksrv_ctrl_cmd."""
    read_only = nr in (
        UBLK_CMD_GET_QUEUE_AFFINITY,
        UBLK_CMD_GET_DEV_INFO,
        UBLK_CMD_GET_PARAMS,
        UBLK_CMD_GET_DEV_INFO2,
        UBLK_CMD_GET_FEATURES,
    )
    return _ioc(_IOC_READ if read_only else _IOC_READ | _IOC_WRITE, nr, CTRL_CMD.size)


def ioctl_encode_io(nr: int) -> int:
    """UBLK_U_IO_*: _IOWR over ublksrv_io_cmd."""
    return _ioc(_IOC_READ | _IOC_WRITE, nr, IO_CMD.size)


# -- structs ------------------------------------------------------------------------------

#: struct ublksrv_ctrl_cmd: dev_id u32, queue_id u16, len u16, addr u64, data u64,
#: dev_path_len u16, pad u16, reserved u32 (6.1 has data[2] in place of the last three)
CTRL_CMD = struct.Struct("<IHHQQHHI")
#: struct ublksrv_ctrl_dev_info
DEV_INFO = struct.Struct("<HHHHIIiIQQIIQQ")
#: struct ublksrv_io_desc: op_flags u32, nr_sectors u32, start_sector u64, addr u64
IO_DESC = struct.Struct("<IIQQ")
#: struct ublksrv_io_cmd: q_id u16, tag u16, result s32, addr u64
IO_CMD = struct.Struct("<HHiQ")

PARAM_HEADER = struct.Struct("<II")  # len, types
PARAM_BASIC = struct.Struct("<IBBBBIIQQ")
PARAM_DISCARD = struct.Struct("<IIIIHH")
PARAM_DEVT = struct.Struct("<IIII")
PARAM_ZONED = struct.Struct("<III20x")
PARAM_DMA = struct.Struct("<I4x")
PARAM_SEGMENT = struct.Struct("<QIH2x")

# Offsets of each block in struct ublk_params (C alignment: basic is 8-aligned).
PARAMS_BASIC_OFFSET = 8
PARAMS_DISCARD_OFFSET = PARAMS_BASIC_OFFSET + PARAM_BASIC.size  # 40
PARAMS_DEVT_OFFSET = PARAMS_DISCARD_OFFSET + PARAM_DISCARD.size  # 60
PARAMS_ZONED_OFFSET = PARAMS_DEVT_OFFSET + PARAM_DEVT.size  # 76
PARAMS_DMA_OFFSET = PARAMS_ZONED_OFFSET + PARAM_ZONED.size  # 108
PARAMS_SEGMENT_OFFSET = 120  # 116 rounded up to the u64 in ublk_param_segment
PARAMS_SIZE = PARAMS_SEGMENT_OFFSET + PARAM_SEGMENT.size  # 136 (without integrity)
#: the size of struct ublk_params in Linux 6.1 (basic and discard only, padded to 8)
PARAMS_SIZE_V1 = 64

assert CTRL_CMD.size == 32 and DEV_INFO.size == 64 and IO_DESC.size == 24 and IO_CMD.size == 16
assert PARAM_BASIC.size == 32 and PARAM_DISCARD.size == 20 and PARAM_DEVT.size == 16
assert PARAM_ZONED.size == 32 and PARAM_DMA.size == 8 and PARAM_SEGMENT.size == 16


def pack_ctrl_cmd(dev_id: int, queue_id: int = 0xFFFF, length: int = 0, addr: int = 0,
                  data: int = 0) -> bytes:
    return CTRL_CMD.pack(dev_id & 0xFFFFFFFF, queue_id & 0xFFFF, length, addr, data, 0, 0, 0)


@dataclass(slots=True)
class DevInfo:
    """struct ublksrv_ctrl_dev_info."""

    nr_hw_queues: int = 1
    queue_depth: int = 128
    state: int = 0
    max_io_buf_bytes: int = 512 << 10
    dev_id: int = 0xFFFFFFFF  # -1: the kernel picks
    ublksrv_pid: int = 0
    flags: int = 0
    ublksrv_flags: int = 0
    owner_uid: int = 0
    owner_gid: int = 0

    def pack(self) -> bytes:
        return DEV_INFO.pack(
            self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
            self.dev_id & 0xFFFFFFFF, self.ublksrv_pid, 0, self.flags, self.ublksrv_flags,
            self.owner_uid, self.owner_gid, 0, 0,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> DevInfo:
        if len(data) < DEV_INFO.size:
            raise UblkError(errno.EPROTO, "decode ublksrv_ctrl_dev_info",
                            f"{len(data)} bytes, not {DEV_INFO.size}")
        (nr_q, depth, state, _p0, max_buf, dev_id, pid, _p1, flags, srv_flags, uid, gid,
         _r1, _r2) = DEV_INFO.unpack_from(data)
        return cls(nr_q, depth, state, max_buf, dev_id, pid, flags, srv_flags, uid, gid)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


@dataclass(slots=True)
class ParamBasic:
    attrs: int = 0
    logical_bs_shift: int = 9
    physical_bs_shift: int = 12
    io_opt_shift: int = 12
    io_min_shift: int = 9
    max_sectors: int = 1024
    chunk_sectors: int = 0
    dev_sectors: int = 0
    virt_boundary_mask: int = 0


@dataclass(slots=True)
class ParamDiscard:
    discard_alignment: int = 0
    discard_granularity: int = 4096
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0
    max_discard_segments: int = 1


@dataclass(slots=True)
class ParamDevt:
    char_major: int = 0
    char_minor: int = 0
    disk_major: int = 0
    disk_minor: int = 0


@dataclass(slots=True)
class ParamZoned:
    max_open_zones: int = 0
    max_active_zones: int = 0
    max_zone_append_sectors: int = 0


@dataclass(slots=True)
class ParamDma:
    alignment: int = 0


@dataclass(slots=True)
class ParamSegment:
    seg_boundary_mask: int = 0
    max_segment_size: int = 0
    max_segments: int = 0


@dataclass(slots=True)
class Params:
    """struct ublk_params: the blocks named in ``types`` are meaningful."""

    types: int = UBLK_PARAM_TYPE_BASIC
    basic: ParamBasic = field(default_factory=ParamBasic)
    discard: ParamDiscard = field(default_factory=ParamDiscard)
    devt: ParamDevt = field(default_factory=ParamDevt)
    zoned: ParamZoned = field(default_factory=ParamZoned)
    dma: ParamDma = field(default_factory=ParamDma)
    seg: ParamSegment = field(default_factory=ParamSegment)

    def pack(self, length: int | None = None) -> bytearray:
        """The struct, ``length`` bytes long (PARAMS_SIZE_V1 for kernels with only basic and
        discard blocks); the header's len says the same."""
        size = PARAMS_SIZE if length is None else length
        buf = bytearray(max(size, PARAMS_SIZE))
        PARAM_HEADER.pack_into(buf, 0, size, self.types)
        b = self.basic
        PARAM_BASIC.pack_into(
            buf, PARAMS_BASIC_OFFSET, b.attrs, b.logical_bs_shift, b.physical_bs_shift,
            b.io_opt_shift, b.io_min_shift, b.max_sectors, b.chunk_sectors, b.dev_sectors,
            b.virt_boundary_mask,
        )
        d = self.discard
        PARAM_DISCARD.pack_into(
            buf, PARAMS_DISCARD_OFFSET, d.discard_alignment, d.discard_granularity,
            d.max_discard_sectors, d.max_write_zeroes_sectors, d.max_discard_segments, 0,
        )
        v = self.devt
        PARAM_DEVT.pack_into(buf, PARAMS_DEVT_OFFSET, v.char_major, v.char_minor, v.disk_major,
                             v.disk_minor)
        z = self.zoned
        PARAM_ZONED.pack_into(buf, PARAMS_ZONED_OFFSET, z.max_open_zones, z.max_active_zones,
                              z.max_zone_append_sectors)
        PARAM_DMA.pack_into(buf, PARAMS_DMA_OFFSET, self.dma.alignment)
        s = self.seg
        PARAM_SEGMENT.pack_into(buf, PARAMS_SEGMENT_OFFSET, s.seg_boundary_mask,
                                s.max_segment_size, s.max_segments)
        return buf[:size] if size < len(buf) else buf

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Params:
        buf = bytes(data).ljust(PARAMS_SIZE, b"\0")
        _len, types = PARAM_HEADER.unpack_from(buf, 0)
        return cls(
            types,
            ParamBasic(*PARAM_BASIC.unpack_from(buf, PARAMS_BASIC_OFFSET)),
            ParamDiscard(*PARAM_DISCARD.unpack_from(buf, PARAMS_DISCARD_OFFSET)[:5]),
            ParamDevt(*PARAM_DEVT.unpack_from(buf, PARAMS_DEVT_OFFSET)),
            ParamZoned(*PARAM_ZONED.unpack_from(buf, PARAMS_ZONED_OFFSET)),
            ParamDma(*PARAM_DMA.unpack_from(buf, PARAMS_DMA_OFFSET)),
            ParamSegment(*PARAM_SEGMENT.unpack_from(buf, PARAMS_SEGMENT_OFFSET)),
        )


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def desc_mmap_offset(q_id: int, page_size: int) -> int:
    """Where queue ``q_id``'s descriptor array sits in /dev/ublkcN's mmap space."""
    return UBLKSRV_CMD_BUF_OFFSET + q_id * round_up(UBLK_MAX_QUEUE_DEPTH * IO_DESC.size, page_size)


def desc_mmap_length(depth: int, page_size: int) -> int:
    return round_up(depth * IO_DESC.size, page_size)


def cpus_of_mask(mask: bytes | bytearray | memoryview) -> set[int]:
    """The CPUs set in a little-endian cpumask (GET_QUEUE_AFFINITY's reply)."""
    return {
        byte_index * 8 + bit
        for byte_index, byte in enumerate(bytes(mask)) if byte
        for bit in range(8) if byte >> bit & 1
    }


def feature_names(flags: int) -> list[str]:
    return [name for bit, name in FEATURE_NAMES.items() if flags & bit]
