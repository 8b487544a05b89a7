"""A small blocking NBD client: a BlockDevice over an NBD export (for convert and for tests).

URIs as libnbd and QEMU spell them: ``nbd://HOST[:PORT]/[EXPORT]`` and
``nbd+unix:///[EXPORT]?socket=PATH``. One request is in flight at a time (a lock serializes
callers), which is all convert and the tests need.
"""

from __future__ import annotations

import socket
import struct
import threading
import urllib.parse
from collections.abc import Sequence
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


def connect_socket(address: str | tuple[str, int]) -> socket.socket:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
        else:
            sock = socket.create_connection(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise VdiskError(f"cannot connect to NBD server {address}: {exc.strerror or exc}",
                         errno=exc.errno) from None
    return sock


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
        self.sock = address if isinstance(address, socket.socket) else connect_socket(address)
        self._lock = threading.Lock()
        self._cookie = 0
        self.structured = False
        self.extended = False
        self.contexts: dict[str, int] = {}
        try:
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

    # -- wire helpers --------------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if not n:
                raise VdiskError("NBD server closed the connection")
            view = view[n:]

    def _sendmsg_all(self, views: list[memoryview]) -> None:
        while views:
            n = self.sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = p.OPTION_REPLY.unpack(self._recv(p.OPTION_REPLY.size))
        if magic != p.OPTION_REPLY_MAGIC or opt != option:
            raise VdiskError("NBD server sent a malformed option reply")
        if length > p.MAX_OPTION:
            raise VdiskError("NBD server sent an oversized option reply")
        return rtype, self._recv(length)

    def _simple_option(self, option: int) -> bool:
        self._send_option(option)
        rtype, _ = self._option_reply(option)
        return rtype == p.NBD_REP_ACK

    def _handshake(self, export: str, structured: bool, extended: bool,
                   meta_contexts: Sequence[str]) -> None:
        magic, opt_magic, flags = p.HANDSHAKE.unpack(self._recv(p.HANDSHAKE.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise VdiskError("not an NBD newstyle server")
        if not flags & p.NBD_FLAG_FIXED_NEWSTYLE:
            raise VdiskError("NBD server does not support fixed newstyle negotiation")
        self.sock.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | (flags & p.NBD_FLAG_NO_ZEROES)))
        if extended and self._simple_option(p.NBD_OPT_EXTENDED_HEADERS):
            self.extended = self.structured = True
        if structured and not self.extended and self._simple_option(p.NBD_OPT_STRUCTURED_REPLY):
            self.structured = True
        name = export.encode()
        if self.structured and meta_contexts:
            data = p.U32.pack(len(name)) + name + p.U32.pack(len(meta_contexts))
            for ctx in meta_contexts:
                data += p.U32.pack(len(ctx.encode())) + ctx.encode()
            self._send_option(p.NBD_OPT_SET_META_CONTEXT, data)
            while True:
                rtype, payload = self._option_reply(p.NBD_OPT_SET_META_CONTEXT)
                if rtype == p.NBD_REP_META_CONTEXT:
                    (cid,) = p.U32.unpack_from(payload)
                    self.contexts[payload[4:].decode()] = cid
                    continue
                break
        self._send_option(
            p.NBD_OPT_GO,
            p.U32.pack(len(name)) + name + struct.pack(">HH", 1, p.NBD_INFO_BLOCK_SIZE),
        )
        self.min_block, self.preferred_block, self.max_block = 1, 4096, p.MAX_PAYLOAD
        while True:
            rtype, payload = self._option_reply(p.NBD_OPT_GO)
            if rtype == p.NBD_REP_INFO:
                (info,) = p.U16.unpack_from(payload)
                if info == p.NBD_INFO_EXPORT:
                    _, self.export_size, self.flags = struct.unpack(">HQH", payload)
                elif info == p.NBD_INFO_BLOCK_SIZE:
                    _, self.min_block, self.preferred_block, self.max_block = struct.unpack(
                        ">HIII", payload)
            elif rtype == p.NBD_REP_ACK:
                break
            elif rtype & p.NBD_REP_FLAG_ERROR:
                text = payload.decode("utf-8", "replace")
                raise VdiskError(f"NBD server refused export {export!r}: {text or hex(rtype)}")

    # -- requests ------------------------------------------------------------------------------

    def request(self, rtype: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: Buffer | None = None, into: memoryview | None = None) -> Reply:
        """Send one request and collect its whole reply (read data lands in ``into``)."""
        with self._lock:
            self._cookie += 1
            cookie = self._cookie
            if self.extended:
                header = p.EXT_REQUEST.pack(p.NBD_EXTENDED_REQUEST_MAGIC, flags, rtype, cookie,
                                            offset, length)
            else:
                header = p.REQUEST.pack(p.NBD_REQUEST_MAGIC, flags, rtype, cookie, offset, length)
            if payload is not None:
                self._sendmsg_all([memoryview(header), memoryview(payload).cast("B")])
            else:
                self.sock.sendall(header)
            if rtype == p.NBD_CMD_DISC:
                return Reply()
            return self._read_reply(cookie, offset, into)

    def _read_reply(self, cookie: int, req_offset: int, into: memoryview | None) -> Reply:
        reply = Reply()
        if not self.structured:
            magic, error, got = p.SIMPLE_REPLY.unpack(self._recv(p.SIMPLE_REPLY.size))
            if magic != p.NBD_SIMPLE_REPLY_MAGIC or got != cookie:
                raise VdiskError("NBD server sent a malformed reply")
            reply.error = error
            if not error and into is not None:
                self._recv_into(into)
            return reply
        while True:
            head = self._recv(4)
            (magic,) = p.U32.unpack(head)
            if magic == p.NBD_SIMPLE_REPLY_MAGIC and not self.extended:
                # Allowed in structured mode for replies without payload.
                error, got = struct.unpack(">IQ", self._recv(12))
                if got != cookie or reply.types:
                    raise VdiskError("NBD server sent a malformed reply")
                reply.error = error
                return reply
            if self.extended:
                magic, flags, rtype, got, _, length = p.EXT_REPLY.unpack(
                    head + self._recv(p.EXT_REPLY.size - 4))
                ok_magic = p.NBD_EXTENDED_REPLY_MAGIC
            else:
                magic, flags, rtype, got, length = p.STRUCTURED_REPLY.unpack(
                    head + self._recv(p.STRUCTURED_REPLY.size - 4))
                ok_magic = p.NBD_STRUCTURED_REPLY_MAGIC
            if length > p.MAX_PAYLOAD + 4096:
                raise VdiskError("NBD server sent an oversized reply chunk")
            if magic != ok_magic or got != cookie:
                raise VdiskError("NBD server sent a malformed structured reply")
            reply.types.append(rtype)
            if rtype == p.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = p.U64.unpack(self._recv(8))
                n = length - 8
                rel = off - req_offset
                if into is None or rel < 0 or rel + n > len(into):
                    raise VdiskError("NBD server sent data outside the request")
                self._recv_into(into[rel : rel + n])
                reply.chunks.append((off, n, False))
            elif rtype == p.NBD_REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", self._recv(length))
                rel = off - req_offset
                if into is None or rel < 0 or rel + n > len(into):
                    raise VdiskError("NBD server sent a hole outside the request")
                into[rel : rel + n] = bytes(n)
                reply.chunks.append((off, n, True))
            elif rtype == p.NBD_REPLY_TYPE_BLOCK_STATUS:
                data = self._recv(length)
                (cid,) = p.U32.unpack_from(data)
                reply.block_status[cid] = [p.EXTENT32.unpack_from(data, 4 + 8 * i)
                                           for i in range((length - 4) // 8)]
            elif rtype == p.NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
                data = self._recv(length)
                cid, count = struct.unpack_from(">II", data)
                reply.block_status[cid] = [p.EXTENT64.unpack_from(data, 8 + 16 * i)
                                           for i in range(count)]
            elif rtype & (1 << 15):
                data = self._recv(length)
                error, mlen = struct.unpack_from(">IH", data)
                reply.error = error
                reply.message = data[6 : 6 + mlen].decode("utf-8", "replace")
            else:
                self._recv(length)
            if flags & p.NBD_REPLY_FLAG_DONE:
                return reply

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
            except OSError:
                pass
            finally:
                self.sock.close()
                super().close()


def list_exports(address: str | tuple[str, int]) -> list[tuple[str, str]]:
    """(name, description) of every export, via NBD_OPT_LIST."""
    sock = connect_socket(address)
    try:
        c = NbdClient.__new__(NbdClient)
        c.sock = sock
        magic, _, _ = p.HANDSHAKE.unpack(c._recv(p.HANDSHAKE.size))
        if magic != p.NBDMAGIC:
            raise VdiskError("not an NBD server")
        sock.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
        c._send_option(p.NBD_OPT_LIST)
        out = []
        while True:
            rtype, data = c._option_reply(p.NBD_OPT_LIST)
            if rtype != p.NBD_REP_SERVER:
                break
            (n,) = p.U32.unpack_from(data)
            out.append((data[4 : 4 + n].decode(), data[4 + n :].decode()))
        c._send_option(p.NBD_OPT_ABORT)
        return out
    finally:
        sock.close()
