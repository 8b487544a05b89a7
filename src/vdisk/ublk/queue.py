"""One ublk queue: a thread that owns its ring, its descriptor mapping and its tag buffers.

The thread is the queue's daemon as the kernel sees it (the task that issued FETCH_REQ), so
every command of the queue is submitted from it. The loop: wait for completions; for each new
request read the tag's descriptor, serve it and queue a COMMIT_AND_FETCH_REQ with the result;
submit the whole batch with one io_uring_enter.

Per request, Python does as little as it can: one descriptor unpack, and one or two 64-byte SQEs
copied from per-tag templates with a few fields patched. Metrics are counted in local lists and
handed over once per batch.

A backend that offers its file (``block.FileBacked``) gets a ``FileTarget``, which serves
READ, WRITE and FLUSH on that file: READ/WRITE linked to their commit on this ring (the fast
loop copies the target's templates), FLUSH as an FSYNC (see ``file_target``). A backend that
offers host extents (a qcow2 image's ``host_extents``) gets an ``ExtentTarget``: READs and
overwrites of clusters its table knows run on the image file the same way (see
``extent_target``). Everything else is served by calling the backend in this thread.

Host extents and tickets: the queue holds one of the image's I/O tickets at all times, so that
a host cluster whose table entry is cleared (a discard from another queue, say) is not reused
while this queue's I/O may still run on it. The compiled loop counts its extent I/O per epoch;
when freed clusters wait, the queue takes a new ticket, switches the epoch, and gives the old
ticket back once the old epoch's count is 0 (``_renew_ticket``).

Linux 6.12 reads a URING_CMD's SQE only when it issues the command, so every tag keeps its
SQEs in two fixed slots (see ``_build_templates`` and ``ring_layout``).
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

from ..uring import Ring, UringError, ops
from ..uring.ring import IORING_FEAT_CQE_SKIP, buffer_address
from . import fastpath, uapi
from .errors import UblkError, errno_of
from .extent_target import ExtentTarget
from .file_target import FileTarget, ServeFn
from .ring_layout import (
    BACKING,
    CDEV_SLOT,
    CMD,
    EXTENT,
    KIND_SHIFT,
    RESULT_OFFSET,
    RETRY,
    SQE_IO,
    SQE_IO_OFFSET,
    SQE_RESULT,
    SQE_SIZE,
    TAG_MASK,
    command_slot,
)

if TYPE_CHECKING:
    from ..block import BlockDevice
    from ..metrics import IoMetrics
    from ..qcow2.extents import HostExtents

log = logging.getLogger("vdisk.ublk.io")

PAGE_SIZE = mmap.PAGESIZE

_READ = uapi.UBLK_IO_OP_READ
_WRITE = uapi.UBLK_IO_OP_WRITE
_FLUSH = uapi.UBLK_IO_OP_FLUSH
#: how long a queue waits in io_uring_enter before it looks around (the loop's only timeout)
WAIT_TIMEOUT = 1.0


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
        #: the backing file's target, when the backend offers its file (set up in the thread)
        self.file: FileTarget | None = None
        #: per op code: READ/WRITE go to the backing file through the ring, linked to the commit
        #: (else they are served inline); the file target's list when there is one
        self.linked = [False, False]
        self.linked_sqe: list[list[bytes]] = []
        #: serves a request in this thread: the file target, else the backend
        self.serve_inline: ServeFn = self._serve_backend
        #: SQE slots filled since the last push, in submission order (see _build_templates)
        self.slots: list[int] = []
        #: the compiled loop (``fastpath``), or None: the pure-Python loop serves everything
        self.fast: fastpath.FastLoop | None = None
        #: the backend's host-extent table (qcow2), and this queue's tickets on the image:
        #: the current epoch's, and the previous epoch's until its I/O has ended
        self.extents: HostExtents | None = None
        self._ticket: int | None = None
        self._old_ticket: int | None = None
        self._old_epoch = 0
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
        if self.backing_fd is None:
            offer = getattr(self.backend, "host_extents", None)
            self.extents = offer() if callable(offer) else None
        extents = self.extents
        file_fd = self.backing_fd if extents is None else extents.fd
        files = [self.cdev_fd] + ([file_fd] if file_fd is not None else [])
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
        if self.backing_fd is not None:
            self._set_up_file(self.backing_fd)
        elif extents is not None:
            self._set_up_extents(extents)
        self.fast = self._fast_loop()
        if extents is not None:
            self._ticket = extents.hold()
            if self.fast is not None and isinstance(self.file, ExtentTarget):
                through = self.file.through_ring
                self.fast.set_extents(
                    extents.address(), extents.count, extents.cluster_bits,
                    [self.file.extent_sqe[op] if through[op] else [] for op in (0, 1)])
        if self.fast is not None and self.file is not None and not self.file.readonly:
            # What the file target would run inline (the kernel would punt it to a worker),
            # the compiled loop runs with pread/pwrite, without the GIL.
            file = self.file
            if isinstance(file, ExtentTarget):
                self.fast.set_inline(file.fd, [not file.through_ring[0], not file.through_ring[1]])
            else:
                self.fast.set_inline(file.fd, [not file.linked[0], not file.linked[1]],
                                     file.ring_sqe, fastpath.ring_min_len())
        for tag in range(depth):
            self._queue_cmd(self.op_fetch, tag, -1)
        self.ring.push(self.slots)
        self.slots.clear()
        self.ring.submit()
        self.active = depth

    def _set_up_file(self, fd: int) -> None:
        """Serve READ, WRITE and FLUSH on the backing file ``fd`` (registered in the ring)."""
        file = FileTarget(fd, self.backend, self.ring, self.buf_addr, self.buf_view,
                          self.slots, self._serve_backend, f"ublk{self.dev_id} q{self.q_id}")
        if self.ring.features & IORING_FEAT_CQE_SKIP:  # linking needs the success CQE skipped
            file.probe()
        self.file = file
        self.linked = file.linked
        self.linked_sqe = file.linked_sqe
        self.serve_inline = file.serve

    def _set_up_extents(self, extents: HostExtents) -> None:
        """Serve READs and overwrites at the image's host extents (registered file 1)."""
        file = ExtentTarget(extents.fd, self.backend, self.ring, self.buf_addr, self.buf_view,
                            self.slots, self._serve_backend, f"ublk{self.dev_id} q{self.q_id}")
        file.set_extents(extents)
        if self.ring.features & IORING_FEAT_CQE_SKIP:  # as the file target: same kernels
            file.probe()
        self.file = file
        self.linked = file.linked
        self.linked_sqe = file.linked_sqe
        self.serve_inline = file.serve

    def _renew_ticket(self) -> None:
        """Move this queue to a newer image ticket (freed clusters wait for the old one):
        take the new one and switch the epoch; give the old one back once no I/O of the old
        epoch is in flight (checked again on later calls)."""
        extents = self.extents
        assert extents is not None
        fast = self.fast
        if self._old_ticket is None:
            new = extents.hold()
            if fast is not None:
                self._old_epoch = fast.state.epoch
                fast.state.epoch = self._old_epoch ^ 1
            self._old_ticket, self._ticket = self._ticket, new
        if fast is None or fast.state.inflight[self._old_epoch] == 0:
            old, self._old_ticket = self._old_ticket, None
            if old is not None:
                extents.release(old)

    def _fast_loop(self) -> fastpath.FastLoop | None:
        """The compiled loop for this queue, when it can be built (see ``fastpath``)."""
        lib = fastpath.library()
        if lib is None:
            return None
        linked = [self.linked_sqe[op] if self.linked[op] else [] for op in (0, 1)]
        try:
            return fastpath.FastLoop(
                lib, self.ring, self.cdev_fd, uapi.desc_mmap_length(self.depth, PAGE_SIZE),
                uapi.desc_mmap_offset(self.q_id, PAGE_SIZE), self.bufs, self.buf_size,
                self.depth, self.commit_sqe, linked if self.file is not None else None,
                fastpath.is_null_backend(self.backend), RESULT_OFFSET, ops.RWF_DSYNC,
                WAIT_TIMEOUT, self.metrics is not None,
            )
        except OSError as exc:
            log.info("ublk%d q%d: fast path off: %s", self.dev_id, self.q_id, exc)
            return None

    def _queue_cmd(self, op: int, tag: int, result: int, kind: int = CMD) -> None:
        """Queue a command of ``tag`` (FETCH, COMMIT_AND_FETCH, NEED_GET_DATA) in its slot."""
        ops.CMD16_SQE.pack_into(
            self.ring.sqes, command_slot(tag) * SQE_SIZE, ops.IORING_OP_URING_CMD,
            ops.IOSQE_FIXED_FILE, 0, CDEV_SLOT, op, 0, 0, 0, 0, kind << KIND_SHIFT | tag, 0, 0, 0,
            self.q_id, tag, result, self.buf_addr[tag],
        )
        self.slots.append(command_slot(tag))

    def _build_templates(self) -> None:
        """Per-tag commit SQE images, so that the fast loop copies 64 bytes and patches a few
        fields instead of packing every field of every SQE (a file target has its own for the
        linked READ/WRITE).

        Each tag owns two SQE slots: 2*tag for its backing op, 2*tag+1 for its command. Linux
        6.12 reads a URING_CMD's SQE when it issues the command, not when it is submitted, and
        a linked commit is issued only after its backing op completes: by then a slot handed
        out round-robin may hold another command. A tag rewrites its own slots only after its
        next request arrived, which proves the kernel has issued what they held."""
        self.commit_sqe = [
            ops.CMD16_SQE.pack(ops.IORING_OP_URING_CMD, ops.IOSQE_FIXED_FILE, 0, CDEV_SLOT,
                               self.op_commit, 0, 0, 0, 0, tag, 0, 0, 0, self.q_id, tag, 0, addr)
            for tag, addr in enumerate(self.buf_addr)
        ]

    def _serve(self) -> None:
        ring = self.ring
        sqes = ring.sqes
        slots = self.slots
        queue_slot = slots.append
        unpack_desc = uapi.IO_DESC.unpack_from
        set_io = SQE_IO.pack_into
        set_result = SQE_RESULT.pack_into
        io_field = SQE_IO_OFFSET
        descs = self.desc_view
        addrs = self.buf_addr
        commit_sqe = self.commit_sqe
        linked_sqe = self.linked_sqe
        linked = self.linked
        counts, nbytes, errors = self._counts, self._bytes, self._errors
        serve_inline = self.serve_inline
        other_cqe = self._other_cqe
        clock = time.perf_counter_ns
        fua = uapi.UBLK_IO_F_FUA
        fast = self.fast
        metrics = self.metrics
        extents = self.extents
        while self.active > 0:
            try:
                if slots:
                    ring.push(slots)
                    slots.clear()
                cqes = fast.run() if fast is not None else ring.wait(1, timeout=WAIT_TIMEOUT)
            except UringError as exc:
                raise UblkError(exc.errno, f"queue {self.q_id}: io_uring_enter") from None
            t0 = clock()
            if extents is not None and (self._old_ticket is not None or extents.frees_waiting()):
                self._renew_ticket()
            if fast is not None and metrics is not None:
                for op, count, done, mean_ns in fast.take_tallies():
                    metrics.record_many(uapi.IO_OP_NAMES.get(op, "other"), count, done, mean_ns)
            for user_data, res, _flags in cqes:
                if res or user_data >> KIND_SHIFT:
                    other_cqe(user_data >> KIND_SHIFT, user_data & TAG_MASK, res)
                    continue
                tag = user_data  # a new request on this tag
                op_flags, nr_sectors, start_sector, _addr = unpack_desc(descs, tag * 24)
                op = op_flags & 0xFF
                res = nr_sectors << 9
                if op <= _WRITE and linked[op]:
                    off = tag << 7  # backing_slot(tag) * SQE_SIZE
                    sqes[off : off + 64] = linked_sqe[op][tag]
                    set_io(sqes, off + io_field, start_sector << 9, addrs[tag], res,
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
                off = (tag << 7) + 64  # command_slot(tag) * SQE_SIZE
                sqes[off : off + 64] = commit_sqe[tag]
                set_result(sqes, off + RESULT_OFFSET, res)
                queue_slot((tag << 1) + 1)
            if metrics is not None and cqes:
                self._flush_metrics(clock() - t0)

    def _flush_metrics(self, latency_ns: int) -> None:
        """Hand the batch's tallies to the metrics: each request of the batch took at most
        ``latency_ns`` from its arrival to its commit (the server's share of its latency)."""
        assert self.metrics is not None
        counts, nbytes, errors = self._counts, self._bytes, self._errors
        for op, name in uapi.IO_OP_NAMES.items():
            if counts[op] or errors[op]:  # a failed linked op may net a count of 0
                self.metrics.record_many(name, counts[op], nbytes[op], latency_ns, errors[op])
                counts[op] = nbytes[op] = errors[op] = 0

    # -- requests -----------------------------------------------------------------------

    def _serve_backend(
        self, tag: int, op: int, op_flags: int, offset: int, length: int
    ) -> int | None:
        """Run a request against the backend in this thread and return its result."""
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
            log.warning("ublk%d %s [%d, +%d): %s", self.dev_id, uapi.IO_OP_NAMES.get(op, op),
                        offset, length, exc)
            return -errno_of(exc)

    def _commit(self, tag: int, op: int, length: int, res: int, kind: int = CMD) -> None:
        self._counts[op] += 1
        if res >= 0:
            self._bytes[op] += length
        else:
            self._errors[op] += 1
        self._queue_cmd(self.op_commit, tag, res, kind)

    def _other_cqe(self, kind: int, tag: int, res: int) -> None:
        """Everything but a plain new request: backing completions, refused or cancelled
        commits, NEED_GET_DATA, aborts."""
        if kind >= BACKING:
            if kind == EXTENT and self.fast is not None:
                self.fast.extent_done(tag)
            self._backing_done(tag, res, kind != BACKING)
        elif res == uapi.UBLK_IO_RES_OK:  # a new request after a re-issued commit
            self._dispatch(tag)
        elif res == uapi.UBLK_IO_RES_NEED_GET_DATA:
            self._queue_cmd(self.op_get_data, tag, 0)
        elif res == -errno.ECANCELED:
            pass  # the commit linked to a failed backing op; _backing_done re-issues it
        elif res == -errno.EINVAL and kind == CMD and self.file is not None:
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
            assert self.file is not None
            self.file.submit_linked(tag, op, op_flags, start_sector << 9, length)
            self._commit(tag, op, length, length)
            return
        res = self.serve_inline(tag, op, op_flags, start_sector << 9, length)
        if res is not None:
            self._commit(tag, op, length, res)

    def _refused_commit(self, tag: int) -> None:
        """A linked commit ran on a kernel worker thread, which Linux 6.1 refuses. Its backing
        op succeeded (a failure would have cancelled the commit instead): commit from here."""
        _op_flags, nr_sectors, _start, _addr = uapi.IO_DESC.unpack_from(
            self.desc_view, tag * uapi.IO_DESC.size
        )
        self._queue_cmd(self.op_commit, tag, nr_sectors << 9, RETRY)

    def _backing_done(self, tag: int, res: int, linked: bool) -> None:
        """The CQE of the file target's op for ``tag`` (a FLUSH's FSYNC, or a linked
        READ/WRITE that failed or came up short, its commit cancelled): commit the outcome."""
        assert self.file is not None
        op_flags, nr_sectors, start_sector, _addr = uapi.IO_DESC.unpack_from(
            self.desc_view, tag * uapi.IO_DESC.size
        )
        op = op_flags & 0xFF
        length = nr_sectors << 9
        if linked:
            # It was counted as done when submitted: take that back, _commit counts the outcome.
            self._counts[op] -= 1
            self._bytes[op] -= length
        res = self.file.finish(tag, op, op_flags, start_sector << 9, length, res)
        self._commit(tag, op, length, res)

    # -- teardown -----------------------------------------------------------------------

    def _teardown(self) -> None:
        fast = getattr(self, "fast", None)
        if fast is not None:
            fast.close()
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()
        if self.extents is not None:  # the ring is gone: none of its I/O runs any more
            for ticket in (self._ticket, self._old_ticket):
                if ticket is not None:
                    self.extents.release(ticket)
            self._ticket = self._old_ticket = None
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
