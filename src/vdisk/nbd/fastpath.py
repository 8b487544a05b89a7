"""The optional compiled fast path of an NBD connection: ``fastloop.c``, built with the system's
C compiler on first use, cached, and called through ctypes (which releases the GIL for the whole
call).

Why: a 4K READ at depth 1 cost ~8.7 us of user CPU in the Python loop against nbdkit's 2.3 us,
and the round trip is what QD1 measures. The C loop serves the plain READs and WRITEs of a
host file (raw) exactly as the Python loop's inline path does, and hands everything else back
to it, with the receive buffer from that request on: Python stays the one place that knows the
rest of the protocol. Long WRITEs are written by a writer thread while the next request is
received, and after a lone READ the loop polls the socket briefly before it blocks.

``VDISK_NBD_FASTPATH=0`` turns it off; so does a missing compiler (``CC``, else ``cc``): the
server then runs its pure-Python loop, with the same bytes on the wire.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from .. import native

SOURCE = Path(__file__).with_name("fastloop.c")
#: nbd_serve's outcomes (>= 0; below 0 it is -errno of the socket)
HANDBACK, PAUSE, EOF, WRITE_FAILED = 0, 1, 2, 3
#: the compiled loop returns at least every this many requests, for the metrics
PAUSE_REQUESTS = 4096
#: with nothing buffered, how long the loop polls the socket before it blocks (a QD1 client's
#: next request comes within microseconds; sleeping and waking costs more on an idle host);
#: ``VDISK_NBD_POLL_NS`` sets it, 0 turns polling off
POLL_NS = 50_000


def poll_ns() -> int:
    try:
        return max(0, int(os.environ.get("VDISK_NBD_POLL_NS", POLL_NS)))
    except ValueError:
        return POLL_NS


class _State(ctypes.Structure):
    _fields_ = [
        ("sock", ctypes.c_int32),
        ("fd", ctypes.c_int32),
        ("structured", ctypes.c_uint32),
        ("writes", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("read_max", ctypes.c_uint64),
        ("max_payload", ctypes.c_uint64),
        ("max_requests", ctypes.c_uint64),
        ("in_", ctypes.c_void_p),
        ("in_cap", ctypes.c_uint64),
        ("in_start", ctypes.c_uint64),
        ("in_end", ctypes.c_uint64),
        ("out", ctypes.c_void_p),
        ("out_cap", ctypes.c_uint64),
        ("count", ctypes.c_uint64 * 2),
        ("bytes", ctypes.c_uint64 * 2),
        ("latency_ns", ctypes.c_uint64 * 2),
        ("async_min", ctypes.c_uint64),
        ("failed_cookie", ctypes.c_uint8 * 8),
        ("failed_errno", ctypes.c_int32),
        ("writer", ctypes.c_void_p),
        ("poll_ns", ctypes.c_uint64),
    ]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded fast loop, built first if needed; None when off or not buildable."""
    lib = native.load(SOURCE, "VDISK_NBD_FASTPATH")
    if lib is not None:
        lib.nbd_serve.argtypes = [ctypes.POINTER(_State)]
        lib.nbd_serve.restype = ctypes.c_long
        lib.nbd_free.argtypes = [ctypes.POINTER(_State)]
        lib.nbd_free.restype = None
    return lib


class FastConnection:
    """One connection's state for ``nbd_serve`` (its buffers are C's, freed by close())."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        sock_fd: int,
        file_fd: int,
        size: int,
        *,
        structured: bool,
        writes: bool,
        read_max: int,
        max_payload: int,
        async_min: int,
    ) -> None:
        self._serve = lib.nbd_serve
        self._free = lib.nbd_free
        s = _State()
        s.sock, s.fd = sock_fd, file_fd
        s.structured, s.writes = int(structured), int(writes)
        s.size, s.read_max, s.max_payload = size, read_max, max_payload
        s.max_requests = PAUSE_REQUESTS
        s.async_min = async_min
        s.poll_ns = poll_ns()
        self.state = s
        self._ref = ctypes.byref(s)

    def serve(self) -> tuple[int, bytes]:
        """Serve what C can: (outcome, the bytes received and not taken, for Python)."""
        code: int = self._serve(self._ref)
        s = self.state
        left = s.in_end - s.in_start
        rest = ctypes.string_at(s.in_ + s.in_start, left) if left else b""
        s.in_start = s.in_end = 0
        return code, rest

    def take_failure(self) -> tuple[int, OSError]:
        """After WRITE_FAILED: the failed write's cookie and error."""
        s = self.state
        code = s.failed_errno
        s.failed_errno = 0
        return int.from_bytes(bytes(s.failed_cookie), "big"), OSError(code, os.strerror(code))

    def take_tallies(self) -> list[tuple[str, int, int, int]]:
        """(op, count, bytes, mean service ns) of what C served since the last call."""
        s = self.state
        out = []
        for op, name in enumerate(("read", "write")):
            count = s.count[op]
            if count:
                out.append((name, count, s.bytes[op], s.latency_ns[op] // count))
                s.count[op] = s.bytes[op] = s.latency_ns[op] = 0
        return out

    def close(self) -> None:
        self._free(self._ref)
