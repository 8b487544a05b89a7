"""A small io_uring in pure Python: the three syscalls through ctypes, the rings through mmap.

One ``Ring`` belongs to one thread: it is not locked. SQEs are filled in place (see ``ops``),
published with one tail store and handed to the kernel with one ``io_uring_enter``; completions
are reaped in batches.

Memory ordering: the kernel reads the SQ tail with acquire semantics and writes the CQ tail with
release semantics. Our side must store the SQEs before the SQ tail, and load the CQ tail before
the CQEs (and the CQEs before storing the CQ head). On x86-64 (TSO) ordinary loads and stores
already give exactly that, and CPython performs our loads and stores in program order. On other
architectures ``_fence()`` adds a full barrier (a mutex round trip) at those points.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import platform
import struct
import threading
from collections.abc import Sequence

from ..errors import VdiskError

SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427

# io_uring_params.flags
IORING_SETUP_IOPOLL = 1 << 0
IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_SUBMIT_ALL = 1 << 7
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11

# io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_EXT_ARG = 1 << 8
IORING_FEAT_CQE_SKIP = 1 << 11

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_EXT_ARG = 1 << 3

# mmap offsets
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# io_uring_register opcodes
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
IORING_REGISTER_FILES = 2
IORING_UNREGISTER_FILES = 3

# struct io_sqring_offsets / io_cqring_offsets: ten u32 then a u64 (40 bytes each);
# struct io_uring_params: 10 u32 + sq_off + cq_off = 120 bytes.
_PARAMS = struct.Struct("<10I 8I Q 8I Q")
assert _PARAMS.size == 120
_CQE = struct.Struct("<QiI")
_CQE32 = struct.Struct("<QiI16x")  # IORING_SETUP_CQE32: the big CQE's extra 16 bytes unused
_GETEVENTS_ARG = struct.Struct("<QIIQ")  # sigmask, sigmask_sz, pad, ts pointer
_TIMESPEC = struct.Struct("<qq")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# io_uring_enter with a fixed prototype: ctypes converts plain ints itself, no c_uint objects
# per call (the call sits on every ublk batch). syscall(2) takes its arguments in registers
# whether or not it is declared variadic, so the prototype is exact on x86-64 and arm64.
_enter = ctypes.CFUNCTYPE(
    ctypes.c_long, ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
    ctypes.c_void_p, ctypes.c_size_t, use_errno=True,
)(("syscall", _libc))

_NEEDS_FENCE = platform.machine() not in ("x86_64", "AMD64", "i686", "i386")
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (callers skip it where the CPU does not reorder: x86)."""
    with _fence_lock:
        pass


class UringError(VdiskError):
    """An io_uring syscall failed (the errno says why)."""

    def __init__(self, err: int, operation: str) -> None:
        super().__init__(f"{operation}: {os.strerror(err)}", errno=err)
        self.operation = operation


def _check(ret: int, operation: str) -> int:
    if ret < 0:
        raise UringError(ctypes.get_errno(), operation)
    return ret


def buffer_address(buf: object) -> int:
    """The address of a writable buffer (bytearray, mmap, ctypes array)."""
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]


class Cqe:
    """Plain completion tuple accessors (kept as tuples on the hot path)."""

    USER_DATA = 0
    RES = 1
    FLAGS = 2


class Ring:
    """An io_uring instance: SQ and CQ rings plus the SQE array, all mmapped.

    ``entries`` is rounded up to a power of two by the kernel. ``sqe128`` selects 128-byte SQEs
    (needed by commands with an 80-byte payload, such as ublk control commands).
    """

    def __init__(
        self,
        entries: int,
        *,
        sqe128: bool = False,
        cqe32: bool = False,
        cq_entries: int | None = None,
        flags: int = 0,
    ) -> None:
        if sqe128:
            flags |= IORING_SETUP_SQE128
        if cqe32:
            flags |= IORING_SETUP_CQE32
        if cq_entries is not None:
            flags |= IORING_SETUP_CQSIZE
        params = bytearray(_PARAMS.size)
        struct.pack_into("<III", params, 0, 0, cq_entries or 0, flags)
        cparams = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(
            ctypes.c_long(SYS_io_uring_setup), ctypes.c_uint(entries), cparams
        )
        if fd < 0:
            err = ctypes.get_errno()
            if err == _errno.ENOSYS:
                raise UringError(err, "io_uring_setup (io_uring is not available here)")
            raise UringError(err, "io_uring_setup")
        del cparams
        self.fd = int(fd)
        self._closed = False
        try:
            self._map(params, flags)
        except BaseException:
            os.close(self.fd)
            raise

    def _map(self, params: bytearray, flags: int) -> None:
        v: tuple[int, ...] = _PARAMS.unpack(params)
        self.sq_entries: int = v[0]
        self.cq_entries: int = v[1]
        self.flags: int = v[2]
        self.features: int = v[5]
        sq_head, sq_tail, sq_mask, _sq_n, sq_flags, sq_dropped, sq_array = v[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, cq_overflow, cq_cqes = v[19:25]
        self.sqe_size = 128 if flags & IORING_SETUP_SQE128 else 64
        self.cqe_size = 32 if flags & IORING_SETUP_CQE32 else 16
        self._iter_cqes = (_CQE32 if self.cqe_size == 32 else _CQE).iter_unpack
        sq_len = sq_array + self.sq_entries * 4
        cq_len = cq_cqes + self.cq_entries * self.cqe_size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mflags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if self.features & IORING_FEAT_SINGLE_MMAP:
            sq_len = cq_len = max(sq_len, cq_len)
        self._sq_map = mmap.mmap(self.fd, sq_len, mflags, prot, offset=IORING_OFF_SQ_RING)
        if self.features & IORING_FEAT_SINGLE_MMAP:
            self._cq_map = self._sq_map
        else:
            self._cq_map = mmap.mmap(self.fd, cq_len, mflags, prot, offset=IORING_OFF_CQ_RING)
        self._sqe_map = mmap.mmap(
            self.fd, self.sq_entries * self.sqe_size, mflags, prot, offset=IORING_OFF_SQES
        )
        sq32 = memoryview(self._sq_map).cast("I")
        cq32 = memoryview(self._cq_map).cast("I")
        self._sq32 = sq32
        self._cq32 = cq32
        self._sq_head = sq_head // 4
        self._sq_tail = sq_tail // 4
        self._sq_flags = sq_flags // 4
        self._sq_dropped = sq_dropped // 4
        self._cq_head = cq_head // 4
        self._cq_tail = cq_tail // 4
        self._cq_overflow = cq_overflow // 4
        self.sq_mask: int = sq32[sq_mask // 4]
        self.cq_mask: int = cq32[cq_mask // 4]
        self._cqes_off = cq_cqes
        self._cq_buf = memoryview(self._cq_map)
        #: the SQE array; ``ops`` fills entries in place at ``sqe()`` offsets
        self.sqes = memoryview(self._sqe_map)
        # Identity map the SQ index array once: SQE i always sits in slot i.
        base = sq_array // 4
        self._sq_array = base
        for i in range(self.sq_entries):
            sq32[base + i] = i
        self._local_tail: int = sq32[self._sq_tail]
        self._submitted_tail: int = self._local_tail
        self._ts = bytearray(_TIMESPEC.size)
        self._ts_c = (ctypes.c_char * _TIMESPEC.size).from_buffer(self._ts)
        self._arg = bytearray(_GETEVENTS_ARG.size)
        self._arg_c = (ctypes.c_char * _GETEVENTS_ARG.size).from_buffer(self._arg)
        _GETEVENTS_ARG.pack_into(self._arg, 0, 0, 8, 0, ctypes.addressof(self._ts_c))
        self._arg_addr = ctypes.addressof(self._arg_c)
        self._timeout: float | None = None  # what self._ts holds
        self._registered_buffers: list[object] = []

    # -- submission ---------------------------------------------------------------------

    @property
    def sq_space(self) -> int:
        """Free SQEs (those not yet filled and not still held by the kernel)."""
        return self.sq_entries - ((self._local_tail - self._sq32[self._sq_head]) & 0xFFFFFFFF)

    @property
    def pending(self) -> int:
        """SQEs filled but not yet submitted."""
        return (self._local_tail - self._submitted_tail) & 0xFFFFFFFF

    def sqe(self) -> int:
        """Claim the next SQE and return its byte offset in ``sqes``; it is zeroed.

        Raises UringError(EBUSY) when the SQ is full: submit first.
        """
        tail = self._local_tail
        if (tail - self._sq32[self._sq_head]) & 0xFFFFFFFF >= self.sq_entries:
            raise UringError(_errno.EBUSY, "io_uring submission queue full")
        off = (tail & self.sq_mask) * self.sqe_size
        self.sqes[off : off + self.sqe_size] = bytes(self.sqe_size)
        self._local_tail = (tail + 1) & 0xFFFFFFFF
        return off

    def push(self, slots: Sequence[int]) -> None:
        """Queue the SQEs in these slots (``sqes[slot * sqe_size:]``, filled by the caller),
        in this order, for the next submit. For owners that keep each SQE in a fixed slot
        instead of claiming the next free one: a slot is only rewritten once the kernel has
        issued what it held (which ``sqe`` cannot know, see ublk's queue). Do not mix with
        ``sqe`` on one ring."""
        need = len(slots)
        if need > self.sq_space:
            self.submit()
            if need > self.sq_space:
                raise UringError(_errno.EBUSY, "io_uring submission queue full")
        sq32, base, mask = self._sq32, self._sq_array, self.sq_mask
        tail = self._local_tail
        for slot in slots:
            sq32[base + (tail & mask)] = slot
            tail = (tail + 1) & 0xFFFFFFFF
        self._local_tail = tail

    def shared_addresses(self) -> dict[str, int]:
        """Addresses of the shared ring fields, for a compiled loop that drives this ring
        (ublk's fast path): sq_head, sq_tail, sq_array, cq_head, cq_tail, cqes, sqes."""
        sq = buffer_address(self._sq_map)
        cq = buffer_address(self._cq_map)
        return {
            "sq_head": sq + self._sq_head * 4, "sq_tail": sq + self._sq_tail * 4,
            "sq_array": sq + self._sq_array * 4, "cq_head": cq + self._cq_head * 4,
            "cq_tail": cq + self._cq_tail * 4, "cqes": cq + self._cqes_off,
            "sqes": buffer_address(self._sqe_map),
        }

    def publish(self) -> None:
        """Store the SQ tail so that every pushed SQE is visible (no syscall)."""
        self._publish()

    def resync(self) -> None:
        """Take the shared SQ tail as ours again, after a compiled loop queued SQEs itself."""
        self._local_tail = self._submitted_tail = int(self._sq32[self._sq_tail])

    def _publish(self) -> int:
        n = (self._local_tail - self._submitted_tail) & 0xFFFFFFFF
        if n:
            if _NEEDS_FENCE:
                _fence()  # SQE contents before the tail (store-release)
            self._sq32[self._sq_tail] = self._local_tail
            self._submitted_tail = self._local_tail
        return n

    def enter(
        self, to_submit: int, min_complete: int = 0, flags: int = 0, timeout: float | None = None
    ) -> int:
        """io_uring_enter(2), retrying on EINTR. With a timeout, -ETIME is returned as 0."""
        argp: int | None = None
        argsz = 0
        if timeout is not None and min_complete:
            if not self.features & IORING_FEAT_EXT_ARG:
                raise UringError(_errno.EOPNOTSUPP, "io_uring_enter timeout (kernel < 5.11)")
            if timeout != self._timeout:  # usually the same every call: pack it once
                sec = int(timeout)
                _TIMESPEC.pack_into(self._ts, 0, sec, int((timeout - sec) * 1e9))
                self._timeout = timeout
            argp = self._arg_addr
            argsz = _GETEVENTS_ARG.size
            flags |= IORING_ENTER_EXT_ARG
        if min_complete:
            flags |= IORING_ENTER_GETEVENTS
        while True:
            ret = _enter(SYS_io_uring_enter, self.fd, to_submit, min_complete, flags, argp, argsz)
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err == _errno.EINTR:
                # A signal: let Python run its handler (it may raise), then go on waiting.
                if to_submit and self._sq32[self._sq_head] == self._submitted_tail:
                    to_submit = 0
                continue
            if err == _errno.ETIME:
                return 0
            if err == _errno.EBUSY and to_submit:
                # CQ overflow backlog: the caller must reap before more can be submitted.
                return 0
            raise UringError(err, "io_uring_enter")

    def submit(self, wait: int = 0, timeout: float | None = None) -> int:
        """Publish filled SQEs and enter once; optionally wait for ``wait`` completions."""
        n = self._publish()
        # Without SQPOLL the kernel consumes every published SQE during enter; submit what
        # it has not yet consumed (a short submit leaves the rest for the next call).
        todo = (self._submitted_tail - self._sq32[self._sq_head]) & 0xFFFFFFFF
        if not todo and not wait:
            return 0
        submitted = self.enter(todo, wait, timeout=timeout)
        return submitted if todo else n

    # -- completion ---------------------------------------------------------------------

    def completions(self) -> list[tuple[int, int, int]]:
        """Reap every available CQE as (user_data, res, flags), oldest first."""
        cq32 = self._cq32
        head = cq32[self._cq_head]
        tail = cq32[self._cq_tail]
        count = (tail - head) & 0xFFFFFFFF
        if not count:
            return []
        if _NEEDS_FENCE:
            _fence()  # the tail before the CQEs (load-acquire)
        size = self.cqe_size
        first = head & self.cq_mask
        # The CQEs form at most two contiguous runs: up to the ring's end, then from its start.
        run = min(count, self.cq_entries - first)
        start = self._cqes_off + first * size
        out = list(self._iter_cqes(self._cq_buf[start : start + run * size]))
        if run < count:
            start = self._cqes_off
            out += self._iter_cqes(self._cq_buf[start : start + (count - run) * size])
        if _NEEDS_FENCE:
            _fence()  # the CQEs read before the head is released
        cq32[self._cq_head] = tail
        return out

    def wait(self, min_complete: int = 1, timeout: float | None = None) -> list[tuple[int, int, int]]:
        """Submit anything pending, wait for at least ``min_complete`` CQEs (or the timeout),
        and reap all that are available, with one io_uring_enter at most. An expired timeout
        returns what there is (maybe [])."""
        self._publish()
        todo = (self._submitted_tail - self._sq32[self._sq_head]) & 0xFFFFFFFF
        cq32 = self._cq32
        ready = (cq32[self._cq_tail] - cq32[self._cq_head]) & 0xFFFFFFFF
        if ready < min_complete:
            self.enter(todo, min_complete - ready, timeout=timeout)
        elif todo:
            self.enter(todo)
        return self.completions()

    @property
    def cq_overflow(self) -> int:
        return int(self._cq32[self._cq_overflow])

    # -- registration -------------------------------------------------------------------

    def register(self, opcode: int, arg: object, nr: int, operation: str) -> int:
        ret = _syscall(
            ctypes.c_long(SYS_io_uring_register),
            ctypes.c_uint(self.fd),
            ctypes.c_uint(opcode),
            arg,
            ctypes.c_uint(nr),
        )
        return _check(int(ret), operation)

    def register_files(self, fds: Sequence[int]) -> None:
        """Register files: SQEs then name them by index with IOSQE_FIXED_FILE."""
        arr = (ctypes.c_int32 * len(fds))(*fds)
        self.register(IORING_REGISTER_FILES, arr, len(fds), "io_uring_register(FILES)")

    def unregister_files(self) -> None:
        self.register(IORING_UNREGISTER_FILES, None, 0, "io_uring_register(UNREGISTER_FILES)")

    def register_buffers(self, buffers: Sequence[object]) -> None:
        """Register writable buffers (bytearray/mmap) for READ_FIXED/WRITE_FIXED by index."""
        iovs = (ctypes.c_uint64 * (2 * len(buffers)))()
        for i, buf in enumerate(buffers):
            iovs[2 * i] = buffer_address(buf)
            iovs[2 * i + 1] = memoryview(buf).nbytes  # type: ignore[arg-type]
        self.register(IORING_REGISTER_BUFFERS, iovs, len(buffers), "io_uring_register(BUFFERS)")
        self._registered_buffers = list(buffers)

    def unregister_buffers(self) -> None:
        self.register(IORING_UNREGISTER_BUFFERS, None, 0, "io_uring_register(UNREGISTER_BUFFERS)")
        self._registered_buffers = []

    # -- lifetime -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap and close (idempotent). In-flight requests are cancelled by the kernel."""
        if self._closed:
            return
        self._closed = True
        del self._arg_c, self._ts_c
        for view in ("sqes", "_cq_buf", "_sq32", "_cq32"):
            getattr(self, view).release()
        self._sqe_map.close()
        if self._cq_map is not self._sq_map:
            self._cq_map.close()
        self._sq_map.close()
        os.close(self.fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


def errno_name(res: int) -> str:
    """'ENOENT' for -2, for messages."""
    return _errno.errorcode.get(-res, str(res))
