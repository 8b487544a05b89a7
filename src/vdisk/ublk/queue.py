"""One ublk queue: a thread that owns its ring, its descriptor mapping and its tag buffers.

The thread is the queue's daemon as the kernel sees it (the task that issued FETCH_REQ), so
every command of the queue is submitted from it. The loop: wait for completions; for each new
request read the tag's descriptor, serve it and queue a COMMIT_AND_FETCH_REQ with the result;
submit the whole batch with one io_uring_enter.

Per request, Python does as little as it can: one descriptor unpack, and one or two 64-byte SQEs
copied from per-tag templates with a few fields patched. Metrics are counted in local lists and
handed over once per batch.

Raw-file backends run READ and WRITE on the same ring, linked to their commit
(READ -> COMMIT_AND_FETCH, the READ's success CQE skipped), so the kernel does the I/O and the
commit in one io_uring_enter and Python sees one completion per request. Two kernel behaviours
shape this:

- A failed or short READ/WRITE cancels the linked commit and posts its own CQE; the commit is
  then issued on its own with the finished result.
- Where the kernel cannot run a READ or WRITE on the file without blocking, io_uring hands
  each one to a worker thread (6.1 does so for every buffered write, 6.12 for buffered I/O on
  tmpfs and overlayfs), and that hop costs far more than the page-cache copy (measured in the
  test VM: 0.4-3 ms against 40-70 us). The queue asks at start-up (``_probe_punts``) and does
  such ops inline with ``preadv``/``pwritev`` instead, as the loop driver does.
- Linux 6.1 refuses (EINVAL) a ublk command run by an io_uring worker thread, which is where a
  linked commit lands when a READ/WRITE still gets punted (say, an uncached page). The commit
  is then re-issued from this thread.
- Linux 6.12 reads a URING_CMD's SQE only when it issues the command, so every tag keeps its
  SQEs in two fixed slots (see ``_build_templates``).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import VdiskError
from ..uring import Ring, UringError, ops
from ..uring.ring import IORING_FEAT_CQE_SKIP, buffer_address
from . import uapi
from .errors import UblkError

if TYPE_CHECKING:
    from ..block import BlockDevice
    from ..metrics import IoMetrics

log = logging.getLogger("vdisk.ublk.io")

PAGE_SIZE = mmap.PAGESIZE

# user_data = kind << 16 | tag
_KIND_SHIFT = 16
_TAG_MASK = 0xFFFF
_CMD = 0  # FETCH_REQ, COMMIT_AND_FETCH_REQ or NEED_GET_DATA of a tag
_RETRY = 1  # a commit re-issued from this thread after the kernel refused its linked twin
_BACKING = 2  # an FSYNC on the backing file (its commit follows its CQE), or the start-up probe
_LINKED_BACKING = 3  # READ or WRITE linked to its commit: a CQE only on failure or short I/O

_READ = uapi.UBLK_IO_OP_READ
_WRITE = uapi.UBLK_IO_OP_WRITE
_FLUSH = uapi.UBLK_IO_OP_FLUSH
_OP_NAMES = {
    _READ: "read",
    _WRITE: "write",
    _FLUSH: "flush",
    uapi.UBLK_IO_OP_DISCARD: "discard",
    uapi.UBLK_IO_OP_WRITE_ZEROES: "write_zeroes",
}
_RW_OPCODE = (ops.IORING_OP_READ, ops.IORING_OP_WRITE)

# Registered file slots in each queue ring.
_CDEV_SLOT = 0
_BACKING_SLOT = 1

# Fields patched into SQE templates: off, addr, len, rw_flags at byte 8; io_cmd.result.
_SQE_IO = struct.Struct("<QQII")
_SQE_RESULT = struct.Struct("<i")
_RESULT_OFFSET = ops.CMD_OFFSET + 4

_LINKED = ops.IOSQE_FIXED_FILE | ops.IOSQE_IO_LINK | ops.IOSQE_CQE_SKIP_SUCCESS


def _thread_named(name: str) -> bool:
    """Does this process have a thread (kernel workers included) called ``name``?"""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return True
        except OSError:
            continue
    return False


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
        cpus: set[int] | None = None,
    ) -> None:
        super().__init__(name=f"ublk{info.dev_id}-q{q_id}", daemon=True)
        self.q_id = q_id
        self.cdev_fd = cdev_fd
        self.depth = info.queue_depth
        self.buf_size = info.max_io_buf_bytes
        self.dev_id = info.dev_id
        self.backend = backend
        self.metrics = metrics
        self.backing_fd = backing_fd
        self.on_exit = on_exit
        self.cpus = cpus
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
        #: per op code: READ/WRITE go to the backing file through the ring, linked to the commit
        #: (else the backend serves them inline)
        self.linked = [False, False]
        #: SQE slots filled since the last push, in submission order (see _build_templates)
        self.slots: list[int] = []
        # Per-batch metric tallies, indexed by op code (any u8: unknown ops fail, but count).
        self._counts = [0] * 256
        self._bytes = [0] * 256
        self._errors = [0] * 256

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
        if self.cpus:
            # Run where blk-mq submits this queue's requests (as ublksrv does): the kernel then
            # hands each request over on the same CPU, without waking another one.
            try:
                os.sched_setaffinity(0, self.cpus)
            except OSError as exc:  # e.g. a cpuset that excludes them: serve unpinned
                log.info("ublk%d q%d: cannot pin to CPUs %s: %s", self.dev_id, self.q_id,
                         sorted(self.cpus), exc)
        depth = self.depth
        # Each tag owns two SQE slots (see _build_templates).
        entries = 1 << max(2 * depth - 1, 1).bit_length()
        self.ring = Ring(entries)
        if self.ring.sq_entries < 2 * depth or self.ring.sqe_size != 64:
            raise UblkError(errno.EINVAL, f"queue {self.q_id}: io_uring too small for depth {depth}")
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
            raise UblkError(
                exc.errno or errno.EIO, f"mmap descriptors of queue {self.q_id}"
            ) from None
        self.desc_view = memoryview(self.descs)
        self.bufs = mmap.mmap(-1, depth * self.buf_size)
        base = buffer_address(self.bufs)
        self.buf_addr = [base + tag * self.buf_size for tag in range(depth)]
        whole = memoryview(self.bufs)
        self.buf_view = [whole[t * self.buf_size : (t + 1) * self.buf_size] for t in range(depth)]
        self.whole = whole
        self.active = 0
        self._build_templates()
        if self.backing_fd is not None and self.ring.features & IORING_FEAT_CQE_SKIP:
            read_punts, write_punts = self._probe_punts()
            self.linked = [not read_punts, not write_punts]
        for tag in range(depth):
            self._queue_cmd(self.op_fetch, tag, -1)
        self.ring.push(self.slots)
        self.slots.clear()
        self.ring.submit()
        self.active = depth

    def _queue_cmd(self, op: int, tag: int, result: int, kind: int = _CMD) -> None:
        """Queue a command of ``tag`` (FETCH, COMMIT_AND_FETCH, NEED_GET_DATA) in its slot."""
        ops.CMD16_SQE.pack_into(
            self.ring.sqes, (2 * tag + 1) * 64, ops.IORING_OP_URING_CMD, ops.IOSQE_FIXED_FILE, 0,
            _CDEV_SLOT, op, 0, 0, 0, 0, kind << _KIND_SHIFT | tag, 0, 0, 0, self.q_id, tag,
            result, self.buf_addr[tag],
        )
        self.slots.append(2 * tag + 1)

    def _build_templates(self) -> None:
        """Per-tag SQE images, so that the fast loop copies 64 bytes and patches a few fields
        instead of packing every field of every SQE.

        Each tag owns two SQE slots: 2*tag for its backing op, 2*tag+1 for its command. Linux
        6.12 reads a URING_CMD's SQE when it issues the command, not when it is submitted, and
        a linked commit is issued only after its backing op completes: by then a slot handed
        out round-robin may hold another command. A tag rewrites its own slots only after its
        next request arrived, which proves the kernel has issued what they held."""
        cmd, rw = ops.CMD16_SQE, ops.RW_SQE
        self.commit_sqe = [
            cmd.pack(ops.IORING_OP_URING_CMD, ops.IOSQE_FIXED_FILE, 0, _CDEV_SLOT, self.op_commit,
                     0, 0, 0, 0, tag, 0, 0, 0, self.q_id, tag, 0, addr)
            for tag, addr in enumerate(self.buf_addr)
        ]
        self.linked_sqe = [
            [rw.pack(opcode, _LINKED, 0, _BACKING_SLOT, 0, addr, 0, 0,
                     _LINKED_BACKING << _KIND_SHIFT | tag, 0, 0, 0)
             for tag, addr in enumerate(self.buf_addr)]
            for opcode in _RW_OPCODE
        ]

    def _probe_punts(self) -> tuple[bool, bool]:
        """Would the kernel hand this file's READs / WRITEs to an io_uring worker thread? Asked
        by running one of each (a cached 4 KiB READ, a 0-byte WRITE) and looking for this
        thread's io-wq worker, which the kernel names iou-wrk-TID."""
        from ..backends.raw import pread_full

        assert self.backing_fd is not None
        pread_full(self.backing_fd, self.buf_view[0][:4096], 0)  # in the page cache now
        worker = f"iou-wrk-{threading.get_native_id()}"
        punts: list[bool] = []
        for opcode, length in zip(_RW_OPCODE, (4096, 0), strict=True):
            if not punts or not punts[-1]:  # once a worker exists, later ops cannot be told
                ops.RW_SQE.pack_into(self.ring.sqes, 0, opcode, ops.IOSQE_FIXED_FILE, 0,
                                     _BACKING_SLOT, 0, self.buf_addr[0], length, 0,
                                     _BACKING << _KIND_SHIFT, 0, 0, 0)
                self.ring.push([0])
                self.ring.wait(1, timeout=5.0)
            punts.append(_thread_named(worker))
        log.info("ublk%d q%d: backing READs %s, WRITEs %s", self.dev_id, self.q_id,
                 *("inline" if p else "through io_uring" for p in punts))
        return punts[0], punts[1]

    def _serve(self) -> None:
        ring = self.ring
        sqes = ring.sqes
        slots = self.slots
        queue_slot = slots.append
        unpack_desc = uapi.IO_DESC.unpack_from
        set_io = _SQE_IO.pack_into
        set_result = _SQE_RESULT.pack_into
        descs = self.desc_view
        addrs = self.buf_addr
        commit_sqe = self.commit_sqe
        linked_sqe = self.linked_sqe
        linked = self.linked
        counts, nbytes, errors = self._counts, self._bytes, self._errors
        serve_inline = self._serve_inline
        other_cqe = self._other_cqe
        clock = time.perf_counter_ns
        fua = uapi.UBLK_IO_F_FUA
        while self.active > 0:
            try:
                if slots:
                    ring.push(slots)
                    slots.clear()
                cqes = ring.wait(1, timeout=1.0)
            except UringError as exc:
                raise UblkError(exc.errno, f"queue {self.q_id}: io_uring_enter") from None
            t0 = clock()
            for user_data, res, _flags in cqes:
                if res or user_data >> _KIND_SHIFT:
                    other_cqe(user_data >> _KIND_SHIFT, user_data & _TAG_MASK, res)
                    continue
                tag = user_data  # a new request on this tag
                op_flags, nr_sectors, start_sector, _addr = unpack_desc(descs, tag * 24)
                op = op_flags & 0xFF
                res = nr_sectors << 9
                if op <= _WRITE and linked[op]:
                    off = tag << 7  # slot 2 * tag
                    sqes[off : off + 64] = linked_sqe[op][tag]
                    set_io(sqes, off + 8, start_sector << 9, addrs[tag], res,
                           ops.RWF_DSYNC if op_flags & fua else 0)
                    queue_slot(tag << 1)
                else:
                    result = serve_inline(tag, op, op_flags, start_sector << 9, res)
                    if result is None:  # an unlinked backing op: the commit follows its CQE
                        continue
                    res = result
                counts[op] += 1
                if res >= 0:
                    nbytes[op] += nr_sectors << 9
                else:
                    errors[op] += 1
                off = (tag << 7) + 64  # slot 2 * tag + 1
                sqes[off : off + 64] = commit_sqe[tag]
                set_result(sqes, off + _RESULT_OFFSET, res)
                queue_slot((tag << 1) + 1)
            if self.metrics is not None:
                self._flush_metrics(clock() - t0)

    def _flush_metrics(self, latency_ns: int) -> None:
        """Hand the batch's tallies to the metrics: each request of the batch took at most
        ``latency_ns`` from its arrival to its commit (the server's share of its latency)."""
        assert self.metrics is not None
        counts, nbytes, errors = self._counts, self._bytes, self._errors
        for op, name in _OP_NAMES.items():
            if counts[op]:
                self.metrics.record_many(name, counts[op], nbytes[op], latency_ns, errors[op])
                counts[op] = nbytes[op] = errors[op] = 0

    # -- requests -----------------------------------------------------------------------

    def _serve_inline(
        self, tag: int, op: int, op_flags: int, offset: int, length: int
    ) -> int | None:
        """Run a request against the backend in this thread and return its result, or start a
        raw file's FLUSH through the ring (an FSYNC) and return None."""
        fd = self.backing_fd
        if fd is not None:
            if op == _FLUSH:
                self._submit_fsync(tag)
                return None
            if op <= _WRITE and not self.backend.readonly:
                # A READ/WRITE the kernel would punt to a worker (see _probe_punts): one
                # syscall here, without the backend's per-call checks (the kernel only sends
                # requests inside the device).
                view = self.buf_view[tag][:length]
                try:
                    done = os.preadv(fd, [view], offset) if op == _READ else os.pwritev(
                        fd, [view], offset)
                    fua = bool(op_flags & uapi.UBLK_IO_F_FUA)
                    if done < length:
                        return self._complete_short(tag, op, offset, length, done, fua)
                    if fua and op == _WRITE:
                        os.fdatasync(fd)
                    return length
                except OSError as exc:
                    log.warning("ublk%d %s [%d, +%d): %s", self.dev_id, _OP_NAMES[op], offset,
                                length, exc)
                    return -(exc.errno or errno.EIO)
        backend = self.backend
        try:
            if op == _READ:
                backend.readinto(self.buf_view[tag][:length], offset)
                return length
            if op == _WRITE:
                backend.write(
                    self.buf_view[tag][:length], offset, fua=bool(op_flags & uapi.UBLK_IO_F_FUA)
                )
                return length
            if op == _FLUSH:
                backend.flush()
            elif op == uapi.UBLK_IO_OP_DISCARD:
                backend.discard(offset, length)
            elif op == uapi.UBLK_IO_OP_WRITE_ZEROES:
                backend.write_zeroes(
                    offset, length, may_unmap=not op_flags & uapi.UBLK_IO_F_NOUNMAP
                )
            else:  # no such op in the UAPI we speak: fail it, count it as "other"
                if self.metrics is not None:
                    self.metrics.record("other", length, 0, error=True)
                return -errno.EOPNOTSUPP
            return 0
        except Exception as exc:
            log.warning(
                "ublk%d %s [%d, +%d): %s", self.dev_id, _OP_NAMES.get(op, op), offset, length, exc
            )
            return -_errno_of(exc)

    def _commit(self, tag: int, op: int, length: int, res: int, kind: int = _CMD) -> None:
        self._counts[op] += 1
        if res >= 0:
            self._bytes[op] += length
        else:
            self._errors[op] += 1
        self._queue_cmd(self.op_commit, tag, res, kind)

    def _other_cqe(self, kind: int, tag: int, res: int) -> None:
        """Everything but a plain new request: backing completions, refused or cancelled
        commits, NEED_GET_DATA, aborts."""
        if kind >= _BACKING:
            self._backing_done(tag, res, kind == _LINKED_BACKING)
        elif res == uapi.UBLK_IO_RES_OK:  # a new request after a re-issued commit
            self._dispatch(tag)
        elif res == uapi.UBLK_IO_RES_NEED_GET_DATA:
            self._queue_cmd(self.op_get_data, tag, 0)
        elif res == -errno.ECANCELED:
            pass  # the commit linked to a failed backing op; _backing_done re-issues it
        elif res == -errno.EINVAL and kind == _CMD and self.backing_fd is not None:
            self._refused_commit(tag)
        else:
            # ABORT (-ENODEV): the device is going away; this tag is done.
            if res != uapi.UBLK_IO_RES_ABORT:
                log.warning(
                    "ublk%d q%d tag %d: command failed: %s",
                    self.dev_id,
                    self.q_id,
                    tag,
                    os.strerror(-res),
                )
            self.active -= 1

    def _dispatch(self, tag: int) -> None:
        """Serve a new request outside the fast loop (same outcome, one request)."""
        op_flags, nr_sectors, start_sector, _addr = uapi.IO_DESC.unpack_from(
            self.desc_view, tag * uapi.IO_DESC.size
        )
        op = op_flags & 0xFF
        length = nr_sectors << 9
        if op <= _WRITE and self.linked[op]:
            self._submit_linked(tag, op, op_flags, start_sector << 9, length)
            return
        res = self._serve_inline(tag, op, op_flags, start_sector << 9, length)
        if res is not None:
            self._commit(tag, op, length, res)

    def _submit_linked(self, tag: int, op: int, op_flags: int, offset: int, length: int) -> None:
        """READ/WRITE on the backing file and its commit as one link (the fast loop inlines
        this)."""
        rw_flags = ops.RWF_DSYNC if op_flags & uapi.UBLK_IO_F_FUA else 0
        ops.RW_SQE.pack_into(
            self.ring.sqes, 2 * tag * 64, _RW_OPCODE[op], _LINKED, 0, _BACKING_SLOT, offset,
            self.buf_addr[tag], length, rw_flags, _LINKED_BACKING << _KIND_SHIFT | tag, 0, 0, 0,
        )
        self.slots.append(2 * tag)
        self._commit(tag, op, length, length)

    def _refused_commit(self, tag: int) -> None:
        """A linked commit ran on a kernel worker thread, which Linux 6.1 refuses. Its backing
        op succeeded (a failure would have cancelled the commit instead): commit from here."""
        _op_flags, nr_sectors, _start, _addr = uapi.IO_DESC.unpack_from(
            self.desc_view, tag * uapi.IO_DESC.size
        )
        self._queue_cmd(self.op_commit, tag, nr_sectors << 9, _RETRY)

    # -- the backing file through the ring ----------------------------------------------

    def _submit_fsync(self, tag: int) -> None:
        """A FLUSH as an unlinked FSYNC: its CQE always comes, and the commit follows it."""
        ops.RW_SQE.pack_into(self.ring.sqes, 2 * tag * 64, ops.IORING_OP_FSYNC,
                             ops.IOSQE_FIXED_FILE, 0, _BACKING_SLOT, 0, 0, 0,
                             ops.IORING_FSYNC_DATASYNC, _BACKING << _KIND_SHIFT | tag, 0, 0, 0)
        self.slots.append(2 * tag)

    def _backing_done(self, tag: int, res: int, linked: bool) -> None:
        """The CQE of a FLUSH's FSYNC, or of a linked READ/WRITE that failed or came up short
        (its commit was cancelled): finish the request and commit it."""
        op_flags, nr_sectors, start_sector, _addr = uapi.IO_DESC.unpack_from(
            self.desc_view, tag * uapi.IO_DESC.size
        )
        op = op_flags & 0xFF
        offset = start_sector << 9
        length = nr_sectors << 9
        if linked:
            # It was counted as done when submitted: take that back, _commit counts the outcome.
            self._counts[op] -= 1
            self._bytes[op] -= length
        if res < 0:
            log.warning(
                "ublk%d %s [%d, +%d): %s",
                self.dev_id,
                _OP_NAMES.get(op, op),
                offset,
                length,
                os.strerror(-res),
            )
        elif op == _FLUSH:
            res = 0
        else:  # short: finish the rest here
            res = self._complete_short(tag, op, offset, length, res,
                                       bool(op_flags & uapi.UBLK_IO_F_FUA))
        self._commit(tag, op, length, res)

    def _complete_short(
        self, tag: int, op: int, offset: int, length: int, done: int, fua: bool
    ) -> int:
        """Finish a short READ/WRITE synchronously (rare: EOF or a signal)."""
        from ..backends.raw import pread_full, pwrite_full

        assert self.backing_fd is not None
        view = self.buf_view[tag][done:length]
        try:
            if op == _READ:
                pread_full(self.backing_fd, view, offset + done)
            else:
                pwrite_full(self.backing_fd, view, offset + done)
                if fua:
                    os.fdatasync(self.backing_fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return length

    # -- teardown -----------------------------------------------------------------------

    def _teardown(self) -> None:
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()
        for view in getattr(self, "buf_view", []):
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
