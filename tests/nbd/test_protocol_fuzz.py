"""Fuzz the server's sans-IO state machine: any byte stream, cut anywhere, ends in events or
a protocol error (Closed with a reason), never another exception, in bounded steps and memory.

Streams are random bytes, or a valid negotiation prefix (to reach every option handler and the
transmission phase) followed by options and requests with random fields and random tails.
"""

from __future__ import annotations

import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.nbd import protocol as p

EXPORTS = [
    p.ExportInfo("", 1 << 20, meta_contexts=(p.BASE_ALLOCATION, "qemu:dirty-bitmap:b")),
    p.ExportInfo("ro", 4096, readonly=True),
]
#: Upper bound on events one stream may yield (each consumes at least one header).
MAX_EVENTS = 10_000
#: The machine may grow its buffer to one maximal payload plus a header, never more.
MAX_BUFFER = p.MAX_PAYLOAD + (1 << 20)

options = st.sampled_from(
    [
        p.NBD_OPT_EXPORT_NAME,
        p.NBD_OPT_ABORT,
        p.NBD_OPT_LIST,
        p.NBD_OPT_STARTTLS,
        p.NBD_OPT_INFO,
        p.NBD_OPT_GO,
        p.NBD_OPT_STRUCTURED_REPLY,
        p.NBD_OPT_LIST_META_CONTEXT,
        p.NBD_OPT_SET_META_CONTEXT,
        p.NBD_OPT_EXTENDED_HEADERS,
        0,
        99,
    ]
)
names = st.sampled_from(["", "ro", "missing", "x" * 5000])
queries = st.lists(
    st.sampled_from([p.BASE_ALLOCATION, "qemu:", "base:", "qemu:dirty-bitmap:b", "nope"]),
    max_size=4,
)


@st.composite
def option_bytes(draw: st.DrawFn) -> bytes:
    option = draw(options)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        data = p.pack_go(draw(names), draw(st.lists(st.integers(0, 5), max_size=4)))
    elif kind == 1:
        data = p.pack_meta_context(draw(names), draw(queries))
    elif kind == 2:
        data = b""
    else:
        data = draw(st.binary(max_size=64))
    length = len(data)
    if draw(st.booleans()):
        length = draw(st.sampled_from([0, length, length + 1, p.MAX_OPTION + 1, 0xFFFFFFFF]))
    return p.OPTION_HEADER.pack(p.IHAVEOPT, option, length) + data


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    extended = draw(st.booleans())
    rtype = draw(st.integers(0, 9))
    flags = draw(st.integers(0, 0x3F))
    offset = draw(st.sampled_from([0, 512, (1 << 20) - 1, 1 << 20, 1 << 63]))
    length = draw(st.sampled_from([0, 1, 512, 4096, p.MAX_PAYLOAD + 1, 0xFFFFFFFF]))
    header = p.pack_request(
        extended and length <= 0xFFFFFFFF,
        flags,
        rtype,
        draw(st.integers(0, 2**64 - 1)),
        offset,
        length,
    )
    payload = draw(st.binary(max_size=600)) if rtype == p.NBD_CMD_WRITE else b""
    return header + payload


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=2048))
    flags = draw(st.sampled_from([0, 1, 3, 0xFF]))
    parts = [p.U32.pack(flags)]
    parts += draw(st.lists(option_bytes(), max_size=6))
    if draw(st.booleans()):
        parts.append(p.pack_option(p.NBD_OPT_GO, p.pack_go("")))
    parts += draw(st.lists(request_bytes(), max_size=12))
    parts.append(draw(st.binary(max_size=64)))
    return b"".join(parts)


def run_machine(data: bytes, cuts: list[int], tls: bool) -> list[object]:
    conn = p.ServerConnection(EXPORTS, tls=tls, tls_required=False, buffer_size=4096)
    conn.data_to_send()
    events: list[object] = []
    positions = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(positions):
        conn.receive_data(data[lo:hi])
        while True:
            event = conn.next_event()
            conn.data_to_send()
            events.append(event)
            assert len(events) < MAX_EVENTS
            assert len(conn._buf) <= MAX_BUFFER
            if isinstance(event, p.StartTLS):
                conn.tls_started()
                continue
            if event is p.NEED_DATA or isinstance(event, p.Closed):
                break
            assert isinstance(event, p.Negotiated | p.Request), event
        if isinstance(events[-1], p.Closed):
            return events
    events.append(conn.eof())
    return events


@settings(
    max_examples=int(os.environ.get("VDISK_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(streams(), st.lists(st.integers(0, 1 << 16), max_size=8), st.booleans())
def test_any_stream_ends_in_events_or_a_protocol_error(
    data: bytes, cuts: list[int], tls: bool
) -> None:
    events = run_machine(data, cuts, tls)
    assert isinstance(events[-1], p.Closed)
    for event in events:
        if isinstance(event, p.Request) and event.error:
            assert event.error in (
                p.NBD_EPERM,
                p.NBD_EIO,
                p.NBD_EINVAL,
                p.NBD_ENOSPC,
                p.NBD_EOVERFLOW,
                p.NBD_ENOTSUP,
            )


def test_huge_write_length_is_drained_not_buffered() -> None:
    # Regression guard for the bounds above: a 4 GiB write header never grows the buffer.
    data = p.U32.pack(3) + p.pack_option(p.NBD_OPT_EXPORT_NAME)
    data += p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 7, 0, 0xFFFFFFFF)
    data += bytes(100_000)
    events = run_machine(data, [], False)
    requests = [e for e in events if isinstance(e, p.Request)]
    assert requests and requests[0].error == p.NBD_EINVAL
