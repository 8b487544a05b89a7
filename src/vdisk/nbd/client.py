"""A small blocking NBD client: a BlockDevice over an NBD export (for convert and for tests).

URIs as libnbd and QEMU spell them: ``nbd://HOST[:PORT]/[EXPORT]`` and
``nbd+unix:///[EXPORT]?socket=PATH``. One request is in flight at a time (a lock serializes
callers), which is all convert and the tests need.

Only socket I/O lives here: every byte is encoded and decoded by protocol.py's client codecs.
Every socket or protocol failure surfaces as a VdiskError naming the server, with an errno.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from typing_extensions import Buffer

from ..block import BlockDeviceBase, Extent, merge_extents
from ..errors import VdiskError
from . import protocol as p


class NbdError(VdiskError):
    """The server answered a request with an error."""


@dataclass
class Reply:
    """Everything a server sent for one request."""

    error: int = 0
    message: str = ""
    #: base offset-relative chunks: (offset, length, is_hole) in arrival order
    chunks: list[tuple[int, int, bool]] = field(default_factory=list)
    #: context id -> list of (length, flags)
    block_status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    types: list[int] = field(default_factory=list)


def parse_uri(uri: str) -> tuple[str | tuple[str, int], str]:
    """(unix path or (host, port), export name) from an nbd:// or nbd+unix:// URI."""
    parts = urllib.parse.urlsplit(uri)
    name = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme == "nbd+unix":
        query = urllib.parse.parse_qs(parts.query)
        if "socket" not in query:
            raise VdiskError(f"NBD URI {uri!r} lacks ?socket=PATH")
        return query["socket"][0], name
    if parts.scheme == "nbd":
        return (parts.hostname or "localhost", parts.port or 10809), name
    raise VdiskError(f"unsupported NBD URI {uri!r} (nbd:// or nbd+unix://)")


def _describe(address: str | tuple[str, int]) -> str:
    if isinstance(address, str):
        return f"nbd+unix:///?socket={address}"
    return f"nbd://{address[0]}:{address[1]}"


@contextlib.contextmanager
def _wire_errors(where: str) -> Iterator[None]:
    """Turn socket and protocol failures into one-line VdiskErrors naming ``where``."""
    try:
        yield
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EIO
        text = exc.strerror or str(exc) or type(exc).__name__
        raise VdiskError(f"NBD connection to {where} failed: {text}", errno=code) from None
    except p.ProtocolError as exc:
        raise VdiskError(f"NBD server {where}: {exc}", errno=errno.EPROTO) from None


def connect_socket(address: str | tuple[str, int]) -> socket.socket:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise VdiskError(f"cannot connect to NBD server {_describe(address)}: "
                         f"{exc.strerror or exc}", errno=exc.errno) from None
    return sock


class _Wire:
    """Blocking send and receive of whole messages on one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if not n:
                raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
            view = view[n:]

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def sendmsg_all(self, views: list[memoryview]) -> None:
        while views:
            n = self.sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(p.pack_option(option, data))

    def option_reply(self, option: int) -> tuple[int, bytes]:
        rtype, length = p.parse_option_reply(self.recv(p.OPTION_REPLY.size), option)
        return rtype, self.recv(length)

    def simple_option(self, option: int) -> bool:
        self.option(option)
        rtype, _ = self.option_reply(option)
        return rtype == p.NBD_REP_ACK

    def greet(self) -> None:
        """Read the greeting and answer it (fixed newstyle)."""
        flags = p.parse_greeting(self.recv(p.HANDSHAKE.size))
        self.sock.sendall(p.client_flags(flags))


class NbdClient(BlockDeviceBase):
    """An NBD export as a BlockDevice."""

    def __init__(
        self,
        address: str | tuple[str, int] | socket.socket,
        export: str = "",
        *,
        structured: bool = True,
        extended: bool = False,
        meta_contexts: Sequence[str] = (p.BASE_ALLOCATION,),
        readonly: bool = False,
    ) -> None:
        if isinstance(address, socket.socket):
            self.sock = address
            self.where = f"socket {address.fileno()}"
        else:
            self.where = _describe(address)
            self.sock = connect_socket(address)
        self.wire = _Wire(self.sock)
        self._lock = threading.Lock()
        self._cookie = 0
        self.structured = False
        self.extended = False
        self.contexts: dict[str, int] = {}
        try:
            with _wire_errors(self.where):
                self._handshake(export, structured, extended, meta_contexts)
        except BaseException:
            self.sock.close()
            raise
        super().__init__(self.export_size, readonly or bool(self.flags & p.NBD_FLAG_READ_ONLY),
                         f"nbd:{export}")

    @classmethod
    def from_uri(cls, uri: str, **kwargs: object) -> NbdClient:
        address, name = parse_uri(uri)
        return cls(address, name, **kwargs)  # type: ignore[arg-type]

    # -- negotiation ---------------------------------------------------------------------------

    def _handshake(self, export: str, structured: bool, extended: bool,
                   meta_contexts: Sequence[str]) -> None:
        wire = self.wire
        wire.greet()
        if extended and wire.simple_option(p.NBD_OPT_EXTENDED_HEADERS):
            self.extended = self.structured = True
        if structured and not self.extended and wire.simple_option(p.NBD_OPT_STRUCTURED_REPLY):
            self.structured = True
        if self.structured and meta_contexts:
            wire.option(p.NBD_OPT_SET_META_CONTEXT, p.pack_meta_context(export, meta_contexts))
            while True:
                rtype, payload = wire.option_reply(p.NBD_OPT_SET_META_CONTEXT)
                if rtype != p.NBD_REP_META_CONTEXT:
                    break
                cid, name = p.parse_meta_context_reply(payload)
                self.contexts[name] = cid
        wire.option(p.NBD_OPT_GO, p.pack_go(export))
        details = p.ExportDetails()
        while True:
            rtype, payload = wire.option_reply(p.NBD_OPT_GO)
            if rtype == p.NBD_REP_INFO:
                details = p.apply_info(details, payload)
            elif rtype == p.NBD_REP_ACK:
                break
            elif rtype & p.NBD_REP_FLAG_ERROR:
                text = payload.decode("utf-8", "replace")
                raise VdiskError(f"NBD server {self.where} refused export {export!r}: "
                                 f"{text or hex(rtype)}", errno=errno.ENOENT)
        self.export_size, self.flags = details.size, details.flags
        self.min_block, self.preferred_block = details.min_block, details.preferred_block
        self.max_block = details.max_block

    # -- requests ------------------------------------------------------------------------------

    def request(self, rtype: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: Buffer | None = None, into: memoryview | None = None) -> Reply:
        """Send one request and collect its whole reply (read data lands in ``into``)."""
        with self._lock:
            try:
                with _wire_errors(self.where):
                    return self._exchange(rtype, offset, length, flags, payload, into)
            except VdiskError:
                # Mid-message failures leave the stream out of step: no later request may
                # read this one's leftovers as its reply.
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                raise

    def _exchange(self, rtype: int, offset: int, length: int, flags: int,
                  payload: Buffer | None, into: memoryview | None) -> Reply:
        self._cookie += 1
        cookie = self._cookie
        header = p.pack_request(self.extended, flags, rtype, cookie, offset, length)
        if payload is not None:
            self.wire.sendmsg_all([memoryview(header), memoryview(payload).cast("B")])
        else:
            self.sock.sendall(header)
        if rtype == p.NBD_CMD_DISC:
            return Reply()
        return self._read_reply(cookie, offset, into)

    def _read_reply(self, cookie: int, req_offset: int, into: memoryview | None) -> Reply:
        reply = Reply()
        wire = self.wire
        while True:
            head = wire.recv(4)
            size = p.reply_header_size(p.U32.unpack(head)[0], self.extended)
            header = p.parse_reply_header(head + wire.recv(size - 4), self.extended)
            if header.cookie != cookie:
                raise p.ProtocolError(f"reply for cookie {header.cookie}, expected {cookie}")
            if header.simple:
                # Structured mode allows simple replies only for requests without data chunks.
                if reply.types:
                    raise p.ProtocolError("simple reply in the middle of a structured reply")
                reply.error = header.error
                if not header.error and into is not None and not self.structured:
                    wire.recv_into(into)
                return reply
            if not self.structured:
                raise p.ProtocolError("structured reply without structured replies negotiated")
            reply.types.append(header.type)
            self._read_chunk(header, req_offset, into, reply)
            if header.done:
                return reply

    def _read_chunk(self, header: p.ReplyHeader, req_offset: int, into: memoryview | None,
                    reply: Reply) -> None:
        wire, rtype, length = self.wire, header.type, header.length
        if rtype == p.NBD_REPLY_TYPE_OFFSET_DATA:
            if length < 8:
                raise p.ProtocolError("data chunk shorter than its offset")
            (off,) = p.U64.unpack(wire.recv(8))
            n = length - 8
            rel = off - req_offset
            if into is None or rel < 0 or rel + n > len(into):
                raise p.ProtocolError("data outside the request")
            wire.recv_into(into[rel : rel + n])
            reply.chunks.append((off, n, False))
            return
        data = wire.recv(length)
        if rtype == p.NBD_REPLY_TYPE_OFFSET_HOLE:
            off, n = p.parse_hole(data)
            rel = off - req_offset
            if into is None or rel < 0 or rel + n > len(into):
                raise p.ProtocolError("hole outside the request")
            into[rel : rel + n] = bytes(n)
            reply.chunks.append((off, n, True))
        elif rtype in (p.NBD_REPLY_TYPE_BLOCK_STATUS, p.NBD_REPLY_TYPE_BLOCK_STATUS_EXT):
            cid, extents = p.parse_block_status(data, rtype)
            reply.block_status[cid] = extents
        elif rtype & (1 << 15):
            reply.error, reply.message = p.parse_error_chunk(data)

    def _check(self, reply: Reply, what: str) -> Reply:
        if reply.error:
            raise NbdError(f"NBD {what} failed: error {reply.error} {reply.message}".rstrip(),
                           errno=reply.error)
        return reply

    # -- BlockDevice ---------------------------------------------------------------------------

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf).cast("B")
        self.check_request(offset, len(view))
        step = self.max_block
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            self._check(self.request(p.NBD_CMD_READ, offset + pos, len(part), into=part), "read")
        return len(view)

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        view = memoryview(buf).cast("B")
        self.check_request(offset, len(view), write=True)
        flags = p.NBD_CMD_FLAG_FUA if fua else 0
        step = self.max_block
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            self._check(self.request(p.NBD_CMD_WRITE, offset + pos, len(part), flags, payload=part),
                        "write")
        return len(view)

    def _ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = 1 << 30
        return [(offset + pos, min(step, length - pos)) for pos in range(0, length, step)]

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        flags = 0 if may_unmap else p.NBD_CMD_FLAG_NO_HOLE
        for off, n in self._ranges(offset, length):
            self._check(self.request(p.NBD_CMD_WRITE_ZEROES, off, n, flags), "write zeroes")

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        if not self.flags & p.NBD_FLAG_SEND_TRIM:
            return
        for off, n in self._ranges(offset, length):
            self._check(self.request(p.NBD_CMD_TRIM, off, n), "trim")

    def flush(self) -> None:
        if self.flags & p.NBD_FLAG_SEND_FLUSH:
            self._check(self.request(p.NBD_CMD_FLUSH), "flush")

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        cid = self.contexts.get(p.BASE_ALLOCATION)
        if cid is None:
            return [Extent(offset, length, data=True, zero=False)]
        extents: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, 1 << 30)
            reply = self._check(self.request(p.NBD_CMD_BLOCK_STATUS, pos, n), "block status")
            got = reply.block_status.get(cid) or []
            if not got:
                raise VdiskError("NBD server sent no block status")
            for elen, flags in got:
                elen = min(elen, end - pos)
                if elen <= 0:
                    break
                hole = bool(flags & p.NBD_STATE_HOLE)
                extents.append(Extent(pos, elen, data=not hole,
                                      zero=bool(flags & p.NBD_STATE_ZERO), present=not hole))
                pos += elen
        return merge_extents(extents)

    def close(self) -> None:
        if not self._closed:
            try:
                self.request(p.NBD_CMD_DISC)
            except VdiskError:
                pass  # the server is gone already: closing is all that is left
            finally:
                self.sock.close()
                super().close()


def list_exports(address: str | tuple[str, int]) -> list[tuple[str, str]]:
    """(name, description) of every export, via NBD_OPT_LIST."""
    sock = connect_socket(address)
    wire = _Wire(sock)
    try:
        with _wire_errors(_describe(address)):
            wire.greet()
            wire.option(p.NBD_OPT_LIST)
            out = []
            while True:
                rtype, data = wire.option_reply(p.NBD_OPT_LIST)
                if rtype != p.NBD_REP_SERVER:
                    break
                out.append(p.parse_server_entry(data))
            wire.option(p.NBD_OPT_ABORT)
            return out
    finally:
        sock.close()
