"""The ublk file target on the host's io_uring (no ublk needed): inline READ/WRITE, FLUSH as
an FSYNC, a linked READ that comes up short and is finished through the backend, errors; and
the FileBacked capability that selects it. Oracles: the file's bytes and the kernel's CQEs."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vdisk import uring
from vdisk.backends.memory import MemoryDevice
from vdisk.backends.raw import RawDevice
from vdisk.block import BlockDevice, FileBacked
from vdisk.ublk import uapi
from vdisk.ublk.device import _async_fd
from vdisk.ublk.file_target import FileTarget
from vdisk.ublk.ring_layout import BACKING, KIND_SHIFT, LINKED_BACKING, TAG_MASK
from vdisk.uring import Ring
from vdisk.uring.ring import buffer_address

BUF = 64 << 10
DEPTH = 4


needs_uring = pytest.mark.skipif(not uring.available(), reason="io_uring not available on this kernel")


@dataclass
class Rig:
    target: FileTarget
    ring: Ring
    bufs: mmap.mmap
    views: list[memoryview]
    backend_calls: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def submit_and_reap(self) -> list[tuple[int, int, int]]:
        """Push the target's queued slots and collect what completes within a second."""
        self.ring.push(self.target.slots)
        self.target.slots.clear()
        return self.ring.wait(1, timeout=1.0)


RigFor = Callable[..., Rig]


@pytest.fixture
def rig_for() -> Iterator[RigFor]:
    made: list[tuple[Ring, mmap.mmap, list[memoryview], BlockDevice]] = []

    def make(backend: BlockDevice, fd: int | None = None) -> Rig:
        """A file target over ``backend``'s file (or over ``fd``, a stand-in for it)."""
        fd = _async_fd(backend) if fd is None else fd
        assert fd is not None
        ring = Ring(2 * DEPTH)
        ring.register_files([fd, fd])  # slot 0 stands in for the char device
        bufs = mmap.mmap(-1, DEPTH * BUF)
        whole = memoryview(bufs)
        views = [whole[t * BUF : (t + 1) * BUF] for t in range(DEPTH)]
        calls: list[tuple[int, int, int, int, int]] = []

        def serve_backend(tag: int, op: int, flags: int, off: int, length: int) -> int | None:
            calls.append((tag, op, flags, off, length))
            return -errno.EROFS

        addrs = [buffer_address(bufs) + t * BUF for t in range(DEPTH)]
        target = FileTarget(fd, backend, ring, addrs, views, [], serve_backend, "test")
        made.append((ring, bufs, [*views, whole], backend))
        return Rig(target, ring, bufs, views, calls)

    yield make
    for ring, bufs, views, backend in made:
        ring.close()
        for v in views:
            v.release()
        try:
            bufs.close()
        except BufferError:  # a logged OSError's traceback still holds a slice (as in Queue)
            pass
        backend.close()


def _raw(tmp_path: Path, data: bytes, **kw: object) -> RawDevice:
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return RawDevice(str(path), **kw)  # type: ignore[arg-type]


def test_only_a_plain_open_raw_device_offers_its_file(tmp_path: Path) -> None:
    raw = _raw(tmp_path, bytes(4096))
    assert isinstance(raw, FileBacked)
    assert raw.file_descriptor() == raw.fd
    assert _async_fd(raw) == raw.fd

    class Wrapped(RawDevice):
        pass

    other = Wrapped(raw.path)
    assert other.file_descriptor() is None
    other.close()
    raw.close()
    assert raw.file_descriptor() is None
    with MemoryDevice(4096) as mem:
        assert not isinstance(mem, FileBacked)
        assert _async_fd(mem) is None


@needs_uring
def test_inline_read_and_fua_write_hit_the_file(tmp_path: Path, rig_for: RigFor) -> None:
    data = os.urandom(32 << 10)
    rig = rig_for(_raw(tmp_path, data))
    assert rig.target.serve(1, uapi.UBLK_IO_OP_READ, 0, 4096, 8192) == 8192
    assert rig.views[1][:8192] == data[4096 : 4096 + 8192]
    rig.views[2][:4096] = b"\xab" * 4096
    fua = uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA
    assert rig.target.serve(2, uapi.UBLK_IO_OP_WRITE, fua, 16384, 4096) == 4096
    on_disk = (tmp_path / "disk.raw").read_bytes()
    assert on_disk[16384 : 16384 + 4096] == b"\xab" * 4096
    assert on_disk[:16384] == data[:16384]
    assert rig.backend_calls == []


@needs_uring
def test_a_short_inline_read_reads_zeros_past_the_end_of_the_file(
    tmp_path: Path, rig_for: RigFor
) -> None:
    data = os.urandom(6144)
    rig = rig_for(_raw(tmp_path, data, size=16384))  # the file shrank under the device
    rig.views[0][:16384] = b"\xff" * 16384
    assert rig.target.serve(0, uapi.UBLK_IO_OP_READ, 0, 0, 16384) == 16384
    assert rig.views[0][:6144] == data
    assert rig.views[0][6144:16384] == bytes(16384 - 6144)


@needs_uring
def test_readonly_writes_and_other_ops_go_to_the_backend(tmp_path: Path, rig_for: RigFor) -> None:
    rig = rig_for(_raw(tmp_path, bytes(8192), readonly=True))
    assert rig.target.serve(3, uapi.UBLK_IO_OP_WRITE, 1, 0, 4096) == -errno.EROFS
    assert rig.target.serve(3, uapi.UBLK_IO_OP_DISCARD, 3, 0, 4096) == -errno.EROFS
    assert rig.backend_calls == [(3, 1, 1, 0, 4096), (3, 3, 3, 0, 4096)]


@needs_uring
def test_flush_is_an_fsync_whose_completion_finishes_it(tmp_path: Path, rig_for: RigFor) -> None:
    rig = rig_for(_raw(tmp_path, bytes(8192)))
    assert rig.target.serve(2, uapi.UBLK_IO_OP_FLUSH, 2, 0, 0) is None
    assert rig.target.slots == [4]  # tag 2's backing slot
    cqes = rig.submit_and_reap()
    assert [(c[0] >> KIND_SHIFT, c[0] & TAG_MASK, c[1]) for c in cqes] == [(BACKING, 2, 0)]
    assert rig.target.finish(2, uapi.UBLK_IO_OP_FLUSH, 2, 0, 0, 0) == 0
    assert rig.target.finish(2, uapi.UBLK_IO_OP_FLUSH, 2, 0, 0, -errno.EIO) == -errno.EIO


@needs_uring
def test_linked_read_is_silent_when_whole_and_finished_here_when_short(
    tmp_path: Path, rig_for: RigFor
) -> None:
    data = os.urandom(10240)
    rig = rig_for(_raw(tmp_path, data, size=32768))
    rig.target.submit_linked(0, uapi.UBLK_IO_OP_READ, 0, 0, 8192)
    assert rig.submit_and_reap() == []  # success CQEs are skipped
    assert rig.views[0][:8192] == data[:8192]
    rig.views[1][:16384] = b"\xff" * 16384
    rig.target.submit_linked(1, uapi.UBLK_IO_OP_READ, 0, 4096, 16384)
    cqes = rig.submit_and_reap()
    assert [(c[0] >> KIND_SHIFT, c[0] & TAG_MASK, c[1]) for c in cqes] == [
        (LINKED_BACKING, 1, 10240 - 4096)
    ]
    assert rig.target.finish(1, uapi.UBLK_IO_OP_READ, 0, 4096, 16384, cqes[0][1]) == 16384
    assert rig.views[1][:16384] == data[4096:] + bytes(16384 - (10240 - 4096))


@needs_uring
def test_probe_decides_per_op_and_leaves_no_completion_behind(
    tmp_path: Path, rig_for: RigFor
) -> None:
    rig = rig_for(_raw(tmp_path, os.urandom(8192)))
    rig.target.probe()
    assert len(rig.target.linked) == 2 and all(isinstance(x, bool) for x in rig.target.linked)
    assert rig.ring.completions() == []


@needs_uring
def test_an_inline_error_is_the_requests_errno(tmp_path: Path, rig_for: RigFor) -> None:
    raw = _raw(tmp_path, bytes(8192))
    write_only = os.open(raw.path, os.O_WRONLY)
    try:
        rig = rig_for(raw, write_only)
        assert rig.target.serve(0, uapi.UBLK_IO_OP_READ, 0, 0, 4096) == -errno.EBADF
    finally:
        os.close(write_only)
