"""Backend failures reach the NBD client as the matching NBD error, and the server keeps
serving: a test-only device failing every Nth write, and a real qcow2 image on a full tmpfs."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typing_extensions import Buffer

import vdisk
from oracles import small_tmpfs
from vdisk.backends.memory import MemoryDevice
from vdisk.errors import VdiskError
from vdisk.nbd import Export, NbdServer
from vdisk.nbd import protocol as p
from vdisk.nbd.client import NbdClient, NbdError

from .conftest import run

MiB = 1 << 20


class FailingDevice(MemoryDevice):
    """Fails every ``every``-th write with a VdiskError carrying ``code``."""

    def __init__(self, size: int, every: int, code: int) -> None:
        super().__init__(size)
        self.every, self.code, self.writes = every, code, 0

    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        self.writes += 1
        if self.writes % self.every == 0:
            raise VdiskError(f"injected {errno.errorcode[self.code]}", errno=self.code)
        return super().write(buf, offset, fua)


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (errno.EIO, p.NBD_EIO),
        (errno.ENOSPC, p.NBD_ENOSPC),
        (errno.EDQUOT, p.NBD_ENOSPC),
        (errno.EROFS, p.NBD_EPERM),
    ],
)
@pytest.mark.parametrize("structured", [True, False])
def test_every_nth_write_fails_with_matching_error(
    serve_inproc: Callable[..., NbdServer], sock_path: str, code: int, wire: int, structured: bool
) -> None:
    dev = FailingDevice(4 * MiB, every=3, code=code)
    serve_inproc(Export(dev))
    failures = 0
    with NbdClient(sock_path, structured=structured) as c:
        for i in range(12):
            block = bytes([i + 1]) * 4096
            try:
                c.write(block, i * 4096)
            except NbdError as exc:
                assert exc.errno == wire
                failures += 1
                expected = bytes(4096)
            else:
                expected = block
            # The connection keeps serving: the same request stream goes on.
            assert c.pread(4096, i * 4096) == expected
    assert failures == 4


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "mnt", "3m") as mnt:
        yield mnt


def test_full_tmpfs_answers_enospc_and_keeps_serving(
    full_tmpfs: Path, serve_inproc: Callable[..., NbdServer], sock_path: str
) -> None:
    img = full_tmpfs / "d.qcow2"
    vdisk.create(str(img), 64 * MiB, format="qcow2")
    dev = vdisk.open(str(img))
    server = serve_inproc(Export(dev))
    written: dict[int, bytes] = {}
    enospc = 0
    with NbdClient(sock_path) as c:
        for i in range(16):  # 16 MiB of data into a 3 MiB file system
            block = bytes([i + 1]) * MiB
            try:
                c.write(block, i * MiB)
                written[i] = block
            except NbdError as exc:
                assert exc.errno == p.NBD_ENOSPC, exc
                enospc += 1
        assert enospc, "the tmpfs never filled up"
        # The server still answers: data acknowledged before the disk filled reads back.
        for i, block in written.items():
            assert c.pread(MiB, i * MiB) == block
        with contextlib.suppress(NbdError):
            c.flush()
    server.close()
    # close() may fail to write back metadata on the full disk (a VdiskError with ENOSPC).
    with contextlib.suppress(VdiskError):
        dev.close()
    check = run("qemu-img", "check", str(img), check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # clean, or leaks only
    print(f"tmpfs ENOSPC: {len(written)} MiB written, {enospc} writes answered NBD_ENOSPC")
