"""The NBD protocol without I/O: the server's state machine, and the client's codecs.

Nothing here touches a socket. A :class:`ServerConnection` is fed bytes through the
``get_buffer()`` / ``buffer_updated(n)`` pair (the caller receives straight into the connection's
buffer, as with asyncio's BufferedProtocol, so payloads are never copied), and hands back events
from ``next_event()``. Handshake replies accumulate in ``data_to_send()``; transmission replies are
packed by ``pack_*`` methods into a buffer the caller owns, so a server can lay many replies and
their read data end to end and send them with one system call.

The client side (at the end) is pure functions: encoders for options and requests, decoders for
option replies and reply chunks. client.py only moves their bytes over a socket.

Names follow NBD's doc/proto.md: fixed newstyle negotiation, structured replies, extended headers
(64-bit lengths), metadata contexts, and the transmission commands.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# --- Handshake ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- Transmission flags (per export) --------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# --- Requests and replies -------------------------------------------------------------------
NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8
CMD_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_DISC: "disc",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write_zeroes",
    NBD_CMD_BLOCK_STATUS: "block_status",
}

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# Wire error values (they are Linux errno numbers, but only these may go on the wire).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# base:allocation flags; qemu:dirty-bitmap uses bit 0 for "dirty".
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
NBD_STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"

#: Largest read/write payload accepted and advertised (as QEMU's NBD_MAX_BUFFER_SIZE).
MAX_PAYLOAD = 32 << 20
#: Longest export name / meta context query accepted (as QEMU's NBD_MAX_STRING_SIZE).
MAX_STRING = 4096
#: Largest option payload read into memory; longer ones are drained and refused.
MAX_OPTION = 64 << 10
#: A connection's receive buffer until the peer sends faster than that (see ServerConnection).
INITIAL_BUFFER = 4096
#: Extents sent per metadata context in one block status reply.
MAX_EXTENTS = 1 << 17

HANDSHAKE = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
EXT_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
EXT_REPLY = struct.Struct(">IHHQQQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT32 = struct.Struct(">II")
EXTENT64 = struct.Struct(">QQ")
_DATA_OFFSET = U64  # the offset field leading an OFFSET_DATA chunk
HOLE_CHUNK = struct.Struct(">QI")
ERROR_CHUNK_HEAD = struct.Struct(">IH")
STATUS_EXT_HEAD = struct.Struct(">II")  # context id, extent count
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
EXPORT_NAME_REPLY = struct.Struct(">QH")  # NBD_OPT_EXPORT_NAME's reply: size, flags


def errno_to_nbd(code: int | None) -> int:
    """Map a host errno to the few values NBD allows on the wire."""
    if code in (NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW):
        return code
    if code in (_errno.EROFS, _errno.EACCES):
        return NBD_EPERM
    if code in (_errno.EDQUOT, _errno.EFBIG):
        return NBD_ENOSPC
    if code in (_errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.ENOSYS):
        return NBD_ENOTSUP
    if code == _errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EIO


class ProtocolError(Exception):
    """The peer broke the protocol badly enough that the connection must be dropped."""


# --- What the server tells the state machine about its exports ------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What negotiation needs to know about one export (no device behind it here)."""

    name: str
    size: int
    readonly: bool = False
    description: str = ""
    #: Metadata contexts this export offers (base:allocation and the qemu: ones).
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    can_trim: bool = True
    can_fast_zero: bool = True
    can_multi_conn: bool = True
    can_cache: bool = True
    rotational: bool = False
    tls_only: bool = False

    def transmission_flags(self, structured: bool) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
        if self.readonly:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_WRITE_ZEROES
            if self.can_trim:
                flags |= NBD_FLAG_SEND_TRIM
            if self.can_fast_zero:
                flags |= NBD_FLAG_SEND_FAST_ZERO
        if structured:
            flags |= NBD_FLAG_SEND_DF
        if self.can_multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if self.can_cache:
            flags |= NBD_FLAG_SEND_CACHE
        if self.rotational:
            flags |= NBD_FLAG_ROTATIONAL
        return flags


# --- Events -----------------------------------------------------------------------------------


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(slots=True)
class StartTLS:
    """STARTTLS was acknowledged: send data_to_send(), wrap the socket, then tls_started()."""


@dataclass(slots=True)
class Negotiated:
    """Negotiation finished; transmission starts on ``export``."""

    export: ExportInfo
    #: Selected metadata contexts as (context id, name).
    contexts: list[tuple[int, str]]


@dataclass(slots=True)
class Request:
    """One transmission request. ``payload`` (WRITE) is a view into the connection's buffer,
    valid until the next call into the connection. ``error`` nonzero: the request is invalid
    and must be answered with that NBD error (``message`` says why) and not executed.
    ``pending`` nonzero (a streamed WRITE, see ServerConnection's ``stream_writes``): the
    payload holds only the first bytes; the caller receives the other ``pending`` bytes from
    the transport itself, before it calls into the connection again."""

    cookie: int
    type: int
    flags: int
    offset: int
    length: int
    payload: memoryview | None = None
    error: int = 0
    message: str = ""
    pending: int = 0


@dataclass(slots=True)
class Closed:
    """The connection is over: a clean end (ABORT, DISC, EOF) or ``error`` says why not."""

    error: str | None = None


Event = StartTLS | Negotiated | Request | Closed | _NeedData

# States
_CLIENT_FLAGS = "client-flags"
_OPTION = "option"
_TLS = "tls"
_TRANSMISSION = "transmission"
_CLOSED = "closed"


@dataclass
class _Meta:
    export_name: str = ""
    contexts: list[tuple[int, str]] = field(default_factory=list)


class ServerConnection:
    """Server side of one NBD connection, from greeting to disconnect."""

    def __init__(
        self,
        exports: Sequence[ExportInfo],
        *,
        tls: bool = False,
        tls_required: bool = False,
        buffer_size: int = 256 << 10,
        stream_writes: int = 0,
    ) -> None:
        """``stream_writes`` (0: off; may be set until transmission): a WRITE at least this
        long whose payload is not all buffered yet is returned at once with what is buffered,
        and the caller receives the rest (``Request.pending``): a long payload then neither
        grows nor is copied through the receive buffer."""
        self.exports = list(exports)
        self.tls_available = tls
        self.tls_required = tls and tls_required
        self.tls_active = False
        self.state = _CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.extended = False
        self.export: ExportInfo | None = None
        self.contexts: list[tuple[int, str]] = []
        self._meta = _Meta()
        self._out: list[bytes] = [
            HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        ]
        # Start small: a connection that never sends much (negotiation, idle clients) keeps a
        # page; the first receive that fills the buffer grows it to ``buffer_size``.
        self._buffer_size = buffer_size
        self.stream_writes = stream_writes
        self._buf = bytearray(min(buffer_size, INITIAL_BUFFER))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._drain = 0  # payload bytes still to discard
        self._closed_event: Closed | None = None

    # -- bytes in ------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to receive into (at least one byte, usually much more)."""
        if self._drain:
            self._drain_some()
        start, end, cap = self._start, self._end, len(self._buf)
        if end == cap or (start and cap - end < 4096):
            self._compact()
            if self._end == len(self._buf):
                # Only reachable if the caller keeps receiving without taking events.
                self._grow(len(self._buf) + 65536)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last get_buffer() view."""
        self._end += nbytes
        if self._end == len(self._buf) and len(self._buf) < self._buffer_size:
            self._grow(self._buffer_size)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Convenience for tests and non-buffered transports: copy ``data`` in."""
        view = memoryview(data).cast("B")
        if len(view) > len(self._buf) - self._end:  # grow once, not by get_buffer's steps
            self._compact()
            if len(view) > len(self._buf) - self._end:
                self._grow(self._end + len(view))
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def at_request_boundary(self) -> bool:
        """In transmission with nothing buffered and no payload to discard: the next byte
        received starts a request."""
        return self.state is _TRANSMISSION and self._start == self._end and not self._drain

    def _compact(self) -> None:
        start, end = self._start, self._end
        if start:
            n = end - start
            # Copy out first: the ranges may overlap.
            self._buf[:n] = bytes(self._view[start:end])
            self._start, self._end = 0, n

    def _need(self, n: int) -> bool:
        """True when ``n`` contiguous bytes are buffered; grows the buffer (bounded) if needed."""
        if self._end - self._start >= n:
            return True
        if n > len(self._buf) - self._start:
            if n > len(self._buf):
                # Room for a maximal payload plus its header: bounded memory per client.
                self._grow(n)
            else:
                self._compact()
        return False

    def _grow(self, size: int) -> None:
        old = self._view[self._start : self._end]
        new = bytearray(size)
        new[: len(old)] = old
        self._buf, self._view = new, memoryview(new)
        self._end -= self._start
        self._start = 0

    def _take(self, n: int) -> memoryview:
        start = self._start
        self._start = start + n
        if self._start == self._end:
            self._start = self._end = 0
        return self._view[start : start + n]

    # -- bytes out (negotiation) -----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Negotiation bytes produced so far (transmission replies use the pack_* methods)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def tls_started(self) -> None:
        """The socket is now TLS: negotiation continues inside it."""
        if self.state != _TLS:
            raise ProtocolError("tls_started() without STARTTLS")
        self.tls_active = True
        self.state = _OPTION

    # -- events --------------------------------------------------------------------------------

    def next_event(self) -> Event:
        try:
            if self.state is _TRANSMISSION:
                return self._next_request()
            return self._next_event()
        except ProtocolError as exc:
            return self._close(str(exc))

    def eof(self) -> Closed:
        """The peer closed its side: the connection is over."""
        if self.state == _CLOSED and self._closed_event:
            return self._closed_event
        clean = self.state in (_TRANSMISSION,) and self.buffered == 0 and not self._drain
        return self._close(None if clean else "peer closed the connection mid-message")

    def _close(self, error: str | None) -> Closed:
        self.state = _CLOSED
        self._closed_event = Closed(error)
        return self._closed_event

    def _next_event(self) -> Event:
        state = self.state
        if state == _TRANSMISSION:
            return self._next_request()
        if state == _OPTION:
            return self._next_option()
        if state == _CLIENT_FLAGS:
            if not self._need(4):
                return NEED_DATA
            (flags,) = U32.unpack(self._take(4))
            if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
                raise ProtocolError(f"unknown client flags {flags:#x}")
            self.fixed_newstyle = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
            self.state = _OPTION
            return self._next_option()
        if state == _TLS:
            if self.buffered:
                raise ProtocolError("plaintext data after STARTTLS")
            return NEED_DATA
        assert self._closed_event is not None
        return self._closed_event

    # -- negotiation ---------------------------------------------------------------------------

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)))
        if data:
            self._out.append(data)

    def _error(self, option: int, rtype: int, message: str) -> None:
        if not self.fixed_newstyle:
            # Without fixed newstyle the client cannot parse an error reply.
            raise ProtocolError(message)
        self._reply(option, rtype, message.encode()[:MAX_STRING])

    def _find_export(self, name: str) -> ExportInfo | None:
        for export in self.exports:
            if export.name == name:
                return export
        if name == "" and self.exports:
            return self.exports[0]  # the default export
        return None

    def _next_option(self) -> Event:
        while True:
            if self._drain:
                if not self._drain_some():
                    return NEED_DATA
                continue
            if not self._need(OPTION_HEADER.size):
                return NEED_DATA
            magic, option, length = OPTION_HEADER.unpack_from(self._view, self._start)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                if option == NBD_OPT_EXPORT_NAME:
                    raise ProtocolError("export name too long")
                self._take(OPTION_HEADER.size)
                self._drain = length
                self._error(option, NBD_REP_ERR_TOO_BIG, f"option payload of {length} bytes is too big")
                continue
            if not self._need(OPTION_HEADER.size + length):
                return NEED_DATA
            self._take(OPTION_HEADER.size)
            data = bytes(self._take(length))
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _drain_some(self) -> bool:
        n = min(self._drain, self.buffered)
        if n:
            self._take(n)
            self._drain -= n
        return self._drain == 0

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if self.tls_required and not self.tls_active and option not in (NBD_OPT_STARTTLS, NBD_OPT_ABORT):
            if option == NBD_OPT_EXPORT_NAME:
                raise ProtocolError("client skipped STARTTLS on a TLS-only server")
            self._error(option, NBD_REP_ERR_TLS_REQD, "TLS is required")
            return None
        if option == NBD_OPT_EXPORT_NAME:
            export = self._find_export(data.decode("utf-8", "replace"))
            if export is None:
                raise ProtocolError("unknown export requested with NBD_OPT_EXPORT_NAME")
            self._out.append(EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags(self.structured)))
            if not self.no_zeroes:
                self._out.append(bytes(124))
            return self._enter_transmission(export)
        if option == NBD_OPT_ABORT:
            self._reply(option, NBD_REP_ACK)
            return self._close(None)
        if option == NBD_OPT_LIST:
            if data:
                self._error(option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for export in self.exports:
                if export.tls_only and not self.tls_active:
                    continue
                self._reply(option, NBD_REP_SERVER, pack_string(export.name) + export.description.encode())
            self._reply(option, NBD_REP_ACK)
            return None
        if option == NBD_OPT_STARTTLS:
            if data:
                self._error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            elif not self.tls_available:
                self._error(option, NBD_REP_ERR_POLICY, "TLS is not configured on this server")
            elif self.tls_active:
                self._error(option, NBD_REP_ERR_INVALID, "TLS is already active")
            else:
                self._reply(option, NBD_REP_ACK)
                self.state = _TLS
                return StartTLS()
            return None
        if option in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._info_go(option, data)
        if option == NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.extended:
                self._error(option, NBD_REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            elif self.structured:
                self._error(option, NBD_REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(option, NBD_REP_ACK)
            return None
        if option == NBD_OPT_EXTENDED_HEADERS:
            if data:
                self._error(option, NBD_REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
            elif self.extended:
                self._error(option, NBD_REP_ERR_INVALID, "extended headers already negotiated")
            else:
                self.extended = self.structured = True
                self._meta = _Meta()  # a header-style change resets the selected contexts
                self._reply(option, NBD_REP_ACK)
            return None
        if option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._error(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _info_go(self, option: int, data: bytes) -> Event | None:
        parsed = parse_string(data, 0)
        if parsed is None or len(data) < parsed[1] + 2:
            self._error(option, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return None
        name, pos = parsed
        (count,) = U16.unpack_from(data, pos)
        pos += 2
        if len(data) != pos + 2 * count:
            self._error(option, NBD_REP_ERR_INVALID, "malformed information request list")
            return None
        requests = struct.unpack_from(f">{count}H", data, pos)
        export = self._find_export(name)
        if export is None:
            self._error(option, NBD_REP_ERR_UNKNOWN, f"export {name!r} not found")
            return None
        if export.tls_only and not self.tls_active:
            self._error(option, NBD_REP_ERR_TLS_REQD, "export requires TLS")
            return None
        flags = export.transmission_flags(self.structured)
        self._reply(option, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size, flags))
        if NBD_INFO_NAME in requests:
            self._reply(option, NBD_REP_INFO, U16.pack(NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in requests and export.description:
            self._reply(
                option, NBD_REP_INFO, U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode()
            )
        # Sent even when not asked for, as QEMU does: clients that ignore it lose nothing.
        self._reply(
            option,
            NBD_REP_INFO,
            INFO_BLOCK_SIZE.pack(
                NBD_INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, NBD_REP_ACK)
        if option == NBD_OPT_INFO:
            return None
        return self._enter_transmission(export)

    def _enter_transmission(self, export: ExportInfo) -> Negotiated:
        self.export = export
        self.state = _TRANSMISSION
        self.contexts = list(self._meta.contexts) if self._meta.export_name == export.name else []
        if not self.structured:
            self.contexts = []
        self._req_struct = EXT_REQUEST if self.extended else REQUEST
        self._req_unpack = self._req_struct.unpack_from
        self._req_size = self._req_struct.size
        self._req_magic = NBD_EXTENDED_REQUEST_MAGIC if self.extended else NBD_REQUEST_MAGIC
        self._size = export.size
        self._writable = not export.readonly
        return Negotiated(export, self.contexts)

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == NBD_OPT_SET_META_CONTEXT and not self.structured:
            self._error(option, NBD_REP_ERR_INVALID, "structured replies not negotiated")
            return
        parsed = parse_string(data, 0)
        if parsed is None or len(data) < parsed[1] + 4:
            self._error(option, NBD_REP_ERR_INVALID, "malformed meta context request")
            return
        name, pos = parsed
        (count,) = U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            q = parse_string(data, pos)
            if q is None:
                self._error(option, NBD_REP_ERR_INVALID, "malformed meta context query")
                return
            queries.append(q[0])
            pos = q[1]
        if pos != len(data):
            self._error(option, NBD_REP_ERR_INVALID, "trailing data in meta context request")
            return
        export = self._find_export(name)
        if export is None:
            self._error(option, NBD_REP_ERR_UNKNOWN, f"export {name!r} not found")
            return
        available = list(export.meta_contexts)
        selected: list[tuple[int, str]] = []
        if option == NBD_OPT_LIST_META_CONTEXT and not queries:
            selected = list(enumerate(available))
        else:
            for query in queries:
                for cid, ctx in enumerate(available):
                    listed = option == NBD_OPT_LIST_META_CONTEXT and _prefix_match(query, ctx)
                    if (ctx == query or listed) and (cid, ctx) not in selected:
                        selected.append((cid, ctx))
        for cid, ctx in selected:
            self._reply(option, NBD_REP_META_CONTEXT, U32.pack(cid) + ctx.encode())
        self._reply(option, NBD_REP_ACK)
        if option == NBD_OPT_SET_META_CONTEXT:
            self._meta = _Meta(export.name, selected)

    # -- transmission --------------------------------------------------------------------------

    def _next_request(self) -> Event:
        if self._drain and not self._drain_some():
            return NEED_DATA
        st = self._req_struct
        hsize = st.size
        start = self._start
        if self._end - start < hsize and not self._need(hsize):
            return NEED_DATA
        start = self._start
        magic, flags, rtype, cookie, offset, length = st.unpack_from(self._buf, start)
        if (rtype == NBD_CMD_READ and not flags & ~NBD_CMD_FLAG_FUA and magic == self._req_magic
                and offset + length <= self._size and length <= MAX_PAYLOAD):
            # The common case, validated in one test.
            start += hsize
            if start == self._end:
                self._start = self._end = 0
            else:
                self._start = start
            return Request(cookie, rtype, flags, offset, length)
        if magic != self._req_magic:
            raise ProtocolError(f"bad request magic {magic:#x}")
        export = self.export
        assert export is not None
        if rtype == NBD_CMD_WRITE:
            if length > MAX_PAYLOAD:
                self._take(hsize)
                self._drain = length
                return Request(cookie, rtype, flags, offset, length, None, NBD_EINVAL,
                               f"write of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
            buffered = self._end - self._start - hsize
            if buffered < length:
                if self.stream_writes and length >= self.stream_writes:
                    return self._streamed_write(cookie, flags, offset, length, buffered)
                if not self._need(hsize + length):
                    return NEED_DATA
            self._take(hsize)
            payload = self._take(length)
            req = Request(cookie, rtype, flags, offset, length, payload)
        else:
            self._take(hsize)
            req = Request(cookie, rtype, flags, offset, length)
            if rtype == NBD_CMD_DISC:
                self._close(None)
                return req
        self._validate(req, export)
        return req

    def _streamed_write(self, cookie: int, flags: int, offset: int, length: int,
                        buffered: int) -> Request:
        """A long WRITE handed over with the ``buffered`` payload bytes there are; the caller
        receives the rest. An invalid one keeps its payload here, to be drained."""
        self._take(self._req_size)
        first = self._take(buffered)
        req = Request(cookie, NBD_CMD_WRITE, flags, offset, length, first, pending=length - buffered)
        assert self.export is not None
        self._validate(req, self.export)
        if req.error:
            self._drain, req.pending = req.pending, 0
        return req

    def next_io(self) -> tuple[int, int, int, int, memoryview | None] | _NeedData | None:
        """The serving loop's shortcut (transmission only): the next request when it is a
        valid READ (flags: FUA at most) or a valid WRITE without flags whose payload is all
        buffered, as (type, cookie, offset, length, payload: None for a READ), taken off the
        buffer; NEED_DATA when not even a request header is buffered; None for anything else,
        left for next_event(). One call and no event object per request."""
        start, end = self._start, self._end
        hsize = self._req_size
        if self._drain:
            return None
        if end - start < hsize:
            return NEED_DATA
        magic, flags, rtype, cookie, offset, length = self._req_unpack(self._buf, start)
        if magic != self._req_magic or offset + length > self._size or length > MAX_PAYLOAD:
            return None
        start += hsize
        if rtype == NBD_CMD_READ and not flags & ~NBD_CMD_FLAG_FUA:
            payload = None
        elif rtype == NBD_CMD_WRITE and not flags and self._writable and end - start >= length:
            payload = self._view[start : start + length]
            start += length
        else:
            return None
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start
        return rtype, cookie, offset, length, payload

    def _validate(self, req: Request, export: ExportInfo) -> None:
        rtype, flags, offset, length = req.type, req.flags, req.offset, req.length
        allowed = NBD_CMD_FLAG_FUA
        if rtype == NBD_CMD_READ:
            if self.structured:
                allowed |= NBD_CMD_FLAG_DF
        elif rtype == NBD_CMD_WRITE_ZEROES:
            allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
        elif rtype == NBD_CMD_BLOCK_STATUS:
            allowed |= NBD_CMD_FLAG_REQ_ONE
        elif rtype not in (NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_CACHE):
            req.error, req.message = NBD_EINVAL, f"unknown command {rtype}"
            return
        if flags & ~allowed:
            req.error, req.message = NBD_EINVAL, f"unsupported flags {flags:#x} for command {rtype}"
            return
        writes = rtype in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)
        if writes and export.readonly:
            req.error, req.message = NBD_EPERM, "export is read-only"
            return
        if rtype == NBD_CMD_FLUSH:
            return
        if offset + length > export.size:
            req.error = NBD_ENOSPC if writes else NBD_EINVAL
            req.message = f"request [{offset}, {offset + length}) is past the end ({export.size})"
            return
        if rtype == NBD_CMD_READ and length > MAX_PAYLOAD:
            req.error = NBD_EOVERFLOW if flags & NBD_CMD_FLAG_DF else NBD_EINVAL
            req.message = f"read of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum"
        elif rtype == NBD_CMD_BLOCK_STATUS:
            if not self.contexts:
                req.error, req.message = NBD_EINVAL, "no metadata context negotiated"
            elif length == 0:
                req.error, req.message = NBD_EINVAL, "zero-length block status"
        elif rtype == NBD_CMD_TRIM and not export.can_trim:
            req.error, req.message = NBD_EINVAL, "trim is not supported"

    # -- reply packing (transmission) ------------------------------------------------------------
    # Each pack_* writes one reply chunk at buf[pos:] and returns the position after it. The caller
    # guarantees room (see the *_size helpers) and appends payload where stated.

    def chunk_header_size(self) -> int:
        if self.extended:
            return EXT_REPLY.size
        return STRUCTURED_REPLY.size if self.structured else SIMPLE_REPLY.size

    def read_header_size(self) -> int:
        """Bytes before the data of a one-chunk read reply."""
        if self.extended:
            return EXT_REPLY.size + 8
        return STRUCTURED_REPLY.size + 8 if self.structured else SIMPLE_REPLY.size

    def _chunk(self, buf: bytearray | memoryview, pos: int, cookie: int, flags: int, rtype: int,
               offset: int, length: int) -> int:
        if self.extended:
            EXT_REPLY.pack_into(buf, pos, NBD_EXTENDED_REPLY_MAGIC, flags, rtype, cookie, offset, length)
            return pos + EXT_REPLY.size
        STRUCTURED_REPLY.pack_into(buf, pos, NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)
        return pos + STRUCTURED_REPLY.size

    def pack_read_header(self, buf: bytearray | memoryview, pos: int, cookie: int, offset: int,
                         length: int, done: bool = True) -> int:
        """Header of a read reply (or one data chunk of it); ``length`` data bytes follow."""
        if not self.structured:
            SIMPLE_REPLY.pack_into(buf, pos, NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
            return pos + SIMPLE_REPLY.size
        pos = self._chunk(buf, pos, cookie, NBD_REPLY_FLAG_DONE if done else 0,
                          NBD_REPLY_TYPE_OFFSET_DATA, offset, length + 8)
        _DATA_OFFSET.pack_into(buf, pos, offset)
        return pos + 8

    def pack_hole(self, buf: bytearray | memoryview, pos: int, cookie: int, offset: int,
                  length: int, done: bool) -> int:
        """An OFFSET_HOLE chunk (structured replies only)."""
        pos = self._chunk(buf, pos, cookie, NBD_REPLY_FLAG_DONE if done else 0,
                          NBD_REPLY_TYPE_OFFSET_HOLE, offset, 12)
        HOLE_CHUNK.pack_into(buf, pos, offset, length)
        return pos + 12

    def pack_ok(self, buf: bytearray | memoryview, pos: int, cookie: int) -> int:
        if self.extended:
            return self._chunk(buf, pos, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0, 0)
        SIMPLE_REPLY.pack_into(buf, pos, NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
        return pos + SIMPLE_REPLY.size

    def error_size(self, message: str = "") -> int:
        return self.chunk_header_size() + 6 + len(message.encode()[:MAX_STRING])

    def pack_error(self, buf: bytearray | memoryview, pos: int, cookie: int, error: int,
                   message: str = "") -> int:
        """A final error reply: a simple reply without structured replies, else an error chunk."""
        error = errno_to_nbd(error)
        if not self.structured:
            SIMPLE_REPLY.pack_into(buf, pos, NBD_SIMPLE_REPLY_MAGIC, error, cookie)
            return pos + SIMPLE_REPLY.size
        text = message.encode()[:MAX_STRING]
        pos = self._chunk(buf, pos, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 0,
                          6 + len(text))
        ERROR_CHUNK_HEAD.pack_into(buf, pos, error, len(text))
        pos += 6
        buf[pos : pos + len(text)] = text
        return pos + len(text)

    def block_status_size(self, nextents: int) -> int:
        per = 16 if self.extended else 8
        return self.chunk_header_size() + 8 + per * nextents

    def pack_block_status(self, buf: bytearray | memoryview, pos: int, cookie: int,
                          context_id: int, extents: Sequence[tuple[int, int]], done: bool) -> int:
        """A block status chunk for one context: ``extents`` are (length, flags)."""
        n = len(extents)
        flags = NBD_REPLY_FLAG_DONE if done else 0
        if self.extended:
            pos = self._chunk(buf, pos, cookie, flags, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 0, 8 + 16 * n)
            STATUS_EXT_HEAD.pack_into(buf, pos, context_id, n)
            pos += 8
            for length, status in extents:
                EXTENT64.pack_into(buf, pos, length, status)
                pos += 16
            return pos
        pos = self._chunk(buf, pos, cookie, flags, NBD_REPLY_TYPE_BLOCK_STATUS, 0, 4 + 8 * n)
        U32.pack_into(buf, pos, context_id)
        pos += 4
        for length, status in extents:
            EXTENT32.pack_into(buf, pos, length, status)
            pos += 8
        return pos


def pack_string(text: str) -> bytes:
    """A string as options carry it: 32-bit length, then UTF-8 bytes."""
    data = text.encode()
    return U32.pack(len(data)) + data


def parse_string(data: bytes, pos: int) -> tuple[str, int] | None:
    """The length-prefixed string at ``data[pos:]`` and the position after it (None: malformed)."""
    if len(data) < pos + 4:
        return None
    (n,) = U32.unpack_from(data, pos)
    pos += 4
    if n > MAX_STRING or len(data) < pos + n:
        return None
    return data[pos : pos + n].decode("utf-8", "replace"), pos + n


def _prefix_match(query: str, context: str) -> bool:
    """LIST_META_CONTEXT queries may name a namespace ("base:", "qemu:") or a leaf prefix
    ending in ':' ("qemu:dirty-bitmap:") to list everything below it."""
    return query.endswith(":") and context.startswith(query)


# --- Client side: pure encoders and decoders -------------------------------------------------
# The client owns its socket; these only turn values into bytes and bytes into values, raising
# ProtocolError on anything a conforming server would not send.


def parse_greeting(data: bytes) -> int:
    """The handshake flags from the server's 18-byte newstyle greeting."""
    magic, opt_magic, flags = HANDSHAKE.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolError("not an NBD newstyle server")
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("NBD server does not support fixed newstyle negotiation")
    return int(flags)


def client_flags(server_flags: int) -> bytes:
    """The client's reply to the greeting: fixed newstyle, and no zeroes if the server allows."""
    return U32.pack(NBD_FLAG_C_FIXED_NEWSTYLE | (server_flags & NBD_FLAG_NO_ZEROES))


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def pack_go(export: str, info_requests: Sequence[int] = (NBD_INFO_BLOCK_SIZE,)) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    return pack_string(export) + struct.pack(f">H{len(info_requests)}H", len(info_requests),
                                             *info_requests)


def pack_meta_context(export: str, queries: Sequence[str]) -> bytes:
    """Payload of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT."""
    return pack_string(export) + U32.pack(len(queries)) + b"".join(map(pack_string, queries))


def parse_option_reply(header: bytes, option: int) -> tuple[int, int]:
    """(reply type, payload length) from an option reply header answering ``option``."""
    magic, opt, rtype, length = OPTION_REPLY.unpack(header)
    if magic != OPTION_REPLY_MAGIC or opt != option:
        raise ProtocolError("NBD server sent a malformed option reply")
    if length > MAX_OPTION:
        raise ProtocolError("NBD server sent an oversized option reply")
    return int(rtype), int(length)


@dataclass(frozen=True, slots=True)
class ExportDetails:
    """What NBD_REP_INFO replies told the client about the export."""

    size: int = 0
    flags: int = 0
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD


def apply_info(details: ExportDetails, payload: bytes) -> ExportDetails:
    """``details`` updated by one NBD_REP_INFO payload (unknown info types are ignored)."""
    if len(payload) < 2:
        raise ProtocolError("NBD server sent an empty NBD_REP_INFO")
    (info,) = U16.unpack_from(payload)
    if info == NBD_INFO_EXPORT and len(payload) == INFO_EXPORT.size:
        _, size, flags = INFO_EXPORT.unpack(payload)
        return ExportDetails(size, flags, details.min_block, details.preferred_block,
                             details.max_block)
    if info == NBD_INFO_BLOCK_SIZE and len(payload) == INFO_BLOCK_SIZE.size:
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
        return ExportDetails(details.size, details.flags, minimum, preferred, maximum)
    if info in (NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE):
        raise ProtocolError(f"NBD server sent a malformed NBD_REP_INFO ({info})")
    return details


def parse_meta_context_reply(payload: bytes) -> tuple[int, str]:
    """(context id, name) from an NBD_REP_META_CONTEXT payload."""
    if len(payload) < 4:
        raise ProtocolError("NBD server sent a malformed meta context reply")
    (cid,) = U32.unpack_from(payload)
    return int(cid), payload[4:].decode("utf-8", "replace")


def parse_server_entry(payload: bytes) -> tuple[str, str]:
    """(name, description) from an NBD_REP_SERVER payload."""
    parsed = parse_string(payload, 0)
    if parsed is None:
        raise ProtocolError("NBD server sent a malformed export list entry")
    name, pos = parsed
    return name, payload[pos:].decode("utf-8", "replace")


def pack_request(extended: bool, flags: int, rtype: int, cookie: int, offset: int,
                 length: int) -> bytes:
    if extended:
        return EXT_REQUEST.pack(NBD_EXTENDED_REQUEST_MAGIC, flags, rtype, cookie, offset, length)
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, rtype, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """One reply header: a simple reply (``simple``, with ``error``) or a structured chunk."""

    cookie: int
    simple: bool
    error: int = 0
    flags: int = NBD_REPLY_FLAG_DONE
    type: int = NBD_REPLY_TYPE_NONE
    length: int = 0

    @property
    def done(self) -> bool:
        return bool(self.flags & NBD_REPLY_FLAG_DONE)


def reply_header_size(magic: int, extended: bool) -> int:
    """Length of the reply header that starts with ``magic`` (the first 4 bytes)."""
    if magic == NBD_SIMPLE_REPLY_MAGIC and not extended:
        return SIMPLE_REPLY.size
    if magic == NBD_STRUCTURED_REPLY_MAGIC and not extended:
        return STRUCTURED_REPLY.size
    if magic == NBD_EXTENDED_REPLY_MAGIC and extended:
        return EXT_REPLY.size
    raise ProtocolError(f"NBD server sent a reply with bad magic {magic:#x}")


def parse_reply_header(data: bytes, extended: bool) -> ReplyHeader:
    """Decode a whole reply header (``reply_header_size`` bytes)."""
    (magic,) = U32.unpack_from(data)
    if magic == NBD_SIMPLE_REPLY_MAGIC and not extended:
        _, error, cookie = SIMPLE_REPLY.unpack(data)
        return ReplyHeader(cookie, True, error)
    if extended:
        _, flags, rtype, cookie, _, length = EXT_REPLY.unpack(data)
    else:
        _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(data)
    if length > MAX_PAYLOAD + 4096:
        raise ProtocolError("NBD server sent an oversized reply chunk")
    return ReplyHeader(cookie, False, 0, flags, rtype, length)


def parse_hole(payload: bytes) -> tuple[int, int]:
    """(offset, length) of an OFFSET_HOLE chunk."""
    if len(payload) != HOLE_CHUNK.size:
        raise ProtocolError("NBD server sent a malformed hole chunk")
    offset, length = HOLE_CHUNK.unpack(payload)
    return int(offset), int(length)


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    """(NBD error, message) of an error chunk."""
    if len(payload) < ERROR_CHUNK_HEAD.size:
        raise ProtocolError("NBD server sent a malformed error chunk")
    error, mlen = ERROR_CHUNK_HEAD.unpack_from(payload)
    text = payload[ERROR_CHUNK_HEAD.size : ERROR_CHUNK_HEAD.size + mlen]
    return int(error), text.decode("utf-8", "replace")


def parse_block_status(payload: bytes, rtype: int) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) of a BLOCK_STATUS or BLOCK_STATUS_EXT chunk."""
    if rtype == NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
        if len(payload) < STATUS_EXT_HEAD.size:
            raise ProtocolError("NBD server sent a malformed block status chunk")
        cid, count = STATUS_EXT_HEAD.unpack_from(payload)
        if len(payload) != STATUS_EXT_HEAD.size + EXTENT64.size * count:
            raise ProtocolError("NBD server sent a malformed block status chunk")
        return cid, [EXTENT64.unpack_from(payload, 8 + 16 * i) for i in range(count)]
    if len(payload) < 4 or (len(payload) - 4) % EXTENT32.size:
        raise ProtocolError("NBD server sent a malformed block status chunk")
    (cid,) = U32.unpack_from(payload)
    return cid, [EXTENT32.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
