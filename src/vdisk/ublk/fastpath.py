"""The optional compiled fast path of a queue: ``fastloop.c``, built with the system's C
compiler on first use, cached, and called through ctypes (which releases the GIL for the
whole call).

Why: under the test VM's TCG, every Python bytecode and every ctypes call is emulated, and a
QD1 request spent ~900 us of the queue thread's CPU in Python on top of what ublksrv's C loop
spends in all (measured with /proc/PID/task/TID/schedstat; see docs/performance.md). The C
loop serves the requests that need no Python (READ/WRITE linked to their commit on a backing
file or at a qcow2 host extent; READ/WRITE the kernel would punt to an io-wq worker, with
pread/pwrite, or the long ones back on the ring unlinked; every request of the null backend) and hands everything else back to the
queue's Python loop, which stays the one place that knows the rest of the protocol.

``VDISK_UBLK_FASTPATH=0`` turns it off; so does a missing compiler (``CC``, else ``cc``):
the queue then runs its pure-Python loop, with the same outcome.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .. import native
from ..uring.ring import IORING_FEAT_EXT_ARG, buffer_address

if TYPE_CHECKING:
    from ..uring import Ring

log = logging.getLogger("vdisk.ublk")

SOURCE = Path(__file__).with_name("fastloop.c")
NOPS = 8
FL_TIMEOUT, FL_TIMING, FL_NULL = 1, 2, 4
_CQE = struct.Struct("<QiI")
#: with metrics on, the compiled loop returns to Python this often while it serves
REPORT_NS = 250_000_000
#: with host extents, the compiled loop returns to Python at least every this many requests
EXTENT_RENEW_REQUESTS = 4096
#: a READ/WRITE the kernel would punt of this many bytes and more goes to its io-wq worker
#: (copying there while the queue thread serves on) rather than inline;
#: ``VDISK_UBLK_RING_MIN_LEN`` sets it, 0 keeps every one inline
RING_MIN_LEN = 128 << 10


def ring_min_len() -> int:
    try:
        return max(0, int(os.environ.get("VDISK_UBLK_RING_MIN_LEN", RING_MIN_LEN)))
    except ValueError:
        return RING_MIN_LEN

_u64p = ctypes.POINTER(ctypes.c_uint64)


class _State(ctypes.Structure):
    _fields_ = [
        ("ring_fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("sq_mask", ctypes.c_uint32),
        ("cq_mask", ctypes.c_uint32),
        ("sq_head", ctypes.c_void_p),
        ("sq_tail", ctypes.c_void_p),
        ("sq_array", ctypes.c_void_p),
        ("cq_head", ctypes.c_void_p),
        ("cq_tail", ctypes.c_void_p),
        ("cqes", ctypes.c_void_p),
        ("sqes", ctypes.c_void_p),
        ("descs", ctypes.c_void_p),
        ("bufs", ctypes.c_void_p),
        ("buf_size", ctypes.c_uint64),
        ("buf_addr_base", ctypes.c_uint64),
        ("commit_tpl", ctypes.c_void_p),
        ("linked_tpl", ctypes.c_void_p * 2),
        ("depth", ctypes.c_uint32),
        ("result_offset", ctypes.c_uint32),
        ("rwf_dsync", ctypes.c_uint32),
        ("out_cap", ctypes.c_uint32),
        ("out", ctypes.c_void_p),
        ("max_requests", ctypes.c_uint64),
        ("timeout_ns", ctypes.c_int64),
        ("counts", ctypes.c_uint64 * NOPS),
        ("bytes", ctypes.c_uint64 * NOPS),
        ("latency_ns", ctypes.c_uint64 * NOPS),
        ("max_latency_ns", ctypes.c_uint64 * NOPS),
        ("extents", ctypes.c_void_p),
        ("extent_count", ctypes.c_uint64),
        ("cluster_bits", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("inflight", ctypes.c_uint64 * 2),
        ("tag_epoch", ctypes.c_void_p),
        ("tag_len", ctypes.c_void_p),
        ("extent_tpl", ctypes.c_void_p * 2),
        ("extent_ios", ctypes.c_uint64),
        ("inline_fd", ctypes.c_int32),
        ("inline_ops", ctypes.c_uint32),
        ("inline_ios", ctypes.c_uint64),
        ("ring_tpl", ctypes.c_void_p * 2),
        ("ring_min_len", ctypes.c_uint32),
        ("ring_ios", ctypes.c_uint64),
        ("report_ns", ctypes.c_uint64),
    ]


def is_null_backend(backend: object) -> bool:
    """Is this vdisk's null backend (ignores writes)? The compiled loop then serves all its
    requests, and like ublksrv's null target leaves a READ's buffer as it is (the bytes a
    WRITE of the same tag last left there, zeros before any); the ``mem`` backend is the one
    that reads zeros. Told by name: the ublk package imports no backend."""
    cls = type(backend)
    return cls.__name__ == "NullDevice" and cls.__module__ == "vdisk.backends.null"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded fast loop, built first if needed; None when off or not buildable."""
    lib = native.load(SOURCE, "VDISK_UBLK_FASTPATH")
    if lib is not None:
        lib.fl_run.argtypes = [ctypes.POINTER(_State)]
        lib.fl_run.restype = ctypes.c_long
    return lib


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class FastLoop:
    """One queue's state for ``fl_run``: pointers into its ring, descriptors and buffers, and
    the SQE templates (kept alive here)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        ring: Ring,
        cdev_fd: int,
        desc_length: int,
        desc_offset: int,
        bufs: mmap.mmap,
        buf_size: int,
        depth: int,
        commit_sqe: list[bytes],
        linked_sqe: list[list[bytes]] | None,
        null_backend: bool,
        result_offset: int,
        rwf_dsync: int,
        timeout: float,
        timing: bool,
    ) -> None:
        self._run = lib.fl_run
        self.ring = ring
        # The descriptors again, mapped here because ctypes cannot take the address of the
        # queue's read-only mmap object.
        addr = _libc.mmap(None, desc_length, mmap.PROT_READ, mmap.MAP_SHARED, cdev_fd,
                          desc_offset)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap of the ublk descriptors")
        self._descs = (addr, desc_length)
        s = _State()
        s.ring_fd = ring.fd
        s.flags = (FL_TIMEOUT if ring.features & IORING_FEAT_EXT_ARG else 0) | (
            FL_TIMING if timing else 0) | (FL_NULL if null_backend else 0)
        s.sq_mask, s.cq_mask = ring.sq_mask, ring.cq_mask
        shared = ring.shared_addresses()
        s.sq_head, s.sq_tail, s.sq_array = shared["sq_head"], shared["sq_tail"], shared["sq_array"]
        s.cq_head, s.cq_tail, s.cqes = shared["cq_head"], shared["cq_tail"], shared["cqes"]
        s.sqes = shared["sqes"]
        s.descs = addr
        s.bufs = buffer_address(bufs)
        s.buf_size = buf_size
        s.buf_addr_base = s.bufs
        self._commit = ctypes.create_string_buffer(b"".join(commit_sqe), 64 * depth)
        s.commit_tpl = ctypes.addressof(self._commit)
        self._linked: list[ctypes.Array[ctypes.c_char]] = []
        for op in (0, 1):
            if linked_sqe is not None and linked_sqe[op]:
                tpl = ctypes.create_string_buffer(b"".join(linked_sqe[op]), 64 * depth)
                self._linked.append(tpl)
                s.linked_tpl[op] = ctypes.addressof(tpl)
        s.depth = depth
        s.result_offset = result_offset
        s.rwf_dsync = rwf_dsync
        s.out_cap = ring.cq_entries
        self._out = ctypes.create_string_buffer(16 * ring.cq_entries)
        s.out = ctypes.addressof(self._out)
        self._out_view = memoryview(self._out).cast("B")
        s.report_ns = REPORT_NS if timing else 0
        s.timeout_ns = int(timeout * 1e9)
        s.inline_fd = -1
        self.state = s
        self._ref = ctypes.byref(s)

    def set_extents(
        self, address: int, count: int, cluster_bits: int, templates: list[list[bytes]]
    ) -> None:
        """Serve READs/WRITEs (those with ``templates[op]``) through the host-extent table
        at ``address`` (``count`` entries, see qcow2/extents.py)."""
        s = self.state
        depth = s.depth
        self._tag_epoch = (ctypes.c_uint8 * depth)()
        self._tag_len = (ctypes.c_uint32 * depth)()
        s.tag_epoch = ctypes.addressof(self._tag_epoch)
        s.tag_len = ctypes.addressof(self._tag_len)
        self._extent_tpl: list[ctypes.Array[ctypes.c_char]] = []
        for op in (0, 1):
            if templates[op]:
                tpl = ctypes.create_string_buffer(b"".join(templates[op]), 64 * depth)
                self._extent_tpl.append(tpl)
                s.extent_tpl[op] = ctypes.addressof(tpl)
        s.cluster_bits = cluster_bits
        s.extent_count = count
        s.extents = address
        if not s.max_requests:
            # Come back now and then even when C serves everything, so that the queue can
            # renew its image ticket and freed clusters do not wait for ever.
            s.max_requests = EXTENT_RENEW_REQUESTS

    def set_inline(
        self, fd: int, inline: list[bool], ring_sqe: list[list[bytes]] | None = None,
        ring_min_len: int = 0,
    ) -> None:
        """Run the READs/WRITEs ``inline`` says with pread/pwrite on ``fd`` (at the host
        extent when there is a table), as the file target's ``serve`` would: the ops the
        kernel would hand to an io-wq worker. Those of ``ring_min_len`` bytes and more go to
        that worker after all, unlinked, through ``ring_sqe`` (a plain file only)."""
        s = self.state
        s.inline_fd = fd
        s.inline_ops = sum(1 << op for op in (0, 1) if inline[op])
        if ring_sqe is not None and ring_min_len > 0:
            self._ring_tpl = [
                ctypes.create_string_buffer(b"".join(ring_sqe[op]), 64 * s.depth) for op in (0, 1)
            ]
            for op, tpl in enumerate(self._ring_tpl):
                s.ring_tpl[op] = ctypes.addressof(tpl)
            s.ring_min_len = ring_min_len

    def extent_done(self, tag: int) -> None:
        """Python saw the end of ``tag``'s extent I/O (it failed or came up short)."""
        self.state.inflight[self._tag_epoch[tag]] -= 1

    def run(self) -> list[tuple[int, int, int]]:
        """Serve what C can; return the CQEs for Python, oldest first (maybe none)."""
        self.ring.publish()
        n = self._run(self._ref)
        self.ring.resync()
        if n < 0:
            from ..uring import UringError

            raise UringError(-n, "io_uring_enter")
        if not n:
            return []
        return list(_CQE.iter_unpack(self._out_view[: 16 * n]))

    def take_tallies(self) -> list[tuple[int, int, int, int]]:
        """(op, count, bytes, mean service ns) of what C served since the last call."""
        s = self.state
        out = []
        for op in range(NOPS):
            count = s.counts[op]
            if count:
                out.append((op, count, s.bytes[op], s.latency_ns[op] // count))
                s.counts[op] = s.bytes[op] = s.latency_ns[op] = 0
        return out

    def close(self) -> None:
        addr, length = self._descs
        if addr:
            _libc.munmap(addr, length)
            self._descs = (0, 0)
        self._out_view.release()
