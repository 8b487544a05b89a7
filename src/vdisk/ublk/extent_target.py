"""The extent target: a qcow2 image's READs and overwrites run on the image file itself, at the
host offsets its host-extent table gives (``vdisk.qcow2.extents``), the way the file target
runs a raw file's; everything else, and every cluster the table does not know yet, goes to the
image, which then teaches the table that cluster.

Through the ring (where the kernel does not hand the op to a worker, see ``FileTarget.probe``)
the compiled loop queues them itself, linked to their commit. Unlike the file target's, their
success CQE is not skipped: the queue must know when each one ended, because the table entry
it used may be cleared meanwhile, and the host cluster behind it then stays unreused only for
as long as the queue's ticket on the image says it may still be in use (see ``Queue``).
Otherwise they run inline (``preadv``/``pwritev``), still without the image's lock.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from ..uring import ops
from . import uapi
from .file_target import _RW_OPCODE, _WRITE, FileTarget
from .ring_layout import BACKING_SLOT, EXTENT, KIND_SHIFT

if TYPE_CHECKING:
    from ..qcow2.extents import HostExtents

log = logging.getLogger("vdisk.ublk.io")

_FUA = uapi.UBLK_IO_F_FUA
_LINKED_WITH_CQE = ops.IOSQE_FIXED_FILE | ops.IOSQE_IO_LINK


class ExtentTarget(FileTarget):
    """The image file of one queue (registered in ring slot ``BACKING_SLOT``) and the image's
    host-extent table. ``linked`` stays all False (the queue's raw linked path must never
    touch this file); ``through_ring`` says which ops the compiled loop may queue."""

    extents: HostExtents

    def set_extents(self, extents: HostExtents) -> None:
        self.extents = extents
        self.through_ring = [False, False]
        #: requests served inline at a host extent (for tests)
        self.inline_hits = 0
        #: per op code and tag: the SQE image of an extent READ/WRITE (off/len to patch)
        self.extent_sqe = [
            [ops.RW_SQE.pack(opcode, _LINKED_WITH_CQE, 0, BACKING_SLOT, 0, addr, 0, 0,
                             EXTENT << KIND_SHIFT | tag, 0, 0, 0)
             for tag, addr in enumerate(self.buf_addr)]
            for opcode in _RW_OPCODE
        ]

    def probe(self) -> None:
        super().probe()
        self.through_ring = [self.linked[0], self.linked[1] and not self.readonly]
        self.linked = [False, False]

    def serve(self, tag: int, op: int, op_flags: int, offset: int, length: int) -> int | None:
        """A request the compiled loop left: inline at its host extent when the table knows
        it, else by the image (and the table learns the clusters it touched)."""
        if op > _WRITE:
            return self.serve_backend(tag, op, op_flags, offset, length)
        write = op == _WRITE
        host = -1 if write and (self.readonly or op_flags & _FUA) else self.extents.lookup(
            offset, length, write)
        if host >= 0:
            view = self.buf_view[tag][:length]
            try:
                done = os.pwritev(self.fd, [view], host) if write else os.preadv(
                    self.fd, [view], host)
            except OSError as exc:
                log.info("%s extent %s [%d, +%d) at %#x: %s; the image serves it", self.label,
                         uapi.IO_OP_NAMES[op], offset, length, host, exc)
                done = -1
            if done == length:
                self.inline_hits += 1
                return length
        res = self.serve_backend(tag, op, op_flags, offset, length)
        if res is not None and res >= 0 and length:
            self.extents.learn(offset, length)
        return res

    def finish(self, tag: int, op: int, op_flags: int, offset: int, length: int, res: int) -> int:
        """The CQE of an extent READ/WRITE that failed or came up short (its commit was
        cancelled): the image serves the whole request again."""
        if res < 0:
            log.info("%s extent %s [%d, +%d): %s; the image serves it", self.label,
                     uapi.IO_OP_NAMES.get(op, op), offset, length, os.strerror(-res))
        result = self.serve_backend(tag, op, op_flags, offset, length)
        return -errno.EIO if result is None else result
