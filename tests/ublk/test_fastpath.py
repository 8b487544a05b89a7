"""The compiled queue loop (vdisk.ublk.fastpath) on the host's io_uring, without ublk: NOPs
stand in for the kernel's new-request CQEs, a memfd for the descriptor area, and NOP
templates for the commits and linked READs, so what the loop queued comes back as CQEs."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from vdisk import uring
from vdisk.ublk import fastpath, uapi
from vdisk.ublk.ring_layout import LINKED_BACKING, RESULT_OFFSET, RETRY, RING_RW
from vdisk.uring import Ring, ops
from vdisk.uring.ring import buffer_address

pytestmark = pytest.mark.skipif(not uring.available(), reason="io_uring not available here")

DEPTH = 4
BUF = 8192


def nop_sqe(user_data: int) -> bytes:
    return ops.RW_SQE.pack(ops.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, user_data, 0, 0, 0)


def _fast_loop(
    lib: object, ring: Ring, descs: int, bufs: mmap.mmap, depth: int = DEPTH,
    linked: list[list[bytes]] | None = None, null: bool = False, timing: bool = False,
) -> fastpath.FastLoop:
    """A loop over ``descs`` whose commits are NOPs tagged RETRY (4 KiB of descriptors)."""
    return fastpath.FastLoop(
        lib, ring, descs, 4096, 0, bufs, BUF, depth,  # type: ignore[arg-type]
        [nop_sqe(RETRY << 16 | tag) for tag in range(depth)], linked, null, RESULT_OFFSET,
        ops.RWF_DSYNC, 5.0, timing,
    )  # fmt: skip


@pytest.fixture
def lib() -> object:
    built = fastpath.library()
    if built is None:
        pytest.skip("no C compiler: the fast path is off")
    return built


def test_serves_null_and_linked_requests_and_hands_back_the_rest(lib: object) -> None:
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    requests = [  # op_flags, nr_sectors, start_sector per tag
        (uapi.UBLK_IO_OP_READ, 8, 16),
        (uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA, 4, 0),
        (0xFF, 1, 0),  # no such op: Python's to fail
        (uapi.UBLK_IO_OP_FLUSH, 0, 0),
    ]
    os.pwrite(descs, b"".join(uapi.IO_DESC.pack(f, n, s, 0) for f, n, s in requests), 0)
    bufs = mmap.mmap(-1, DEPTH * BUF)
    bufs[:] = b"\xaa" * len(bufs)
    with Ring(16) as ring:
        fast = _fast_loop(lib, ring, descs, bufs, null=True, timing=True)
        try:
            # Four "new requests" (kind 0, res 0), in slots the tags do not own.
            for tag in range(DEPTH):
                ring.sqes[(8 + tag) * 64 : (9 + tag) * 64] = nop_sqe(tag)
            ring.push([8, 9, 10, 11])
            assert fast.run() == [(2, 0, 0)]  # the unknown op comes back, the rest was served
            assert bufs[:BUF] == b"\xaa" * BUF  # a null READ leaves its buffer as ublksrv's does
            assert bufs[BUF : 2 * BUF] == b"\xaa" * BUF  # a WRITE leaves its buffer alone
            results = {tag: struct.unpack_from("<i", ring.sqes, (2 * tag + 1) * 64 + RESULT_OFFSET)[0]
                       for tag in (0, 1, 3)}
            assert results == {0: 4096, 1: 2048, 3: 0}
            tallies = [t[:3] for t in fast.take_tallies()]  # (op, count, bytes); means vary
            assert tallies == [(0, 1, 4096), (1, 1, 2048), (2, 1, 0)]
            assert fast.take_tallies() == []  # taken
            # The three commits it queued (NOP stand-ins) complete on the next call.
            got: list[tuple[int, int, int]] = []
            while len(got) < 3:
                got += fast.run()
            assert sorted(ud for ud, _res, _flags in got) == [RETRY << 16 | t for t in (0, 1, 3)]
        finally:
            fast.close()
    bufs.close()
    os.close(descs)


def test_linked_read_queues_its_backing_op_with_the_request_patched_in(lib: object) -> None:
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    os.pwrite(descs, uapi.IO_DESC.pack(uapi.UBLK_IO_OP_READ, 16, 100, 0), 24)  # tag 1
    bufs = mmap.mmap(-1, DEPTH * BUF)
    with Ring(16) as ring:
        linked = [[nop_sqe(LINKED_BACKING << 16 | tag) for tag in range(DEPTH)], []]
        fast = _fast_loop(lib, ring, descs, bufs, linked=linked)
        try:
            ring.sqes[8 * 64 : 9 * 64] = nop_sqe(1)
            ring.push([8])
            # Served in C: the linked READ and the commit (NOPs here) complete, and come back.
            got: list[tuple[int, int, int]] = []
            while len(got) < 2:
                got += fast.run()
            off, _addr, length, rw_flags = struct.unpack_from("<QQII", ring.sqes, 2 * 64 + 8)
            assert (off, length, rw_flags) == (100 << 9, 16 << 9, 0)
            assert sorted(ud for ud, _r, _f in got) == [RETRY << 16 | 1, LINKED_BACKING << 16 | 1]
            assert fast.take_tallies()[0][:3] == (0, 1, 16 << 9)
        finally:
            fast.close()
    bufs.close()
    os.close(descs)


def test_extent_requests_run_at_the_host_offset_the_table_gives(lib: object) -> None:
    """The qcow2 host-extent path: a READ the table maps is read at its host offset (a real
    READ on a memfd standing in for the image file), its success CQE is counted off the
    epoch in C; a WRITE to a read-only entry, a FUA WRITE, a range over two clusters that are
    not contiguous on the host, and an unknown cluster all go back to Python."""
    from vdisk.ublk.ring_layout import EXTENT

    cb = 16  # 64 KiB clusters
    image = os.memfd_create("image")
    os.pwrite(image, bytes(range(256)) * 1024, 0)  # 256 KiB of a known pattern
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    requests = [  # op_flags, nr_sectors, start_sector per tag
        (uapi.UBLK_IO_OP_READ, 8, 3),  # cluster 0 -> host 128 KiB, at +1536
        (uapi.UBLK_IO_OP_WRITE, 8, 0),  # cluster 0 is readable only
        (uapi.UBLK_IO_OP_READ, 16, (1 << 7) - 8),  # clusters 1 and 2: not contiguous
        (uapi.UBLK_IO_OP_READ, 8, 3 << 7),  # cluster 3: unknown
        (uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA, 8, 1 << 7),  # FUA: the image's
    ]
    depth = len(requests)
    os.pwrite(descs, b"".join(uapi.IO_DESC.pack(f, n, s, 0) for f, n, s in requests), 0)
    bufs = mmap.mmap(-1, depth * BUF)
    table = mmap.mmap(-1, 8 * 8)
    entries = [(128 << 10) | 1, (64 << 10) | 3, (192 << 10) | 3, 0]
    table[: 8 * len(entries)] = struct.pack(f"<{len(entries)}Q", *entries)
    with Ring(32) as ring:
        fast = _fast_loop(lib, ring, descs, bufs, depth=depth)
        addrs = [buffer_address(bufs) + tag * BUF for tag in range(depth)]
        reads = [ops.RW_SQE.pack(ops.IORING_OP_READ, ops.IOSQE_IO_LINK, 0, image, 0, addr, 0,
                                 0, EXTENT << 16 | tag, 0, 0, 0) for tag, addr in enumerate(addrs)]
        writes = [ops.RW_SQE.pack(ops.IORING_OP_WRITE, ops.IOSQE_IO_LINK, 0, image, 0, addr, 0,
                                  0, EXTENT << 16 | tag, 0, 0, 0)
                  for tag, addr in enumerate(addrs)]
        fast.set_extents(buffer_address(table), len(entries), cb, [reads, writes])
        try:
            for tag in range(depth):
                ring.sqes[(16 + tag) * 64 : (17 + tag) * 64] = nop_sqe(tag)
            ring.push(list(range(16, 16 + depth)))
            got: list[tuple[int, int, int]] = []
            while len(got) < depth:
                got += fast.run()
            # Tag 0's commit (a NOP) came after its READ; the others are Python's to serve.
            assert sorted(ud for ud, _r, _f in got) == [1, 2, 3, 4, RETRY << 16 | 0]
            assert bufs[:4096] == os.pread(image, 4096, (128 << 10) + 1536)
            assert fast.state.extent_ios == 1
            assert list(fast.state.inflight) == [0, 0]  # its success CQE was counted off
        finally:
            fast.close()
    table.close()
    bufs.close()
    os.close(descs)
    os.close(image)


def test_inline_requests_run_on_the_file_and_failures_go_back_to_python(lib: object) -> None:
    """READ/WRITE the kernel would punt to a worker run in C with pread/pwrite on the file (at
    the host offset when there is an extent table); a FUA WRITE, a READ of the file's end (short)
    and an op not set inline go back to Python, untouched, which serves them whole."""
    image = os.memfd_create("image")
    os.pwrite(image, bytes(range(256)) * 64, 0)  # 16 KiB of a known pattern
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    requests = [  # op_flags, nr_sectors, start_sector per tag
        (uapi.UBLK_IO_OP_WRITE, 8, 8),  # 4 KiB at 4 KiB: C
        (uapi.UBLK_IO_OP_READ, 8, 16),  # 4 KiB at 8 KiB: C
        (uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA, 8, 0),  # FUA: Python's
        (uapi.UBLK_IO_OP_READ, 16, 24),  # 8 KiB at 12 KiB, past the end: short, Python's
    ]
    os.pwrite(descs, b"".join(uapi.IO_DESC.pack(f, n, s, 0) for f, n, s in requests), 0)
    bufs = mmap.mmap(-1, DEPTH * BUF)
    bufs[:] = b"\x5a" * len(bufs)
    with Ring(16) as ring:
        fast = _fast_loop(lib, ring, descs, bufs, timing=True)
        fast.set_inline(image, [True, True])
        try:
            for tag in range(DEPTH):
                ring.sqes[(8 + tag) * 64 : (9 + tag) * 64] = nop_sqe(tag)
            ring.push([8, 9, 10, 11])
            got: list[tuple[int, int, int]] = []
            while len(got) < 2:
                got += [c for c in fast.run() if c[0] < DEPTH]
            assert sorted(got) == [(2, 0, 0), (3, 0, 0)]  # handed back as new requests
            assert os.pread(image, 4096, 4096) == b"\x5a" * 4096  # tag 0's buffer, written
            assert bufs[BUF : BUF + 4096] == (bytes(range(256)) * 16)  # tag 1 read the file
            assert os.pread(image, 4096, 0) == bytes(range(256)) * 16  # the FUA write: not yet
            assert fast.state.inline_ios == 2
            results = {tag: struct.unpack_from("<i", ring.sqes, (2 * tag + 1) * 64 + RESULT_OFFSET)[0]
                       for tag in (0, 1)}
            assert results == {0: 4096, 1: 4096}
            assert [t[:3] for t in fast.take_tallies()] == [(0, 1, 4096), (1, 1, 4096)]
        finally:
            fast.close()
    bufs.close()
    os.close(descs)
    os.close(image)


def test_long_inline_requests_go_through_the_ring_and_are_committed_on_their_cqe(
    lib: object,
) -> None:
    """An inline op of ring_min_len bytes or more is queued on the ring unlinked (ublksrv's
    way: the kernel's worker copies it while the loop serves on); C commits it with its
    length on a full CQE and hands a short one to Python. A shorter one still runs inline."""
    image = os.memfd_create("image")
    os.ftruncate(image, 16 << 10)
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    requests = [  # op_flags, nr_sectors, start_sector per tag
        (uapi.UBLK_IO_OP_WRITE, 16, 0),  # 8 KiB at 0: through the ring
        (uapi.UBLK_IO_OP_WRITE, 8, 16),  # 4 KiB at 8 KiB: inline
        (uapi.UBLK_IO_OP_READ, 16, 24),  # 8 KiB at 12 KiB, past the end: short, Python's
    ]
    depth = len(requests)
    os.pwrite(descs, b"".join(uapi.IO_DESC.pack(f, n, s, 0) for f, n, s in requests), 0)
    bufs = mmap.mmap(-1, depth * BUF)
    for tag in range(depth):
        bufs[tag * BUF : (tag + 1) * BUF] = bytes([0x30 + tag]) * BUF
    base = buffer_address(bufs)
    ring_sqe = [
        [ops.RW_SQE.pack(opcode, 0, 0, image, 0, base + tag * BUF, 0, 0,
                         RING_RW << 16 | tag, 0, 0, 0) for tag in range(depth)]
        for opcode in (ops.IORING_OP_READ, ops.IORING_OP_WRITE)
    ]  # fmt: skip
    with Ring(16) as ring:
        fast = _fast_loop(lib, ring, descs, bufs, depth=depth)
        fast.set_inline(image, [True, True], ring_sqe, 8192)
        try:
            for tag in range(depth):
                ring.sqes[(8 + tag) * 64 : (9 + tag) * 64] = nop_sqe(tag)
            ring.push([8, 9, 10])
            got: list[tuple[int, int, int]] = []
            while len(got) < 3:
                got += fast.run()
            assert sorted(c[:2] for c in got) == [
                (RETRY << 16 | 0, 0), (RETRY << 16 | 1, 0), (RING_RW << 16 | 2, 4096)
            ]  # two commits, and the short READ for Python
            assert os.pread(image, 12 << 10, 0) == b"\x30" * 8192 + b"\x31" * 4096
            results = [struct.unpack_from("<i", ring.sqes, (2 * tag + 1) * 64 + RESULT_OFFSET)[0]
                       for tag in (0, 1)]  # fmt: skip
            assert results == [8192, 4096]
            assert fast.state.ring_ios == 2 and fast.state.inline_ios == 1
        finally:
            fast.close()
    bufs.close()
    os.close(descs)
    os.close(image)


def test_inline_extent_writes_go_to_the_host_offset_or_back_to_python(lib: object) -> None:
    """With a host-extent table, an inline WRITE lands at the host offset of a writable
    entry; one to a read-only entry goes back to Python and the file is untouched."""
    cb = 16  # 64 KiB clusters
    image = os.memfd_create("image")
    os.ftruncate(image, 256 << 10)
    descs = os.memfd_create("descs")
    os.ftruncate(descs, 4096)
    requests = [
        (uapi.UBLK_IO_OP_WRITE, 8, (1 << 7) + 2),  # cluster 1 -> host 192 KiB, at +1 KiB
        (uapi.UBLK_IO_OP_WRITE, 8, 0),  # cluster 0: readable only
    ]
    depth = len(requests)
    os.pwrite(descs, b"".join(uapi.IO_DESC.pack(f, n, s, 0) for f, n, s in requests), 0)
    bufs = mmap.mmap(-1, depth * BUF)
    bufs[:] = b"\x77" * len(bufs)
    table = mmap.mmap(-1, 8 * 2)
    table[:] = struct.pack("<2Q", (64 << 10) | 1, (192 << 10) | 3)
    with Ring(16) as ring:
        fast = _fast_loop(lib, ring, descs, bufs, depth=depth)
        fast.set_extents(buffer_address(table), 2, cb, [[], []])
        fast.set_inline(image, [False, True])
        try:
            for tag in range(depth):
                ring.sqes[(8 + tag) * 64 : (9 + tag) * 64] = nop_sqe(tag)
            ring.push([8, 9])
            got: list[tuple[int, int, int]] = []
            while not any(c[0] == 1 for c in got):
                got += fast.run()
            assert (1, 0, 0) in got
            assert os.pread(image, 4096, (192 << 10) + 1024) == b"\x77" * 4096
            assert os.pread(image, 256 << 10, 0).count(0) == (256 << 10) - 4096
            assert fast.state.inline_ios == 1 and fast.state.extent_ios == 0
        finally:
            fast.close()
    table.close()
    bufs.close()
    os.close(descs)
    os.close(image)
