"""vdisk.uring on the host kernel: NOPs, file reads and writes, fsync, errors, timeouts."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
from pathlib import Path

import pytest

from vdisk import uring
from vdisk.uring import Ring, UringError, ops
from vdisk.uring.ring import buffer_address

pytestmark = pytest.mark.skipif(not uring.available(), reason="io_uring not available on this kernel")


def test_nop_batch_all_complete_with_their_user_data() -> None:
    with Ring(64) as ring:
        for i in range(64):
            ops.nop(ring, 1000 + i)
        assert ring.pending == 64
        ring.submit()
        got = []
        while len(got) < 64:
            got += ring.wait(1, timeout=5)
        assert sorted(c[0] for c in got) == list(range(1000, 1064))
        assert all(c[1] == 0 for c in got)


def test_sq_full_raises_and_recovers_after_submit() -> None:
    with Ring(4) as ring:
        for i in range(ring.sq_entries):
            ops.nop(ring, i)
        with pytest.raises(UringError) as info:
            ops.nop(ring, 99)
        assert info.value.errno == errno.EBUSY
        ring.submit()
        assert len(ring.wait(ring.sq_entries, timeout=5)) == ring.sq_entries
        ops.nop(ring, 5)
        assert ring.wait(1, timeout=5)[0][:2] == (5, 0)


def test_many_batches_wrap_the_rings() -> None:
    with Ring(8) as ring:
        seen = 0
        for batch in range(50):
            for i in range(8):
                ops.nop(ring, batch * 8 + i)
            got = ring.wait(8, timeout=5)
            while len(got) < 8:
                got += ring.wait(8 - len(got), timeout=5)
            seen += len(got)
        assert seen == 400


@pytest.mark.parametrize("cqe32", [False, True])
def test_reaping_across_the_cq_end_keeps_order(cqe32: bool) -> None:
    # Odd batch sizes make the CQEs of one reap straddle the end of the CQ ring.
    with Ring(8, cqe32=cqe32) as ring:
        expected: list[int] = []
        got: list[int] = []
        n = 0
        for batch in (5, 3, 7, 2, 6, 5, 4, 7, 1, 8) * 3:
            for _ in range(batch):
                ops.nop(ring, n)
                expected.append(n)
                n += 1
            ring.submit()
            while len(got) < len(expected):
                got += [c[0] for c in ring.wait(1, timeout=5)]
        assert got == expected


def test_write_then_read_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 16)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with Ring(16) as ring:
            src = bytearray(data)
            ops.write(ring, fd, buffer_address(src), len(src), 4096, 1)
            ops.fsync(ring, fd, 2, datasync=True)
            got = ring.wait(2, timeout=5)
            while len(got) < 2:
                got += ring.wait(1, timeout=5)
            res = {c[0]: c[1] for c in got}
            assert res[1] == len(data)
            assert res[2] == 0
            assert path.read_bytes()[4096:] == data
            dst = bytearray(len(data))
            ops.read(ring, fd, buffer_address(dst), len(dst), 4096, 3)
            assert ring.wait(1, timeout=5)[0][1] == len(data)
            assert dst == data
            del src, dst
    finally:
        os.close(fd)


def test_readv_writev_and_fixed_buffers_and_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        with Ring(8) as ring:
            a, b = bytearray(b"A" * 4096), bytearray(b"B" * 4096)
            iov = ops.IovecArray([(buffer_address(a), 4096), (buffer_address(b), 4096)])
            ops.writev(ring, fd, iov, 0, 7)
            assert ring.wait(1, timeout=5)[0][:2] == (7, 8192)
            assert path.read_bytes() == b"A" * 4096 + b"B" * 4096

            fixed = mmap.mmap(-1, 8192)
            ring.register_buffers([fixed])
            ring.register_files([fd])
            base = buffer_address(fixed)
            # registered file index 0, registered buffer 0
            ops.read_fixed(ring, 0, base, 8192, 0, 0, 8, flags=ops.IOSQE_FIXED_FILE)
            assert ring.wait(1, timeout=5)[0][:2] == (8, 8192)
            assert fixed[:8192] == path.read_bytes()
            fixed[:4096] = b"C" * 4096
            ops.write_fixed(ring, fd, base, 4096, 4096, 0, 9)
            assert ring.wait(1, timeout=5)[0][:2] == (9, 4096)
            assert path.read_bytes()[4096:] == b"C" * 4096
            ring.unregister_buffers()
            ring.unregister_files()
            del iov, a, b
    finally:
        os.close(fd)


def test_errors_come_back_as_negative_errno(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with Ring(4) as ring:
            buf = bytearray(4096)
            ops.write(ring, fd, buffer_address(buf), 4096, 0, 1)  # write to a read-only fd
            ops.read(ring, 12345, buffer_address(buf), 4096, 0, 2)  # bad fd
            got = {c[0]: c[1] for c in ring.wait(2, timeout=5)}
            assert got == {1: -errno.EBADF, 2: -errno.EBADF}
            del buf
    finally:
        os.close(fd)


def test_register_bad_file_raises_uring_error() -> None:
    with Ring(4) as ring, pytest.raises(UringError) as info:
        ring.register_files([99999])
    assert info.value.errno == errno.EBADF
    assert "FILES" in str(info.value)


def test_wait_times_out_with_nothing_to_complete() -> None:
    with Ring(4) as ring:
        assert ring.wait(1, timeout=0.05) == []


def test_wait_survives_signals() -> None:
    """EINTR inside io_uring_enter is retried; the Python handler still runs."""
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    try:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with Ring(4) as ring:
            assert ring.wait(1, timeout=0.3) == []
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert hits == [1]


def test_sqe128_ring_carries_an_80_byte_command_area() -> None:
    with Ring(4, sqe128=True) as ring:
        assert ring.sqe_size == 128
        # /dev/null has no uring_cmd handler; what matters is that the 128-byte SQE round-trips
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            ops.uring_cmd(ring, fd, 0x1234, bytes(range(80)), 5)
            off = (0 & ring.sq_mask) * 128
            assert bytes(ring.sqes[off + 48 : off + 128]) == bytes(range(80))
            (c,) = ring.wait(1, timeout=5)
            assert c[0] == 5
        finally:
            os.close(fd)
        with pytest.raises(ValueError):
            ops.uring_cmd(ring, 0, 0, bytes(81), 0)


def test_close_is_idempotent() -> None:
    ring = Ring(4)
    ring.close()
    ring.close()
    assert ring.closed


def test_push_submits_fixed_slots_in_the_given_order() -> None:
    with Ring(8) as ring:
        order = [5, 2, 7, 0, 3]
        for slot in order:
            ops.RW_SQE.pack_into(ring.sqes, slot * ring.sqe_size, ops.IORING_OP_NOP, 0, 0, -1,
                                 0, 0, 0, 0, 100 + slot, 0, 0, 0)
        ring.push(order)
        got: list[int] = []
        while len(got) < len(order):
            got += [c[0] for c in ring.wait(1, timeout=5)]
        assert got == [100 + slot for slot in order]
        with pytest.raises(UringError):
            ring.push(list(range(ring.sq_entries + 1)))
