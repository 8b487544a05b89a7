"""The NBD server: sockets and threads around the sans-IO ServerConnection.

One thread per client connection (blocking sockets measured faster than asyncio here: a request
costs one recv_into, one device call and, per batch, one send). Requests of one connection are
served in order; replies of all requests already buffered are laid end to end in a per-connection
arena (headers packed in place, read data read straight into it) and sent with one send, so a
deep queue costs few system calls and no copies. A device backed by a host file (raw) is read
and written through its descriptor directly, and long READs go out with sendfile(2) from it.
Without TLS or extended headers, the plain READs and WRITEs of such a file are served by an
optional compiled loop (fastpath.py), which hands everything else back to the Python loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..block import BlockDevice, DirtyBitmap, Extent, FileBacked, is_zero
from ..errors import RequestError, VdiskError
from ..metrics import IoMetrics, register, unregister
from . import fastpath
from . import protocol as p
from .known_data import KnownData

log = logging.getLogger("vdisk.nbd")

#: Reads at least this long (structured replies, no DF) are checked for holes first.
SPARSE_READ_MIN = 64 << 10
#: Per-connection reply arena: starts at ARENA_MIN on the first reply, doubles while batches fill
#: it up to ARENA_SIZE, and grows past that only to hold one maximal read (bounded per client).
ARENA_MIN = 64 << 10
ARENA_SIZE = 2 << 20
#: Reads at least this long from a host file go out with sendfile(2), header first: the kernel
#: hands the page-cache pages to the socket, where a read into the arena and a send would copy
#: each byte twice (a 1 MiB read on tmpfs: preadv 160 us, sendmsg 65 us, measured with strace).
SENDFILE_MIN = 128 << 10
#: Send buffer asked for each client socket (see NbdServer._spawn).
SOCKET_SNDBUF = 4 << 20
#: WRITEs at least this long are streamed (see ServerConnection's stream_writes): the part of
#: the payload not yet buffered is received straight into a payload buffer.
STREAM_WRITE_MIN = 128 << 10
#: WRITEs at least this long are written by the compiled loop's writer thread while the next
#: request is received (see fastloop.c).
ASYNC_WRITE_MIN = 128 << 10
#: One structured READ reply's header in one pack: chunk header, then the data offset.
READ_CHUNK_HEADER = struct.Struct(">IHHQIQ")
SIMPLE_REPLY = p.SIMPLE_REPLY
#: Longest block status query sent to the device in one request.
BLOCK_STATUS_MAX = 1 << 30
#: How far past a sparse read the device's block status is asked (the data found is cached):
#: a host file's answer costs the same for any length, a qcow2's grows with it (~3 us/MiB).
DATA_WINDOW_FILE = BLOCK_STATUS_MAX
DATA_WINDOW_OTHER = 64 << 20
#: A window answering with more extents than this halves the next window (fragmented files).
DATA_WINDOW_EXTENTS = 256
#: Seconds a client has, from accept, to finish negotiation (qemu-nbd's --handshake-limit).
HANDSHAKE_LIMIT = 10.0

DISCARD_MODES = ("ignore", "unmap", "off", "on")
DETECT_ZEROES_MODES = ("off", "on", "unmap")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


@dataclass
class Export:
    """One device served under a name, with qemu-nbd's policies."""

    device: BlockDevice
    name: str = ""
    description: str = ""
    readonly: bool | None = None
    discard: str = "ignore"
    detect_zeroes: str = "off"
    cache: str = "writeback"
    allocation_depth: bool = False
    bitmaps: Sequence[DirtyBitmap] = ()
    multi_conn: bool = True
    metrics: IoMetrics | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.readonly is None:
            self.readonly = self.device.readonly
        if self.discard not in DISCARD_MODES:
            raise VdiskError(f"invalid discard mode {self.discard!r} (ignore or unmap)")
        if self.discard == "on":
            self.discard = "unmap"
        elif self.discard == "off":
            self.discard = "ignore"
        if self.detect_zeroes not in DETECT_ZEROES_MODES:
            raise VdiskError(f"invalid detect-zeroes mode {self.detect_zeroes!r} (off, on or unmap)")
        if self.detect_zeroes == "unmap" and self.discard != "unmap":
            raise VdiskError("--detect-zeroes=unmap requires --discard=unmap")
        if self.cache not in CACHE_MODES:
            raise VdiskError(f"invalid cache mode {self.cache!r} ({', '.join(CACHE_MODES)})")
        contexts = [p.BASE_ALLOCATION]
        if self.allocation_depth:
            contexts.append(p.QEMU_ALLOCATION_DEPTH)
        contexts.extend(p.QEMU_DIRTY_BITMAP + b.name for b in self.bitmaps)
        self.info = p.ExportInfo(
            name=self.name,
            size=self.device.size,
            readonly=bool(self.readonly),
            description=self.description,
            meta_contexts=tuple(contexts),
            can_multi_conn=self.multi_conn,
            can_fast_zero=bool(getattr(self.device, "fast_zero", True)),
        )
        self.always_fua = self.cache in ("writethrough", "directsync")
        self.skip_flush = self.cache == "unsafe"
        if self.metrics is None:
            self.metrics = IoMetrics(f"nbd:{self.name or 'default'}")
        #: Data ranges learnt from block status, for sparse reads (see known_data.py).
        self.known_data = KnownData()
        file_backed = isinstance(self.device, FileBacked) and self.device.file_descriptor() is not None
        self.data_window = DATA_WINDOW_FILE if file_backed else DATA_WINDOW_OTHER

    def context_extents(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents of metadata context ``name`` over the range."""
        if name == p.BASE_ALLOCATION or name == p.QEMU_ALLOCATION_DEPTH:
            depth = name == p.QEMU_ALLOCATION_DEPTH
            out: list[tuple[int, int]] = []
            for ext in self.device.block_status(offset, length):
                lo, hi = max(ext.offset, offset), min(ext.end, offset + length)
                if hi <= lo:
                    continue
                flags = _depth_of(ext) if depth else _allocation_flags(ext)
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + hi - lo, flags)
                else:
                    out.append((hi - lo, flags))
            return out
        for bitmap in self.bitmaps:
            if name == p.QEMU_DIRTY_BITMAP + bitmap.name:
                return [(n, p.NBD_STATE_DIRTY if dirty else 0)
                        for n, dirty in bitmap.dirty_extents(offset, length)]
        raise RequestError(f"unknown metadata context {name!r}")

    def read_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs covering a read, joined; one data run if the device's
        answer falls short. Asks the device over a wider window and caches the data found."""
        if self.known_data.covers(offset, length):
            return [(offset, length, False)]
        window = max(length, min(self.data_window, self.device.size - offset))
        extents = self.device.block_status(offset, window)
        if len(extents) > DATA_WINDOW_EXTENTS:
            self.data_window = max(DATA_WINDOW_OTHER, self.data_window // 2)
        self.known_data.add(((max(e.offset, offset), min(e.end, offset + window))
                             for e in extents if e.data and not e.zero), keep_from=offset)
        runs: list[tuple[int, int, bool]] = []
        end = offset + length
        for ext in extents:
            lo, hi = max(ext.offset, offset), min(ext.end, end)
            if hi <= lo:
                continue
            hole = ext.zero or not ext.data
            if runs and runs[-1][2] == hole:
                prev = runs[-1]
                runs[-1] = (prev[0], prev[1] + hi - lo, hole)
            else:
                runs.append((lo, hi - lo, hole))
        if sum(r[1] for r in runs) != length:  # the device answered short: read it all as data
            return [(offset, length, False)]
        return runs

    def mark_dirty(self, offset: int, length: int) -> None:
        for bitmap in self.bitmaps:
            bitmap.mark_dirty(offset, length)


def _allocation_flags(ext: Extent) -> int:
    return (0 if ext.data else p.NBD_STATE_HOLE) | (p.NBD_STATE_ZERO if ext.zero else 0)


def _depth_of(ext: Extent) -> int:
    return ext.depth + 1 if ext.present else 0


class StreamBroken(ConnectionError):
    """A reply was cut off half-sent (sendfile failed after its header went out): the byte
    stream can no longer carry an error reply, so the connection is dropped."""


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, VdiskError | OSError):
        return p.errno_to_nbd(exc.errno)
    return p.NBD_EIO


class _Client:
    """Serves one connection from greeting to close (runs on its own thread)."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.tls = False
        self.arena = bytearray(0)  # allocated on the first reply: idle connections cost little
        self.pos = 0
        self.holds_slot = False
        #: The export's host file while READ data may be sendfile'd from it (not under TLS).
        self.sendfile_fd: int | None = None
        #: Where streamed WRITE payloads are received (allocated on the first one, grown to
        #: the longest; bounded like the receive buffer by the protocol's maximum payload).
        self.payload_buffer: memoryview | None = None
        #: The compiled loop serving plain READs/WRITEs of a host file (see fastpath.py).
        self.fast: fastpath.FastConnection | None = None

    # -- I/O helpers ---------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self.tls:
            self.sock.sendall(view)
            return
        send = self.sock.send
        while view:
            n = send(view)
            view = view[n:]

    def flush_replies(self) -> None:
        if self.pos:
            self.send(memoryview(self.arena)[: self.pos])
            self.pos = 0

    def send_file_data(self, offset: int, length: int) -> None:
        """Send what is queued in the arena (ending with a read header), then ``length``
        bytes of the host file from ``offset``; past its end, zeros."""
        assert self.sendfile_fd is not None
        self.flush_replies()
        sock_fd = self.sock.fileno()
        try:
            while length:
                n = os.sendfile(sock_fd, self.sendfile_fd, offset, length)
                if n == 0:  # a file shorter than the device: the rest reads as zeros
                    self.send(bytes(length))
                    break
                offset += n
                length -= n
        except OSError as exc:
            raise StreamBroken(f"sending read data failed: {exc}") from exc

    def room(self, need: int) -> memoryview:
        """Make ``need`` bytes free at arena[pos:] (sending what is queued first if needed)."""
        if self.pos + need > len(self.arena):
            self.flush_replies()
            size = len(self.arena)
            if need > size or size < ARENA_SIZE:
                self.arena = bytearray(max(need, min(ARENA_SIZE, max(ARENA_MIN, 2 * size))))
        return memoryview(self.arena)

    # -- the connection ------------------------------------------------------------------------

    def run(self) -> None:
        server = self.server
        conn = p.ServerConnection(
            server.infos,
            tls=server.tls_context is not None,
            tls_required=server.tls_context is not None,
        )
        limit = server.handshake_limit
        deadline = time.monotonic() + limit if limit > 0 else None
        self.set_deadline(deadline)
        self.send(conn.data_to_send())
        export: Export | None = None
        contexts: list[tuple[int, str]] = []
        while export is None:
            event = conn.next_event()
            if isinstance(event, p.Negotiated):
                # Only a negotiated client takes one of the -e slots; wait for one before
                # the final reply so the client starts transmission with a slot held.
                self.sock.settimeout(None)
                if not server.acquire_slot():
                    return
                self.holds_slot = True
            out = conn.data_to_send()
            if out:
                self.send(out)
            if event is p.NEED_DATA:
                self.set_deadline(deadline)
                n = self.sock.recv_into(conn.get_buffer())
                if not n:
                    conn.eof()
                    return
                conn.buffer_updated(n)
            elif isinstance(event, p.StartTLS):
                assert server.tls_context is not None
                self.sock = server.tls_context.wrap_socket(self.sock, server_side=True)
                self.tls = True
                conn.tls_started()
            elif isinstance(event, p.Negotiated):
                export = server.exports_by_info[id(event.export)]
                contexts = event.contexts
            elif isinstance(event, p.Closed):
                if event.error:
                    log.info("nbd: dropping client during negotiation: %s", event.error)
                return
        self.sock.settimeout(None)
        self.transmission(conn, export, contexts)

    def set_deadline(self, deadline: float | None) -> None:
        """Time out the next blocking socket call at ``deadline`` (None: never)."""
        if deadline is None:
            self.sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("client did not finish the handshake in time")
        self.sock.settimeout(remaining)

    def transmission(self, conn: p.ServerConnection, export: Export,
                     contexts: list[tuple[int, str]]) -> None:
        """Serve requests until the client leaves. The common requests (a READ that fits the
        arena, a plain WRITE, both on a host file) are served inline from conn.next_io(): no
        event object, no method call but the syscall, one metrics record per batch. Everything
        else goes through serve()."""
        device = export.device
        metrics = export.metrics
        assert metrics is not None
        record_many = metrics.record_many
        recv_into = self.sock.recv_into
        next_io = conn.next_io
        next_event = conn.next_event
        get_buffer = conn.get_buffer
        buffer_updated = conn.buffer_updated
        clock = time.perf_counter_ns
        Request = p.Request
        NEED_DATA = p.NEED_DATA
        # A host file behind the device: reads and writes go to it directly (the protocol
        # has checked bounds and read-only), the device only sees the odd short transfer.
        file_fd = device.file_descriptor() if isinstance(device, FileBacked) else None
        self.sendfile_fd = None if self.tls else file_fd
        if export.detect_zeroes == "off":
            conn.stream_writes = STREAM_WRITE_MIN
        preadv, pwritev = os.preadv, os.pwritev
        structured = conn.structured
        # Inline READs: below the sparse check (structured) and sendfile sizes; inline WRITEs:
        # without FUA, zero detection or bitmaps to keep. Extended headers take serve().
        inline = file_fd is not None and not conn.extended
        fd = -1 if file_fd is None else file_fd  # used only when inline
        inline_read_max = (SPARSE_READ_MIN if structured else SENDFILE_MIN) if inline else 0
        inline_writes = (inline and not export.always_fua and export.detect_zeroes == "off"
                         and not export.bitmaps)
        lib = fastpath.library() if inline and not self.tls else None
        fast = None
        if lib is not None:
            fast = self.fast = fastpath.FastConnection(
                lib, self.sock.fileno(), fd, export.info.size, structured=structured,
                writes=inline_writes and not export.readonly, read_max=inline_read_max,
                max_payload=p.MAX_PAYLOAD, async_min=ASYNC_WRITE_MIN)
        hdr = conn.read_header_size()
        ok_size = SIMPLE_REPLY.size
        pack_data_header = READ_CHUNK_HEADER.pack_into
        pack_simple = SIMPLE_REPLY.pack_into
        simple_magic = p.NBD_SIMPLE_REPLY_MAGIC
        chunk_magic = p.NBD_STRUCTURED_REPLY_MAGIC
        done_flag = p.NBD_REPLY_FLAG_DONE
        data_type = p.NBD_REPLY_TYPE_OFFSET_DATA
        tls = self.tls
        sock_send = self.sock.send
        arena_view = memoryview(self.arena)
        arena_len = len(arena_view)
        reads = read_bytes = writes = write_bytes = 0
        batch_start = clock()
        event: p.Event
        while True:
            io = next_io()
            if type(io) is tuple:
                rtype, cookie, offset, length, payload = io
                try:
                    if payload is None:
                        if length < inline_read_max:
                            pos = self.pos
                            end = pos + hdr + length
                            if end > arena_len:
                                self.room(hdr + length)
                                arena_view = memoryview(self.arena)
                                arena_len = len(arena_view)
                                pos = self.pos
                                end = pos + hdr + length
                            data = arena_view[pos + hdr : end]
                            n = preadv(fd, [data], offset)
                            if n != length:  # a short read (past the file's end: zeros)
                                device.readinto(data[n:], offset + n)
                            if structured:
                                pack_data_header(arena_view, pos, chunk_magic, done_flag, data_type,
                                                 cookie, length + 8, offset)
                            else:
                                pack_simple(arena_view, pos, simple_magic, 0, cookie)
                            self.pos = end
                            reads += 1
                            read_bytes += length
                            continue
                        event = Request(cookie, rtype, 0, offset, length)
                    elif inline_writes:
                        n = pwritev(fd, [payload], offset)
                        if n != length:
                            device.write(payload[n:], offset + n)
                        pos = self.pos
                        if pos + ok_size > arena_len:
                            self.room(ok_size)
                            arena_view = memoryview(self.arena)
                            arena_len = len(arena_view)
                            pos = self.pos
                        pack_simple(arena_view, pos, simple_magic, 0, cookie)
                        self.pos = pos + ok_size
                        writes += 1
                        write_bytes += length
                        continue
                    else:
                        event = Request(cookie, rtype, 0, offset, length, payload)
                except Exception as exc:  # the device failed: answer with an error, keep going
                    self.fail(conn, metrics, rtype, cookie, exc, 0)
                    arena_view = memoryview(self.arena)
                    arena_len = len(arena_view)
                    continue
            elif io is NEED_DATA or (event := next_event()) is NEED_DATA:
                pos = self.pos
                if pos:  # every reply of the batch in one send
                    sent = 0 if tls else sock_send(arena_view[:pos])
                    if sent != pos:
                        self.send(arena_view[sent:pos])
                    self.pos = 0
                if reads or writes:
                    elapsed = clock() - batch_start
                    if reads:
                        record_many("read", reads, read_bytes, elapsed)
                        reads = read_bytes = 0
                    if writes:
                        record_many("write", writes, write_bytes, elapsed)
                        writes = write_bytes = 0
                if fast is not None and conn.at_request_boundary:
                    code, rest = fast.serve()
                    for op, count, nbytes, latency in fast.take_tallies():
                        record_many(op, count, nbytes, latency)
                    if rest:  # from the request C left to Python on
                        conn.receive_data(rest)
                    if code < 0:
                        raise OSError(-code, os.strerror(-code))
                    if code == fastpath.WRITE_FAILED:
                        cookie, failure = fast.take_failure()
                        self.fail(conn, metrics, p.NBD_CMD_WRITE, cookie, failure, 0)
                        arena_view = memoryview(self.arena)
                        arena_len = len(arena_view)
                    if code != fastpath.EOF:
                        batch_start = clock()
                        continue
                    n = 0
                else:
                    n = recv_into(get_buffer())
                if not n:
                    closed = conn.eof()
                    if closed.error:
                        log.info("nbd: client went away: %s", closed.error)
                    return
                buffer_updated(n)
                batch_start = clock()
                continue
            else:
                if type(event) is not Request:
                    assert isinstance(event, p.Closed)
                    self.flush_replies()
                    if event.error:
                        log.info("nbd: dropping client: %s", event.error)
                    return
            assert type(event) is Request
            if event.type == p.NBD_CMD_DISC:  # no reply: answer the rest, then hang up
                self.flush_replies()
                return
            self.serve(conn, export, contexts, event, file_fd)
            arena_view = memoryview(self.arena)  # serve may have grown it
            arena_len = len(arena_view)

    def serve(self, conn: p.ServerConnection, export: Export, contexts: list[tuple[int, str]],
              req: p.Request, file_fd: int | None) -> None:
        """One request of any kind, answered (an error reply if it fails)."""
        metrics = export.metrics
        assert metrics is not None
        t0 = time.perf_counter_ns()
        rtype = req.type
        if req.error:
            self.reply_error(conn, req.cookie, req.error, req.message)
            metrics.record(p.CMD_NAMES.get(rtype, "other"), 0, time.perf_counter_ns() - t0, True)
            return
        try:
            if rtype == p.NBD_CMD_READ:
                self.read(conn, export, req, file_fd)
            elif rtype == p.NBD_CMD_WRITE:
                self.write(conn, export, req, file_fd)
            else:
                self.other_command(conn, export, contexts, req)
        except StreamBroken:
            raise
        except Exception as exc:  # the device failed: answer with an error, keep going
            self.fail(conn, metrics, rtype, req.cookie, exc, t0)
            return
        metrics.record(p.CMD_NAMES.get(rtype, "other"), req.length, time.perf_counter_ns() - t0)

    def fail(self, conn: p.ServerConnection, metrics: IoMetrics, rtype: int, cookie: int,
             exc: Exception, t0: int) -> None:
        """Answer a request whose device call failed with its error."""
        if not isinstance(exc, VdiskError | OSError):
            log.exception("nbd: unexpected error serving %s", p.CMD_NAMES.get(rtype))
        self.reply_error(conn, cookie, _error_code(exc), str(exc))
        latency = time.perf_counter_ns() - t0 if t0 else 0
        metrics.record(p.CMD_NAMES.get(rtype, "other"), 0, latency, True)

    def write(self, conn: p.ServerConnection, export: Export, req: p.Request,
              file_fd: int | None) -> None:
        device = export.device
        payload = req.payload
        assert payload is not None
        fua = export.always_fua or bool(req.flags & p.NBD_CMD_FLAG_FUA)
        if req.pending:
            self.streamed_write(export, req, payload, file_fd, fua)
        elif export.detect_zeroes != "off" and is_zero(payload):
            device.write_zeroes(req.offset, req.length, may_unmap=export.detect_zeroes == "unmap")
            export.known_data.clear()
            if fua:
                device.flush()
        else:
            self.write_data(device, payload, req.offset, file_fd, fua)
        if export.bitmaps:
            export.mark_dirty(req.offset, req.length)
        view = self.room(conn.chunk_header_size())
        self.pos = conn.pack_ok(view, self.pos, req.cookie)

    @staticmethod
    def write_data(device: BlockDevice, data: memoryview, offset: int, file_fd: int | None,
                   fua: bool) -> None:
        if file_fd is not None and not fua:
            n = os.pwritev(file_fd, [data], offset)
            if n != len(data):
                device.write(data[n:], offset + n)
        else:
            device.write(data, offset, fua=fua)

    def streamed_write(self, export: Export, req: p.Request, first: memoryview,
                       file_fd: int | None, fua: bool) -> None:
        """A long WRITE whose payload was not all buffered: the rest is received straight into
        a payload buffer, then all is written at once (a client gone mid-payload leaves nothing
        half-written). To a host file both parts go in one pwritev, the first from the receive
        buffer (untouched until then); a device gets them joined in the payload buffer."""
        length = req.length
        rest = length - len(first)
        if self.payload_buffer is None or len(self.payload_buffer) < length:
            self.payload_buffer = memoryview(bytearray(length))
        joined = file_fd is None or fua
        data = self.payload_buffer[:length] if joined else self.payload_buffer[:rest]
        got = length - rest if joined else 0
        if joined:
            data[:got] = first
        recv_into = self.sock.recv_into
        while got < len(data):
            n = recv_into(data[got:])
            if not n:
                raise ConnectionError("client went away in the middle of a write payload")
            got += n
        if joined:
            self.write_data(export.device, data, req.offset, file_fd, fua)
            return
        assert file_fd is not None
        n = os.pwritev(file_fd, [first, data], req.offset)
        if n != length:  # a short write: the device finishes it
            split = len(first)
            if n < split:
                export.device.write(first[n:], req.offset + n)
                n = split
            export.device.write(data[n - split :], req.offset + n)

    def read(self, conn: p.ServerConnection, export: Export, req: p.Request,
             file_fd: int | None) -> None:
        """A READ's reply: sparse (hole chunks) when structured and long, else one data
        chunk, sent from the host file when long, else read into the arena behind its header."""
        offset, length = req.offset, req.length
        if conn.structured and length >= SPARSE_READ_MIN and not req.flags & p.NBD_CMD_FLAG_DF:
            self.sparse_read(conn, export, req)
            return
        hdr = conn.read_header_size()
        if self.sendfile_fd is not None and length >= SENDFILE_MIN:
            view = self.room(hdr)
            self.pos = conn.pack_read_header(view, self.pos, req.cookie, offset, length)
            self.send_file_data(offset, length)
            return
        view = self.room(hdr + length)
        pos = self.pos
        start = pos + hdr
        data = view[start : start + length]
        n = os.preadv(file_fd, [data], offset) if file_fd is not None else 0
        if n != length:  # no file, or a short read (past its end: zeros, by the device)
            export.device.readinto(data[n:], offset + n)
        conn.pack_read_header(view, pos, req.cookie, offset, length)
        self.pos = start + length

    def reply_error(self, conn: p.ServerConnection, cookie: int, error: int, message: str) -> None:
        view = self.room(conn.error_size(message))
        self.pos = conn.pack_error(view, self.pos, cookie, error, message)

    def sparse_read(self, conn: p.ServerConnection, export: Export, req: p.Request) -> None:
        """A structured read that sends zero runs as hole chunks."""
        runs = export.read_runs(req.offset, req.length)
        hdr = conn.read_header_size()
        if self.sendfile_fd is not None and any(not hole and n >= SENDFILE_MIN
                                                for _, n, hole in runs):
            self.sparse_read_sendfile(conn, req.cookie, runs)
            return
        need = sum(hdr + (12 if hole else n) for _, n, hole in runs) + hdr
        view = self.room(need)
        start = pos = self.pos
        try:
            for i, (off, n, hole) in enumerate(runs):
                done = i == len(runs) - 1
                if hole:
                    pos = conn.pack_hole(view, pos, req.cookie, off, n, done)
                else:
                    data_at = pos + hdr
                    export.device.readinto(view[data_at : data_at + n], off)
                    pos = conn.pack_read_header(view, pos, req.cookie, off, n, done)
                    pos = data_at + n
        except BaseException:
            self.pos = start
            raise
        self.pos = pos

    def sparse_read_sendfile(self, conn: p.ServerConnection, cookie: int,
                             runs: list[tuple[int, int, bool]]) -> None:
        """sparse_read's chunks with the data sent from the host file (runs of a raw file
        map to the same offsets in it)."""
        hdr = conn.read_header_size()
        for i, (off, n, hole) in enumerate(runs):
            done = i == len(runs) - 1
            if hole:
                view = self.room(hdr + 12)
                self.pos = conn.pack_hole(view, self.pos, cookie, off, n, done)
            else:
                view = self.room(hdr)
                self.pos = conn.pack_read_header(view, self.pos, cookie, off, n, done)
                self.send_file_data(off, n)

    def other_command(self, conn: p.ServerConnection, export: Export,
                      contexts: list[tuple[int, str]], req: p.Request) -> None:
        device = export.device
        rtype = req.type
        fua = export.always_fua or bool(req.flags & p.NBD_CMD_FLAG_FUA)
        if rtype == p.NBD_CMD_FLUSH:
            if not export.skip_flush:
                device.flush()
        elif rtype == p.NBD_CMD_TRIM:
            if export.discard == "unmap":
                device.discard(req.offset, req.length)
                export.known_data.clear()
                export.mark_dirty(req.offset, req.length)
            if fua:
                device.flush()
        elif rtype == p.NBD_CMD_WRITE_ZEROES:
            if req.flags & p.NBD_CMD_FLAG_FAST_ZERO and not export.info.can_fast_zero:
                self.reply_error(conn, req.cookie, p.NBD_ENOTSUP, "fast zeroing is not supported")
                return
            may_unmap = export.discard == "unmap" and not req.flags & p.NBD_CMD_FLAG_NO_HOLE
            device.write_zeroes(req.offset, req.length, may_unmap=may_unmap)
            export.known_data.clear()
            export.mark_dirty(req.offset, req.length)
            if fua:
                device.flush()
        elif rtype == p.NBD_CMD_CACHE:
            pass  # a hint; the page cache and our metadata caches fill on the read anyway
        elif rtype == p.NBD_CMD_BLOCK_STATUS:
            self.block_status(conn, export, contexts, req)
            return
        view = self.room(conn.chunk_header_size())
        self.pos = conn.pack_ok(view, self.pos, req.cookie)

    def block_status(self, conn: p.ServerConnection, export: Export,
                     contexts: list[tuple[int, str]], req: p.Request) -> None:
        length = min(req.length, BLOCK_STATUS_MAX)
        if not conn.extended:
            length = min(length, 0xFFFFFFFF)
        req_one = bool(req.flags & p.NBD_CMD_FLAG_REQ_ONE)
        chunks = []
        for cid, name in contexts:
            extents = export.context_extents(name, req.offset, length)
            if not extents:
                raise RequestError("no block status available for the range")
            if req_one:
                extents = extents[:1]
            elif len(extents) > p.MAX_EXTENTS:
                extents = extents[: p.MAX_EXTENTS]
            chunks.append((cid, extents))
        need = sum(conn.block_status_size(len(e)) for _, e in chunks)
        view = self.room(need)
        pos = self.pos
        for i, (cid, extents) in enumerate(chunks):
            pos = conn.pack_block_status(view, pos, req.cookie, cid, extents, i == len(chunks) - 1)
        self.pos = pos


class NbdServer:
    """Serves exports on any number of TCP and unix sockets until shutdown().

    ``shared``: how many negotiated clients may be served at once (0: no limit; qemu-nbd's
    -e). Connections still negotiating hold no slot; ``handshake_limit`` seconds after accept an
    unfinished negotiation is dropped (0: no limit; qemu-nbd's --handshake-limit). With
    ``shared`` 1 the exports do not advertise multi-conn, since a second connection would wait.
    ``persistent``: keep serving after the last client leaves (qemu-nbd's -t); when False the
    server stops once a client has come and all have gone.
    """

    def __init__(self, exports: Sequence[Export], *, tls_context: ssl.SSLContext | None = None,
                 shared: int = 0, persistent: bool = True,
                 handshake_limit: float = HANDSHAKE_LIMIT) -> None:
        if not exports:
            raise VdiskError("an NBD server needs at least one export")
        names = [e.name for e in exports]
        if len(set(names)) != len(names):
            raise VdiskError("export names must be unique")
        if shared < 0 or handshake_limit < 0:
            raise VdiskError("shared and handshake_limit must not be negative")
        self.exports = list(exports)
        #: What negotiation offers for each export, as this server will serve it.
        self.infos = [dataclasses.replace(e.info, can_multi_conn=e.info.can_multi_conn and shared != 1)
                      for e in self.exports]
        self.exports_by_info = {id(info): e for info, e in zip(self.infos, self.exports, strict=True)}
        self.tls_context = tls_context
        self.shared = shared
        self.persistent = persistent
        self.handshake_limit = handshake_limit
        self._negotiated = 0
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._clients: set[socket.socket] = set()
        self._lock = threading.Condition()
        self._served_any = False
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        for export in self.exports:
            assert export.metrics is not None
            register(export.metrics)

    # -- listening -----------------------------------------------------------------------------

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> tuple[str, int]:
        """Listen on a TCP address (port 0: pick a free one); returns the bound address."""
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise VdiskError(f"cannot listen on {host}:{port}: {exc.strerror}", errno=exc.errno) from None
        sock.listen(128)
        self._listeners.append(sock)
        bound = sock.getsockname()
        return bound[0], bound[1]

    def listen_unix(self, path: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise VdiskError(f"cannot listen on {path}: {exc.strerror}", errno=exc.errno) from None
        sock.listen(128)
        self._listeners.append(sock)
        self._unix_paths.append(path)
        return path

    # -- serving -------------------------------------------------------------------------------

    def start(self) -> NbdServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="nbd-accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if not self._listeners:
            raise VdiskError("the NBD server is not listening anywhere")
        sel = selectors.DefaultSelector()
        for sock in self._listeners:
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                with self._lock:
                    if self._stop or (not self.persistent and self._served_any and not self._clients):
                        return
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, 4096)
                        continue
                    assert isinstance(key.fileobj, socket.socket)
                    try:
                        client, _ = key.fileobj.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            time.sleep(0.1)  # out of descriptors: let clients finish first
                        continue
                    self._spawn(client)
                    break  # re-check for shutdown before accepting more
        finally:
            sel.close()
            self._close_listeners()

    def _spawn(self, sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Room for a few 1 MiB replies in flight: with the default (208 KiB) a sendfile of one
        # blocks 5 times on the reader (1 MiB reads QD8 on tmpfs: 1.6-2.4x faster with 4 MiB,
        # four A B B A pairs). The kernel caps it at net.core.wmem_max.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SNDBUF)
        with self._lock:
            self._clients.add(sock)
            self._served_any = True
        thread = threading.Thread(target=self._serve_client, args=(sock,), name="nbd-client",
                                  daemon=True)
        thread.start()

    def _serve_client(self, sock: socket.socket) -> None:
        client = _Client(self, sock)
        try:
            client.run()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("nbd: client connection ended: %s", exc)
        except Exception:
            log.exception("nbd: client handler failed")
        finally:
            if client.fast is not None:
                client.fast.close()
            with contextlib.suppress(OSError):
                client.sock.close()
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._clients.discard(sock)
                if client.holds_slot:
                    self._negotiated -= 1
                self._lock.notify_all()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def acquire_slot(self) -> bool:
        """Wait for one of the ``shared`` slots; False if the server is shutting down."""
        with self._lock:
            while self.shared and self._negotiated >= self.shared and not self._stop:
                self._lock.wait()
            if self._stop:
                return False
            self._negotiated += 1
            return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every client, and wait for the accept loop to end."""
        with self._lock:
            self._stop = True
            clients = list(self._clients)
            self._lock.notify_all()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._clients and time.monotonic() < deadline:
                self._lock.wait(0.05)

    def close(self) -> None:
        self.shutdown()
        self._close_listeners()
        for export in self.exports:
            assert export.metrics is not None
            unregister(export.metrics)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self._listeners.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tls_context_from_dir(path: str) -> ssl.SSLContext:
    """A server TLS context from a QEMU-style x509 credentials directory
    (server-cert.pem, server-key.pem; ca-cert.pem is used to verify client certificates when
    the directory also holds client certificates' CA and clients present one)."""
    cert = os.path.join(path, "server-cert.pem")
    key = os.path.join(path, "server-key.pem")
    for f in (cert, key):
        if not os.path.exists(f):
            raise VdiskError(f"TLS credentials directory lacks {os.path.basename(f)}", path=path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        ca = os.path.join(path, "ca-cert.pem")
        if os.path.exists(ca):
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (ssl.SSLError, OSError) as exc:
        raise VdiskError(f"cannot load TLS credentials: {exc}", path=path) from None
    return ctx


def serve(
    exports: BlockDevice | Export | Sequence[Export],
    *,
    host: str | None = None,
    port: int | None = None,
    socket_path: str | None = None,
    tls_creds: str | None = None,
    shared: int = 0,
    persistent: bool = True,
    handshake_limit: float = HANDSHAKE_LIMIT,
    background: bool = False,
    ready: Callable[[NbdServer], Any] | None = None,
) -> NbdServer:
    """Serve one or more exports over NBD.

    ``exports``: a BlockDevice (served as the default export ""), an Export, or several.
    Listens on ``socket_path`` (unix) and/or ``host``:``port`` (TCP; default 127.0.0.1:10809
    when neither is given). With ``background`` the server runs in a thread and is returned at
    once; otherwise this blocks until the server stops (``ready`` is called once listening).
    """
    if isinstance(exports, Export):
        export_list: list[Export] = [exports]
    elif isinstance(exports, Sequence):
        export_list = list(exports)
    else:
        export_list = [Export(exports)]
    tls = tls_context_from_dir(tls_creds) if tls_creds else None
    server = NbdServer(export_list, tls_context=tls, shared=shared, persistent=persistent,
                       handshake_limit=handshake_limit)
    try:
        if socket_path:
            server.listen_unix(socket_path)
        if port is not None or host is not None or not socket_path:
            server.listen_tcp(host or "127.0.0.1", 10809 if port is None else port)
    except BaseException:
        server.close()
        raise
    if ready is not None:
        ready(server)
    if background:
        return server.start()
    try:
        server.serve_forever()
    finally:
        server.close()
    return server
