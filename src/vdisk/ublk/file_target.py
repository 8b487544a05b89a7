"""The file target: a queue's READ, WRITE and FLUSH run on the backing file itself, through
the queue's own ring, for a backend that offers its file (``block.FileBacked``).

READ and WRITE are linked to their commit (READ -> COMMIT_AND_FETCH, the READ's success CQE
skipped), so the kernel does the I/O and the commit in one io_uring_enter and Python sees one
completion per request; the queue's fast loop copies this target's per-tag templates
(``linked_sqe``) itself. FLUSH is an unlinked FSYNC whose CQE triggers the commit. Kernel
behaviours that shape this:

- A failed or short READ/WRITE cancels the linked commit and posts its own CQE; ``finish``
  completes it and the queue commits the result on its own.
- Where the kernel cannot run a READ or WRITE on the file without blocking, io_uring hands
  each one to a worker thread (6.1 does so for every buffered write, 6.12 for buffered I/O on
  tmpfs and overlayfs), and that hop costs far more than the page-cache copy (measured in the
  test VM: 0.4-3 ms against 40-70 us). ``probe`` asks at start-up, and such ops run inline
  instead, as the loop driver does: in the compiled loop (pread/pwrite, without the GIL), or
  in ``serve`` (``preadv``/``pwritev``) for what the compiled loop hands back (FUA writes,
  short or failed I/O, which it runs again whole) and when there is no compiled loop.
- Linux 6.1 refuses (EINVAL) a ublk command run by an io_uring worker thread, which is where a
  linked commit lands when a READ/WRITE still gets punted (say, an uncached page). The queue
  then re-issues the commit from its own thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..uring import Ring, ops
from . import uapi
from .errors import errno_of
from .ring_layout import (
    BACKING,
    BACKING_SLOT,
    KIND_SHIFT,
    LINKED_BACKING,
    RING_RW,
    SQE_SIZE,
    backing_slot,
)

if TYPE_CHECKING:
    from ..block import BlockDevice

log = logging.getLogger("vdisk.ublk.io")

_READ = uapi.UBLK_IO_OP_READ
_WRITE = uapi.UBLK_IO_OP_WRITE
_FLUSH = uapi.UBLK_IO_OP_FLUSH
_RW_OPCODE = (ops.IORING_OP_READ, ops.IORING_OP_WRITE)
_LINKED = ops.IOSQE_FIXED_FILE | ops.IOSQE_IO_LINK | ops.IOSQE_CQE_SKIP_SUCCESS

#: serve(tag, op, op_flags, offset, length) -> the result to commit, or None (commit later)
ServeFn = Callable[[int, int, int, int, int], "int | None"]


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


class FileTarget:
    """The backing file ``fd`` of one queue. Created and used only in the queue's thread;
    the file is registered in the ring's slot ``BACKING_SLOT``."""

    def __init__(
        self,
        fd: int,
        backend: BlockDevice,
        ring: Ring,
        buf_addr: list[int],
        buf_view: list[memoryview],
        slots: list[int],
        serve_backend: ServeFn,
        label: str,
    ) -> None:
        self.fd = fd
        self.backend = backend
        self.readonly = backend.readonly
        self.ring = ring
        self.buf_addr = buf_addr
        self.buf_view = buf_view
        self.slots = slots
        self.serve_backend = serve_backend
        self.label = label
        #: per op code: READ/WRITE go to the file through the ring, linked to the commit
        #: (else ``serve`` runs them inline); set by ``probe``
        self.linked = [False, False]
        #: per op code and tag: the SQE image of the linked READ/WRITE (off/addr/len/flags to
        #: patch, see ring_layout.SQE_IO)
        self.linked_sqe = self._rw_templates(_LINKED, LINKED_BACKING)
        #: the same, unlinked: what the compiled loop queues for a long op the kernel
        #: would punt (fastpath.RING_MIN_LEN), committing it on its CQE
        self.ring_sqe = self._rw_templates(ops.IOSQE_FIXED_FILE, RING_RW)

    def _rw_templates(self, flags: int, kind: int) -> list[list[bytes]]:
        return [
            [ops.RW_SQE.pack(opcode, flags, 0, BACKING_SLOT, 0, addr, 0, 0,
                             kind << KIND_SHIFT | tag, 0, 0, 0)
             for tag, addr in enumerate(self.buf_addr)]
            for opcode in _RW_OPCODE
        ]

    def probe(self) -> None:
        """Link READs / WRITEs to their commit unless the kernel would hand them to an
        io_uring worker thread. Asked by running one of each (a cached 4 KiB READ, a 0-byte
        WRITE) and looking for this thread's io-wq worker, which the kernel names
        iou-wrk-TID. Call it before the first request is fetched (it uses tag 0's buffer)."""
        os.preadv(self.fd, [self.buf_view[0][:4096]], 0)  # in the page cache now
        worker = f"iou-wrk-{threading.get_native_id()}"
        punts: list[bool] = []
        for opcode, length in zip(_RW_OPCODE, (4096, 0), strict=True):
            if not punts or not punts[-1]:  # once a worker exists, later ops cannot be told
                ops.RW_SQE.pack_into(self.ring.sqes, 0, opcode, ops.IOSQE_FIXED_FILE, 0,
                                     BACKING_SLOT, 0, self.buf_addr[0], length, 0,
                                     BACKING << KIND_SHIFT, 0, 0, 0)
                self.ring.push([0])
                self.ring.wait(1, timeout=5.0)
            punts.append(_thread_named(worker))
        log.info("%s: backing READs %s, WRITEs %s", self.label,
                 *("inline" if p else "through io_uring" for p in punts))
        self.linked = [not punts[0], not punts[1]]

    def serve(self, tag: int, op: int, op_flags: int, offset: int, length: int) -> int | None:
        """A request not linked through the ring: its result, or None for a FLUSH, whose FSYNC
        is queued (its CQE goes to ``finish``). Ops the file has no fast way for go to the
        backend."""
        if op == _FLUSH:
            self.submit_fsync(tag)
            return None
        if op <= _WRITE and not self.readonly:
            # A READ/WRITE the kernel would punt to a worker (see probe): one syscall here,
            # without the backend's per-call checks (the kernel only sends requests inside
            # the device).
            view = self.buf_view[tag][:length]
            try:
                done = os.preadv(self.fd, [view], offset) if op == _READ else os.pwritev(
                    self.fd, [view], offset)
                fua = bool(op_flags & uapi.UBLK_IO_F_FUA)
                if done < length:
                    return self._complete_short(tag, op, offset, length, done, fua)
                if fua and op == _WRITE:
                    os.fdatasync(self.fd)
                return length
            except OSError as exc:
                log.warning("%s %s [%d, +%d): %s", self.label, uapi.IO_OP_NAMES[op], offset,
                            length, exc)
                return -(exc.errno or errno.EIO)
        return self.serve_backend(tag, op, op_flags, offset, length)

    def submit_linked(self, tag: int, op: int, op_flags: int, offset: int, length: int) -> None:
        """Queue a READ/WRITE linked to the commit the caller queues next (the queue's fast
        loop does the same from ``linked_sqe``)."""
        rw_flags = ops.RWF_DSYNC if op_flags & uapi.UBLK_IO_F_FUA else 0
        ops.RW_SQE.pack_into(
            self.ring.sqes, backing_slot(tag) * SQE_SIZE, _RW_OPCODE[op], _LINKED, 0,
            BACKING_SLOT, offset, self.buf_addr[tag], length, rw_flags,
            LINKED_BACKING << KIND_SHIFT | tag, 0, 0, 0,
        )
        self.slots.append(backing_slot(tag))

    def submit_fsync(self, tag: int) -> None:
        """A FLUSH as an unlinked FSYNC: its CQE always comes, and the commit follows it."""
        ops.RW_SQE.pack_into(self.ring.sqes, backing_slot(tag) * SQE_SIZE, ops.IORING_OP_FSYNC,
                             ops.IOSQE_FIXED_FILE, 0, BACKING_SLOT, 0, 0, 0,
                             ops.IORING_FSYNC_DATASYNC, BACKING << KIND_SHIFT | tag, 0, 0, 0)
        self.slots.append(backing_slot(tag))

    def finish(self, tag: int, op: int, op_flags: int, offset: int, length: int, res: int) -> int:
        """The CQE of a FLUSH's FSYNC, or of a linked READ/WRITE that failed or came up short:
        the request's result to commit."""
        if res < 0:
            log.warning("%s %s [%d, +%d): %s", self.label, uapi.IO_OP_NAMES.get(op, op), offset,
                        length, os.strerror(-res))
            return res
        if op == _FLUSH:
            return 0
        return self._complete_short(tag, op, offset, length, res,
                                    bool(op_flags & uapi.UBLK_IO_F_FUA))

    def _complete_short(
        self, tag: int, op: int, offset: int, length: int, done: int, fua: bool
    ) -> int:
        """Finish a short READ/WRITE synchronously (rare: EOF or a signal) through the
        backend, which reads past the file's end as zeros."""
        view = self.buf_view[tag][done:length]
        try:
            if op == _READ:
                self.backend.readinto(view, offset + done)
            else:
                self.backend.write(view, offset + done, fua=fua)
        except Exception as exc:
            return -errno_of(exc)
        return length
