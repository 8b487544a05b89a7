"""One ublk queue: a thread that owns its ring, its descriptor mapping and its tag buffers.

The thread is the queue's daemon as the kernel sees it (the task that issued FETCH_REQ), so
every command of the queue is submitted from it. The loop: wait for completions; for each
ublk completion read the tag's descriptor, run the request against the backend and queue a
COMMIT_AND_FETCH_REQ with the result; submit all of a batch's commits with one io_uring_enter.
Raw-file backends go asynchronous: the request becomes a READ/WRITE/FSYNC on the same ring and
the commit follows its completion.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import VdiskError
from ..uring import Ring, UringError, ops
from ..uring.ring import buffer_address
from . import uapi
from .errors import UblkError

if TYPE_CHECKING:
    from ..block import BlockDevice
    from ..metrics import IoMetrics

log = logging.getLogger("vdisk.ublk.io")

PAGE_SIZE = mmap.PAGESIZE
_KIND_SHIFT = 16
_KIND_UBLK = 0
_KIND_BACKING = 1
_TAG_MASK = 0xFFFF

_OP_NAMES = {
    uapi.UBLK_IO_OP_READ: "read",
    uapi.UBLK_IO_OP_WRITE: "write",
    uapi.UBLK_IO_OP_FLUSH: "flush",
    uapi.UBLK_IO_OP_DISCARD: "discard",
    uapi.UBLK_IO_OP_WRITE_ZEROES: "write_zeroes",
}

# Registered file slots in each queue ring.
_CDEV_SLOT = 0
_BACKING_SLOT = 1


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, VdiskError | OSError) and exc.errno:
        return int(exc.errno)
    return errno.EIO


class Queue(threading.Thread):
    """The daemon thread of queue ``q_id``."""

    def __init__(
        self,
        q_id: int,
        cdev_fd: int,
        info: uapi.DevInfo,
        backend: BlockDevice,
        metrics: IoMetrics | None,
        encoded: bool,
        backing_fd: int | None = None,
        on_exit: Callable[[Queue], None] | None = None,
    ) -> None:
        super().__init__(name=f"ublk{info.dev_id}-q{q_id}", daemon=True)
        self.q_id = q_id
        self.cdev_fd = cdev_fd
        self.depth = info.queue_depth
        self.buf_size = info.max_io_buf_bytes
        self.dev_id = info.dev_id
        self.need_get_data = bool(info.flags & uapi.UBLK_F_NEED_GET_DATA)
        self.backend = backend
        self.metrics = metrics
        self.backing_fd = backing_fd
        self.on_exit = on_exit
        if encoded:
            self.op_fetch = uapi.ioctl_encode_io(uapi.UBLK_IO_FETCH_REQ)
            self.op_commit = uapi.ioctl_encode_io(uapi.UBLK_IO_COMMIT_AND_FETCH_REQ)
            self.op_get_data = uapi.ioctl_encode_io(uapi.UBLK_IO_NEED_GET_DATA)
        else:
            self.op_fetch = uapi.UBLK_IO_FETCH_REQ
            self.op_commit = uapi.UBLK_IO_COMMIT_AND_FETCH_REQ
            self.op_get_data = uapi.UBLK_IO_NEED_GET_DATA
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = False
        self.requests = 0
        self._inflight: dict[int, tuple[int, int, int, int]] = {}

    # -- thread body --------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._setup()
            self.ready.set()
            self._serve()
        except BaseException as exc:  # the Device reports it; the thread must not die noisily
            self.error = exc
            log.error("queue %d of ublk%d failed: %s", self.q_id, self.dev_id, exc)
        finally:
            self.ready.set()
            self._teardown()
            if self.on_exit is not None:
                self.on_exit(self)

    def _setup(self) -> None:
        depth = self.depth
        entries = 1 << max(2 * depth - 1, 1).bit_length()
        self.ring = Ring(entries)
        files = [self.cdev_fd] + ([self.backing_fd] if self.backing_fd is not None else [])
        self.ring.register_files(files)
        try:
            self.descs = mmap.mmap(
                self.cdev_fd,
                uapi.desc_mmap_length(depth, PAGE_SIZE),
                mmap.MAP_SHARED,
                mmap.PROT_READ,
                offset=uapi.desc_mmap_offset(self.q_id, PAGE_SIZE),
            )
        except OSError as exc:
            raise UblkError(exc.errno or errno.EIO, f"mmap descriptors of queue {self.q_id}") from None
        self.desc_view = memoryview(self.descs)
        self.bufs = mmap.mmap(-1, depth * self.buf_size)
        base = buffer_address(self.bufs)
        self.buf_addr = [base + tag * self.buf_size for tag in range(depth)]
        whole = memoryview(self.bufs)
        self.buf_view = [whole[t * self.buf_size : (t + 1) * self.buf_size] for t in range(depth)]
        self.whole = whole
        self.active = 0
        for tag in range(depth):
            self._queue_cmd(self.op_fetch, tag, -1)
        self.ring.submit()
        self.active = depth

    def _queue_cmd(self, op: int, tag: int, result: int) -> None:
        ring = self.ring
        if not ring.sq_space:
            ring.submit()
        off = ops.uring_cmd_into(ring, _CDEV_SLOT, op, tag, ops.IOSQE_FIXED_FILE)
        uapi.IO_CMD.pack_into(ring.sqes, off, self.q_id, tag, result, self.buf_addr[tag])

    def _serve(self) -> None:
        ring = self.ring
        unpack_desc = uapi.IO_DESC.unpack_from
        desc_view = self.desc_view
        desc_size = uapi.IO_DESC.size
        handle = self._handle
        backing_done = self._backing_done
        commit = self.op_commit
        while self.active > 0:
            try:
                cqes = ring.wait(1, timeout=1.0)
            except UringError as exc:
                raise UblkError(exc.errno, f"queue {self.q_id}: io_uring_enter") from None
            for user_data, res, _flags in cqes:
                tag = user_data & _TAG_MASK
                if user_data >> _KIND_SHIFT == _KIND_BACKING:
                    backing_done(tag, res)
                elif res == uapi.UBLK_IO_RES_OK:
                    op_flags, nr_sectors, start_sector, _addr = unpack_desc(
                        desc_view, tag * desc_size
                    )
                    handle(tag, op_flags, start_sector, nr_sectors, commit)
                elif res == uapi.UBLK_IO_RES_NEED_GET_DATA:
                    self._queue_cmd(self.op_get_data, tag, 0)
                else:
                    # ABORT (-ENODEV): the device is going away; this tag is done.
                    if res != uapi.UBLK_IO_RES_ABORT:
                        log.warning("ublk%d q%d tag %d: command failed: %s", self.dev_id,
                                    self.q_id, tag, os.strerror(-res))
                    self.active -= 1
        log.info("ublk%d queue %d: every tag aborted, exiting", self.dev_id, self.q_id)

    # -- requests -----------------------------------------------------------------------

    def _handle(
        self, tag: int, op_flags: int, start_sector: int, nr_sectors: int, commit_op: int
    ) -> None:
        self.requests += 1
        op = op_flags & 0xFF
        offset = start_sector << 9
        length = nr_sectors << 9
        t0 = time.perf_counter_ns()
        if self.backing_fd is not None and op <= uapi.UBLK_IO_OP_FLUSH:
            self._submit_backing(tag, op, op_flags, offset, length, t0)
            return
        backend = self.backend
        try:
            if op == uapi.UBLK_IO_OP_READ:
                backend.readinto(self.buf_view[tag][:length], offset)
                res = length
            elif op == uapi.UBLK_IO_OP_WRITE:
                backend.write(
                    self.buf_view[tag][:length], offset, fua=bool(op_flags & uapi.UBLK_IO_F_FUA)
                )
                res = length
            elif op == uapi.UBLK_IO_OP_FLUSH:
                backend.flush()
                res = 0
            elif op == uapi.UBLK_IO_OP_DISCARD:
                backend.discard(offset, length)
                res = 0
            elif op == uapi.UBLK_IO_OP_WRITE_ZEROES:
                backend.write_zeroes(
                    offset, length, may_unmap=not op_flags & uapi.UBLK_IO_F_NOUNMAP
                )
                res = 0
            else:
                res = -errno.EOPNOTSUPP
        except Exception as exc:
            res = -_errno_of(exc)
            log.warning("ublk%d %s [%d, +%d): %s", self.dev_id, _OP_NAMES.get(op, op), offset,
                        length, exc)
        self._finish(tag, op, length, res, t0)

    def _finish(self, tag: int, op: int, length: int, res: int, t0: int) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.record(
                _OP_NAMES.get(op, "other"), length, time.perf_counter_ns() - t0, error=res < 0
            )
        self._queue_cmd(self.op_commit, tag, res)

    # -- asynchronous raw-file path -----------------------------------------------------

    def _submit_backing(
        self, tag: int, op: int, op_flags: int, offset: int, length: int, t0: int
    ) -> None:
        ring = self.ring
        if ring.sq_space < 1:
            ring.submit()
        user_data = (_KIND_BACKING << _KIND_SHIFT) | tag
        self._inflight[tag] = (op, offset, length, t0)
        flags = ops.IOSQE_FIXED_FILE
        if op == uapi.UBLK_IO_OP_READ:
            ops.rw(ring, ops.IORING_OP_READ, _BACKING_SLOT, self.buf_addr[tag], length, offset,
                   user_data, flags=flags)
        elif op == uapi.UBLK_IO_OP_WRITE:
            rw_flags = ops.RWF_DSYNC if op_flags & uapi.UBLK_IO_F_FUA else 0
            ops.rw(ring, ops.IORING_OP_WRITE, _BACKING_SLOT, self.buf_addr[tag], length, offset,
                   user_data, flags=flags, rw_flags=rw_flags)
        else:
            ops.fsync(ring, _BACKING_SLOT, user_data, datasync=True, flags=flags)

    def _backing_done(self, tag: int, res: int) -> None:
        op, offset, length, t0 = self._inflight.pop(tag)
        if res >= 0 and op != uapi.UBLK_IO_OP_FLUSH:
            res = self._complete_short(tag, op, offset, length, res) if res < length else length
        elif res >= 0:
            res = 0
        elif res < 0:
            log.warning("ublk%d %s [%d, +%d): %s", self.dev_id, _OP_NAMES.get(op, op), offset,
                        length, os.strerror(-res))
        self._finish(tag, op, length, res, t0)

    def _complete_short(self, tag: int, op: int, offset: int, length: int, done: int) -> int:
        """Finish a short READ/WRITE synchronously (rare: EOF or a signal)."""
        from ..backends.raw import pread_full, pwrite_full

        assert self.backing_fd is not None
        view = self.buf_view[tag][done:length]
        try:
            if op == uapi.UBLK_IO_OP_READ:
                pread_full(self.backing_fd, view, offset + done)
            else:
                pwrite_full(self.backing_fd, view, offset + done)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return length

    # -- teardown -----------------------------------------------------------------------

    def _teardown(self) -> None:
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()
        for name in ("buf_view",):
            for view in getattr(self, name, []):
                view.release()
        for name in ("whole", "desc_view"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()
        for name in ("bufs", "descs"):
            m = getattr(self, name, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass
