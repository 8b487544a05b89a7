"""The ublk control device (/dev/ublk-control): one SQE128 ring carrying ublksrv_ctrl_cmd.

Every command is tried with its ioctl-encoded opcode first (what current kernels want, and all
that kernels built without legacy opcodes accept), then with the legacy number (all that Linux
6.1 knows). The first mode that works is remembered for the rest of the process.
"""

from __future__ import annotations

import errno
import os
import threading

from ..uring import Ring, UringError, ops
from ..uring.ring import buffer_address
from . import uapi
from .errors import UblkError

CONTROL_PATH = "/dev/ublk-control"
DEFAULT_TIMEOUT = 30.0
ENOTSUPP = 524  # the kernel-internal "not supported" that 6.1 returns for unknown opcodes

_COMMAND_NAMES = {
    uapi.UBLK_CMD_GET_QUEUE_AFFINITY: "GET_QUEUE_AFFINITY",
    uapi.UBLK_CMD_GET_DEV_INFO: "GET_DEV_INFO",
    uapi.UBLK_CMD_ADD_DEV: "ADD_DEV",
    uapi.UBLK_CMD_DEL_DEV: "DEL_DEV",
    uapi.UBLK_CMD_START_DEV: "START_DEV",
    uapi.UBLK_CMD_STOP_DEV: "STOP_DEV",
    uapi.UBLK_CMD_SET_PARAMS: "SET_PARAMS",
    uapi.UBLK_CMD_GET_PARAMS: "GET_PARAMS",
    uapi.UBLK_CMD_START_USER_RECOVERY: "START_USER_RECOVERY",
    uapi.UBLK_CMD_END_USER_RECOVERY: "END_USER_RECOVERY",
    uapi.UBLK_CMD_GET_DEV_INFO2: "GET_DEV_INFO2",
    uapi.UBLK_CMD_GET_FEATURES: "GET_FEATURES",
}

#: None until a command succeeds; then True (ioctl-encoded opcodes) or False (legacy).
_encoded_mode: bool | None = None
_mode_lock = threading.Lock()


def encoded_mode() -> bool | None:
    """Which opcode form this kernel accepted (None: not known yet)."""
    return _encoded_mode


def _refused(res: int, nr: int) -> bool:
    """Does this result mean 'this opcode form is unknown here'?"""
    if -res in (ENOTSUPP, errno.EOPNOTSUPP, errno.ENOTTY):
        return True
    # 6.1 looks the device up before it looks at the opcode; for ADD_DEV (no device yet) an
    # unknown encoded opcode therefore shows up as ENODEV.
    return nr == uapi.UBLK_CMD_ADD_DEV and res == -errno.ENODEV


class Control:
    """Commands to the ublk driver. Thread-safe (one command at a time)."""

    def __init__(self, path: str = CONTROL_PATH, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(
                errno.ENOENT, f"open {path}",
                "no such device (is the ublk driver loaded? modprobe ublk_drv)",
            ) from None
        except OSError as exc:
            raise UblkError(exc.errno or errno.EIO, f"open {path}") from None
        try:
            self.ring = Ring(4, sqe128=True)
        except UringError as exc:
            os.close(self.fd)
            raise UblkError(exc.errno, "io_uring_setup for the control ring") from None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seq = 0
        # Buffers of commands that timed out: the kernel may still write them.
        self._abandoned: list[object] = []

    # -- the one primitive --------------------------------------------------------------

    def command(
        self,
        nr: int,
        dev_id: int,
        buf: bytearray | None = None,
        data: int = 0,
        queue_id: int = 0xFFFF,
        timeout: float | None = None,
    ) -> int:
        """Run one control command; returns its non-negative result or raises UblkError."""
        global _encoded_mode
        name = _COMMAND_NAMES.get(nr, hex(nr))
        with self._lock:
            mode = _encoded_mode
            if nr == uapi.UBLK_CMD_GET_FEATURES:
                forms = [True]  # no legacy number exists
            elif mode is None:
                forms = [True, False]
            else:
                forms = [mode]
            error = 0
            for encoded in forms:
                op = uapi.ioctl_encode_ctrl(nr) if encoded else nr
                res = self._submit(op, dev_id, buf, data, queue_id, timeout, name)
                if res >= 0:
                    if mode is None and nr != uapi.UBLK_CMD_GET_FEATURES:
                        with _mode_lock:
                            _encoded_mode = encoded
                    return res
                refused = _refused(res, nr)
                # A real answer (EEXIST...) beats the other form's "unknown opcode".
                if not error or not refused:
                    error = res
                if not refused:
                    break
            err = -error
            if err == ENOTSUPP:
                err = errno.EOPNOTSUPP
            raise UblkError(err, f"{name} (device {_dev_name(dev_id)})")

    def _submit(
        self, op: int, dev_id: int, buf: bytearray | None, data: int, queue_id: int,
        timeout: float | None, name: str,
    ) -> int:
        addr = buffer_address(buf) if buf is not None else 0
        payload = uapi.pack_ctrl_cmd(dev_id, queue_id, len(buf) if buf else 0, addr, data)
        self._seq += 1
        seq = self._seq
        try:
            ops.uring_cmd(self.ring, self.fd, op, payload, seq)
            limit = self.timeout if timeout is None else timeout
            # Most commands complete during submission; the wait bounds the rest.
            cqes = self.ring.wait(1, timeout=limit)
            while True:
                for user_data, res, _flags in cqes:
                    if user_data == seq:
                        return res
                if not cqes:
                    self._abandoned.append(buf)
                    raise UblkError(errno.ETIMEDOUT, f"{name} (no answer in {limit:g} s)")
                cqes = self.ring.wait(1, timeout=limit)
        except UringError as exc:
            raise UblkError(exc.errno, f"{name}: io_uring") from None

    # -- commands -----------------------------------------------------------------------

    def add_dev(self, info: uapi.DevInfo) -> uapi.DevInfo:
        if _encoded_mode is not False:
            info.flags |= uapi.UBLK_F_CMD_IOCTL_ENCODE
        buf = bytearray(info.pack())
        try:
            self.command(uapi.UBLK_CMD_ADD_DEV, info.dev_id, buf)
        except UblkError:
            if not info.flags & uapi.UBLK_F_CMD_IOCTL_ENCODE or _encoded_mode is not False:
                raise
            # The legacy kernel answered: retry without the flag it does not know.
            info.flags &= ~uapi.UBLK_F_CMD_IOCTL_ENCODE
            buf = bytearray(info.pack())
            self.command(uapi.UBLK_CMD_ADD_DEV, info.dev_id, buf)
        result = uapi.DevInfo.unpack(buf)
        if _encoded_mode is False:
            result.flags &= ~uapi.UBLK_F_CMD_IOCTL_ENCODE
        return result

    def del_dev(self, dev_id: int, timeout: float | None = None) -> None:
        self.command(uapi.UBLK_CMD_DEL_DEV, dev_id, timeout=timeout)

    def start_dev(self, dev_id: int, pid: int) -> None:
        self.command(uapi.UBLK_CMD_START_DEV, dev_id, data=pid)

    def stop_dev(self, dev_id: int) -> None:
        self.command(uapi.UBLK_CMD_STOP_DEV, dev_id)

    def get_dev_info(self, dev_id: int) -> uapi.DevInfo:
        buf = bytearray(uapi.DEV_INFO.size)
        self.command(uapi.UBLK_CMD_GET_DEV_INFO, dev_id, buf)
        return uapi.DevInfo.unpack(buf)

    def params_length(self) -> int:
        """The struct ublk_params size to send: 6.1 (legacy opcodes) knows two blocks only."""
        return uapi.PARAMS_SIZE_V1 if _encoded_mode is False else uapi.PARAMS_SIZE

    def set_params(self, dev_id: int, params: uapi.Params) -> None:
        buf = params.pack(self.params_length())
        self.command(uapi.UBLK_CMD_SET_PARAMS, dev_id, buf)

    def get_params(self, dev_id: int) -> uapi.Params:
        buf = uapi.Params(types=0).pack(self.params_length())
        self.command(uapi.UBLK_CMD_GET_PARAMS, dev_id, buf)
        return uapi.Params.unpack(buf)

    def start_user_recovery(self, dev_id: int) -> None:
        self.command(uapi.UBLK_CMD_START_USER_RECOVERY, dev_id)

    def end_user_recovery(self, dev_id: int, pid: int) -> None:
        self.command(uapi.UBLK_CMD_END_USER_RECOVERY, dev_id, data=pid)

    def get_queue_affinity(self, dev_id: int, q_id: int) -> set[int]:
        """The CPUs whose requests blk-mq sends to queue ``q_id``."""
        buf = bytearray(1024)  # a cpumask for up to 8192 CPUs (the length must cover them all)
        self.command(uapi.UBLK_CMD_GET_QUEUE_AFFINITY, dev_id, buf, data=q_id)
        return uapi.cpus_of_mask(buf)

    def get_features(self) -> int | None:
        """The driver's UBLK_F_* feature mask, or None on kernels without GET_FEATURES."""
        buf = bytearray(uapi.UBLK_FEATURES_LEN)
        try:
            self.command(uapi.UBLK_CMD_GET_FEATURES, 0xFFFFFFFF, buf)
        except UblkError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL, errno.ENOTTY):
                return None
            raise
        return int.from_bytes(buf, "little")

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        if self.ring.closed:
            return
        if self._abandoned:
            return  # the kernel may still write into them: keep ring, fd and buffers alive
        self.ring.close()
        os.close(self.fd)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dev_name(dev_id: int) -> str:
    return "new" if dev_id in (-1, 0xFFFFFFFF) else str(dev_id)


def list_device_ids() -> list[int]:
    """Device ids from /dev/ublkc* (sysfs /sys/class/ublk-char as a fallback)."""
    ids: set[int] = set()
    for directory, prefix in (("/dev", "ublkc"), ("/sys/class/ublk-char", "ublkc")):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                ids.add(int(name[len(prefix):]))
    return sorted(ids)

