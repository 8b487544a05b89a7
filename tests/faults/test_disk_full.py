"""Disk full for real: an image on a 4 MiB tmpfs fills it.

The write that finds no space raises a VdiskError with ENOSPC (as does a flush that fails);
the image, copied off the full file system, opens with vdisk, keeps what was flushed before,
and qemu-img check finds no corruption. Runs as root; skips if tmpfs cannot be mounted here.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from crash.explore import qemu_corruption
from oracles import needs_qemu, small_tmpfs
from vdisk.errors import VdiskError
from vdisk.qcow2 import Qcow2Image, create

pytestmark = needs_qemu


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "full", "4M") as mnt:
        yield mnt


def _fill(path: Path) -> tuple[bytes, VdiskError]:
    """Write until the file system is full; (what was flushed, the error)."""
    flushed = written = b""
    failure: VdiskError | None = None
    img = Qcow2Image.open(str(path))
    chunk = bytes(range(256)) * (64 * 1024 // 256)
    for i in range(200):
        try:
            img.write(chunk, i * len(chunk))
        except VdiskError as exc:
            failure = exc
            break
        written += chunk
        if i % 8 == 7:
            img.flush()
            flushed = written
    try:
        img.flush()  # may still fit: the failed data write left no metadata behind
    except VdiskError as exc:
        assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(VdiskError):  # its final flush may find the disk full too
        img.close()
    assert failure is not None, "4 MiB tmpfs never filled"
    return flushed, failure


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_disk_full_surfaces_enospc_and_keeps_flushed_data(
    tiny_fs: Path, tmp_path: Path, cluster_size: int
) -> None:
    path = tiny_fs / "image.qcow2"
    create(str(path), 64 << 20, cluster_size=cluster_size)
    flushed, exc = _fill(path)
    assert exc.errno == errno.ENOSPC, exc
    assert "\n" not in str(exc)
    copy = tmp_path / "copy.qcow2"
    shutil.copy(path, copy)
    with Qcow2Image.open(str(copy)) as img:
        assert img.pread(len(flushed), 0) == flushed
    assert qemu_corruption(copy) is None


def test_close_on_full_disk_raises_vdisk_error(tiny_fs: Path) -> None:
    path = tiny_fs / "image.qcow2"
    create(str(path), 64 << 20, cluster_size=512)
    img = Qcow2Image.open(str(path))
    chunk = bytes(65536)[:-1] + b"\1"
    with contextlib.suppress(VdiskError):
        for i in range(200):
            img.write(chunk, i * len(chunk))
    with contextlib.suppress(VdiskError):
        img.flush()
    try:
        img.close()
    except VdiskError as exc:
        assert exc.errno == errno.ENOSPC
