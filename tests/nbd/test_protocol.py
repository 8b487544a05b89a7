"""The sans-IO NBD state machine on its own: bytes in, events and bytes out."""

from __future__ import annotations

import struct

import pytest

from vdisk.nbd import protocol as p

SIZE = 64 << 20


def exports() -> list[p.ExportInfo]:
    return [
        p.ExportInfo("disk", SIZE, description="first disk",
                     meta_contexts=(p.BASE_ALLOCATION, p.QEMU_ALLOCATION_DEPTH,
                                    p.QEMU_DIRTY_BITMAP + "b0")),
        p.ExportInfo("ro", SIZE, readonly=True),
    ]


def option(opt: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data


def name_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_payload(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = p.OPTION_REPLY.unpack_from(data, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += p.OPTION_REPLY.size
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    return out


def start(tls: bool = False, flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES
          ) -> p.ServerConnection:
    conn = p.ServerConnection(exports(), tls=tls, tls_required=tls)
    greeting = conn.data_to_send()
    assert p.HANDSHAKE.unpack(greeting) == (
        p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES)
    conn.receive_data(struct.pack(">I", flags))
    assert conn.next_event() is p.NEED_DATA
    return conn


def go(conn: p.ServerConnection, name: str = "disk") -> p.Negotiated:
    conn.receive_data(option(p.NBD_OPT_GO, name_payload(name)))
    event = conn.next_event()
    assert isinstance(event, p.Negotiated), event
    conn.data_to_send()
    return event


def test_greeting_and_bad_client_flags() -> None:
    conn = p.ServerConnection(exports())
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 0x80))
    event = conn.next_event()
    assert isinstance(event, p.Closed) and event.error


def test_list_and_info() -> None:
    conn = start()
    conn.receive_data(option(p.NBD_OPT_LIST))
    assert conn.next_event() is p.NEED_DATA
    replies = parse_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [p.NBD_REP_SERVER, p.NBD_REP_SERVER, p.NBD_REP_ACK]
    assert replies[0][2] == struct.pack(">I", 4) + b"disk" + b"first disk"
    conn.receive_data(option(p.NBD_OPT_INFO, name_payload("disk", (p.NBD_INFO_NAME,
                                                                   p.NBD_INFO_DESCRIPTION))))
    assert conn.next_event() is p.NEED_DATA
    replies = parse_replies(conn.data_to_send())
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2][2:] for r in replies if r[1] == p.NBD_REP_INFO}
    size, flags = struct.unpack(">QH", infos[p.NBD_INFO_EXPORT])
    assert size == SIZE and flags & p.NBD_FLAG_SEND_FLUSH and not flags & p.NBD_FLAG_READ_ONLY
    assert infos[p.NBD_INFO_NAME] == b"disk"
    assert infos[p.NBD_INFO_DESCRIPTION] == b"first disk"
    assert struct.unpack(">III", infos[p.NBD_INFO_BLOCK_SIZE]) == (1, 4096, p.MAX_PAYLOAD)
    assert replies[-1][1] == p.NBD_REP_ACK


def test_unknown_export_and_option_errors() -> None:
    conn = start()
    conn.receive_data(option(p.NBD_OPT_GO, name_payload("nope")))
    conn.receive_data(option(p.NBD_OPT_GO, b"\x00\x00"))  # malformed
    conn.receive_data(option(99))
    conn.receive_data(option(p.NBD_OPT_STARTTLS))  # no TLS configured
    conn.receive_data(option(p.NBD_OPT_LIST, b"x"))
    assert conn.next_event() is p.NEED_DATA
    types = [r[1] for r in parse_replies(conn.data_to_send())]
    assert types == [p.NBD_REP_ERR_UNKNOWN, p.NBD_REP_ERR_INVALID, p.NBD_REP_ERR_UNSUP,
                     p.NBD_REP_ERR_POLICY, p.NBD_REP_ERR_INVALID]


def test_oversized_option_is_drained_and_refused() -> None:
    conn = start()
    n = p.MAX_OPTION + 10
    conn.receive_data(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, n))
    conn.receive_data(bytes(n))
    conn.receive_data(option(p.NBD_OPT_LIST))
    assert conn.next_event() is p.NEED_DATA
    types = [r[1] for r in parse_replies(conn.data_to_send())]
    assert types[0] == p.NBD_REP_ERR_TOO_BIG and types[-1] == p.NBD_REP_ACK


def test_bad_option_magic_closes() -> None:
    conn = start()
    conn.receive_data(b"GARBAGE!" + bytes(8))
    event = conn.next_event()
    assert isinstance(event, p.Closed) and "magic" in (event.error or "")


def test_abort() -> None:
    conn = start()
    conn.receive_data(option(p.NBD_OPT_ABORT))
    event = conn.next_event()
    assert isinstance(event, p.Closed) and event.error is None
    assert parse_replies(conn.data_to_send())[0][1] == p.NBD_REP_ACK


def test_export_name_fallback() -> None:
    conn = start(flags=p.NBD_FLAG_C_FIXED_NEWSTYLE)
    conn.receive_data(option(p.NBD_OPT_EXPORT_NAME, b"ro"))
    event = conn.next_event()
    assert isinstance(event, p.Negotiated) and event.export.name == "ro"
    data = conn.data_to_send()
    size, flags = struct.unpack(">QH", data[:10])
    assert size == SIZE and flags & p.NBD_FLAG_READ_ONLY and len(data) == 10 + 124
    conn2 = start()
    conn2.receive_data(option(p.NBD_OPT_EXPORT_NAME, b"missing"))
    assert isinstance(conn2.next_event(), p.Closed)


def test_meta_contexts() -> None:
    conn = start()
    conn.receive_data(option(p.NBD_OPT_SET_META_CONTEXT, meta_payload("disk", [p.BASE_ALLOCATION])))
    conn.next_event()
    assert parse_replies(conn.data_to_send())[0][1] == p.NBD_REP_ERR_INVALID  # needs structured
    conn.receive_data(option(p.NBD_OPT_STRUCTURED_REPLY))
    conn.receive_data(option(p.NBD_OPT_LIST_META_CONTEXT, meta_payload("disk", [])))
    conn.receive_data(option(p.NBD_OPT_LIST_META_CONTEXT, meta_payload("disk", ["qemu:"])))
    conn.next_event()
    replies = parse_replies(conn.data_to_send())
    names = [r[2][4:].decode() for r in replies if r[1] == p.NBD_REP_META_CONTEXT]
    assert names == [p.BASE_ALLOCATION, p.QEMU_ALLOCATION_DEPTH, "qemu:dirty-bitmap:b0",
                     p.QEMU_ALLOCATION_DEPTH, "qemu:dirty-bitmap:b0"]
    conn.receive_data(option(p.NBD_OPT_SET_META_CONTEXT, meta_payload(
        "disk", ["qemu:dirty-bitmap:b0", "qemu:", "nope:x", p.BASE_ALLOCATION])))
    conn.next_event()
    replies = parse_replies(conn.data_to_send())
    selected = [(struct.unpack(">I", r[2][:4])[0], r[2][4:].decode()) for r in replies
                if r[1] == p.NBD_REP_META_CONTEXT]
    assert selected == [(2, "qemu:dirty-bitmap:b0"), (0, p.BASE_ALLOCATION)]
    event = go(conn)
    assert event.contexts == selected


def negotiated(structured: bool = True, extended: bool = False, name: str = "disk"
               ) -> p.ServerConnection:
    conn = start()
    if extended:
        conn.receive_data(option(p.NBD_OPT_EXTENDED_HEADERS))
    elif structured:
        conn.receive_data(option(p.NBD_OPT_STRUCTURED_REPLY))
    if structured or extended:
        conn.receive_data(option(p.NBD_OPT_SET_META_CONTEXT,
                                 meta_payload(name, [p.BASE_ALLOCATION])))
    go(conn, name)
    return conn


def request(conn: p.ServerConnection, rtype: int, offset: int, length: int, flags: int = 0,
            cookie: int = 7, payload: bytes = b"") -> None:
    if conn.extended:
        conn.receive_data(p.EXT_REQUEST.pack(p.NBD_EXTENDED_REQUEST_MAGIC, flags, rtype, cookie,
                                             offset, length) + payload)
    else:
        conn.receive_data(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, flags, rtype, cookie, offset,
                                         length) + payload)


def test_requests_parse_and_validate() -> None:
    conn = negotiated()
    request(conn, p.NBD_CMD_WRITE, 4096, 5, payload=b"hello", flags=p.NBD_CMD_FLAG_FUA)
    event = conn.next_event()
    assert isinstance(event, p.Request) and event.error == 0
    assert event.payload is not None and bytes(event.payload) == b"hello"
    assert event.flags == p.NBD_CMD_FLAG_FUA and event.cookie == 7
    # Past the end: EINVAL for reads, ENOSPC for writes (payload still consumed).
    request(conn, p.NBD_CMD_READ, SIZE - 1, 2)
    request(conn, p.NBD_CMD_WRITE, SIZE - 1, 2, payload=b"ab")
    request(conn, p.NBD_CMD_READ, 0, p.MAX_PAYLOAD + 1)
    request(conn, p.NBD_CMD_READ, 0, p.MAX_PAYLOAD + 1, flags=p.NBD_CMD_FLAG_DF)
    request(conn, p.NBD_CMD_READ, 0, 1, flags=p.NBD_CMD_FLAG_REQ_ONE)
    request(conn, 42, 0, 0)
    request(conn, p.NBD_CMD_BLOCK_STATUS, 0, 0)
    request(conn, p.NBD_CMD_FLUSH, 0, 0)
    errors = []
    while isinstance(event := conn.next_event(), p.Request):
        errors.append(event.error)
    assert errors == [p.NBD_EINVAL, p.NBD_ENOSPC, p.NBD_EINVAL, p.NBD_EOVERFLOW, p.NBD_EINVAL,
                      p.NBD_EINVAL, p.NBD_EINVAL, 0]


def test_oversized_write_is_drained() -> None:
    conn = negotiated()
    n = p.MAX_PAYLOAD + 1
    request(conn, p.NBD_CMD_WRITE, 0, n)
    event = conn.next_event()
    assert isinstance(event, p.Request) and event.error == p.NBD_EINVAL
    conn.receive_data(bytes(n))
    request(conn, p.NBD_CMD_FLUSH, 0, 0, cookie=9)
    event = conn.next_event()
    assert isinstance(event, p.Request) and event.cookie == 9 and not event.error


def test_readonly_export_refuses_writes() -> None:
    conn = negotiated(name="ro")
    for rtype in (p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES):
        request(conn, rtype, 0, 512)
        event = conn.next_event()
        assert isinstance(event, p.Request) and event.error == p.NBD_EPERM


def test_bad_request_magic_closes() -> None:
    conn = negotiated()
    conn.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    event = conn.next_event()
    assert isinstance(event, p.Closed) and event.error


def test_disc_and_eof() -> None:
    conn = negotiated()
    request(conn, p.NBD_CMD_DISC, 0, 0)
    event = conn.next_event()
    assert isinstance(event, p.Request) and event.type == p.NBD_CMD_DISC
    assert isinstance(conn.next_event(), p.Closed)
    conn = negotiated()
    request(conn, p.NBD_CMD_READ, 0, 512)
    conn._buf  # noqa: B018 - keep the partial header below mid-message
    conn.receive_data(b"\x25\x60")
    conn.next_event()
    assert conn.eof().error  # EOF mid-header is not a clean end


def test_byte_at_a_time_and_large_payload() -> None:
    conn = negotiated()
    data = bytes(range(256)) * 4096  # 1 MiB, more than the initial buffer
    header = p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, len(data))
    for b in header:
        assert conn.next_event() is p.NEED_DATA
        conn.receive_data(bytes([b]))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, p.Request) and event.payload is not None
    assert event.payload == data


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_reply_packing(mode: str) -> None:
    conn = negotiated(structured=mode != "simple", extended=mode == "extended")
    buf = bytearray(4096)
    pos = conn.pack_read_header(buf, 0, 5, 4096, 3)
    assert pos == conn.read_header_size()
    if mode == "simple":
        assert p.SIMPLE_REPLY.unpack_from(buf) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 5)
    elif mode == "structured":
        assert p.STRUCTURED_REPLY.unpack_from(buf) == (
            p.NBD_STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA,
            5, 11)
        assert struct.unpack_from(">Q", buf, 20)[0] == 4096
    else:
        assert p.EXT_REPLY.unpack_from(buf) == (
            p.NBD_EXTENDED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA,
            5, 4096, 11)
    end = conn.pack_error(buf, 0, 6, 22, "bad")
    assert end <= conn.error_size("bad")
    if mode != "simple":
        end = conn.pack_block_status(buf, 0, 8, 0, [(4096, 3), (512, 0)], True)
        assert end <= conn.block_status_size(2)
        if mode == "extended":
            hdr = p.EXT_REPLY.unpack_from(buf)
            assert hdr[2] == p.NBD_REPLY_TYPE_BLOCK_STATUS_EXT and hdr[5] == 8 + 32
            assert struct.unpack_from(">IIQQQQ", buf, 32) == (0, 2, 4096, 3, 512, 0)
        else:
            hdr = p.STRUCTURED_REPLY.unpack_from(buf)
            assert hdr[2] == p.NBD_REPLY_TYPE_BLOCK_STATUS and hdr[4] == 4 + 16
            assert struct.unpack_from(">IIIII", buf, 20) == (0, 4096, 3, 512, 0)


def test_tls_required() -> None:
    conn = start(tls=True)
    conn.receive_data(option(p.NBD_OPT_LIST))
    conn.next_event()
    assert parse_replies(conn.data_to_send())[0][1] == p.NBD_REP_ERR_TLS_REQD
    conn.receive_data(option(p.NBD_OPT_STARTTLS))
    assert isinstance(conn.next_event(), p.StartTLS)
    assert parse_replies(conn.data_to_send())[0][1] == p.NBD_REP_ACK
    conn.tls_started()
    conn.receive_data(option(p.NBD_OPT_STARTTLS))
    conn.next_event()
    assert parse_replies(conn.data_to_send())[0][1] == p.NBD_REP_ERR_INVALID
    go(conn)


def test_structured_then_extended_rules() -> None:
    conn = start()
    conn.receive_data(option(p.NBD_OPT_EXTENDED_HEADERS))
    conn.receive_data(option(p.NBD_OPT_STRUCTURED_REPLY))
    conn.receive_data(option(p.NBD_OPT_EXTENDED_HEADERS))
    conn.next_event()
    types = [r[1] for r in parse_replies(conn.data_to_send())]
    assert types == [p.NBD_REP_ACK, p.NBD_REP_ERR_EXT_HEADER_REQD, p.NBD_REP_ERR_INVALID]
