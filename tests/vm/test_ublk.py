"""The ublk server for real, inside the test VM (Linux 6.1): filesystems on every backend, fio
verify, discard and write-zeroes, bad input. Oracles: mkfs/mount/sha256 of a file tree, fio's
own verification, qemu-img check/convert, blkdiscard and the kernel's view of the device."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

FS_SIZE = 320 << 20  # mkfs.xfs wants at least 300 MiB


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=300)


def make_tree(root: Path) -> dict[str, str]:
    """A small tree of files with random content; returns relative path -> sha256."""
    sums = {}
    for i in range(12):
        d = root / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        data = os.urandom(1000 + i * 37_000)
        (d / f"f{i}").write_bytes(data)
        sums[f"d{i % 3}/f{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def check_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


@contextmanager
def served(backend: object, **params: object) -> Iterator[str]:
    from vdisk.ublk.device import Device, UblkParams

    dev = Device.create(backend, UblkParams(**params))  # type: ignore[arg-type]
    try:
        yield dev.start()
    finally:
        dev.close()
    assert not os.path.exists(dev.block_path)


def fs_round_trip(path: str, fs: str, tmp: Path) -> None:
    mnt = tmp / f"mnt-{fs}"
    mnt.mkdir(exist_ok=True)
    sh(f"mkfs.{fs}", "-q", *(["-f"] if fs == "xfs" else ["-F"]), path)
    sh("mount", path, str(mnt))
    try:
        sums = make_tree(mnt)
        sh("sync")
    finally:
        sh("umount", str(mnt))
    sh("mount", path, str(mnt))
    try:
        check_tree(mnt, sums)
    finally:
        sh("umount", str(mnt))


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystems_on_raw_and_memory(tmp_path: Path, fs: str) -> None:
    from vdisk.backends.memory import MemoryDevice
    from vdisk.backends.raw import RawDevice, create_raw

    image = tmp_path / "disk.raw"
    create_raw(str(image), FS_SIZE)
    with RawDevice(str(image)) as raw, served(raw, queues=2, depth=32) as path:
        fs_round_trip(path, fs, tmp_path)
    with MemoryDevice(FS_SIZE) as mem, served(mem, queues=2, depth=32) as path:
        fs_round_trip(path, fs, tmp_path)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_on_qcow2_matches_qemu_img(tmp_path: Path, fs: str) -> None:
    import vdisk

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    image = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(FS_SIZE))
    with vdisk.open(str(image)) as disk, served(disk, queues=2, depth=32) as path:
        fs_round_trip(path, fs, tmp_path)
        device_bytes = Path(path).read_bytes()
    check = sh("qemu-img", "check", str(image), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "conv.raw"
    sh("qemu-img", "convert", "-O", "raw", str(image), str(raw))
    assert raw.read_bytes() == device_bytes


def test_zip_member_serves_a_readonly_filesystem(tmp_path: Path) -> None:
    from vdisk.backends.zipmember import ZipMemberDevice

    src = tmp_path / "tree"
    sums = make_tree(src)
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    sh("mkfs.ext4", "-q", "-F", "-d", str(src), str(image))
    archive = tmp_path / "fs.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("README", "not the image")
        zf.write(image, "disk/fs.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ZipMemberDevice(str(archive), "disk/fs.img") as member, served(member) as path:
        assert Path(f"/sys/block/{Path(path).name}/ro").read_text().strip() == "1"
        sh("mount", "-o", "ro,noload", path, str(mnt))
        try:
            check_tree(mnt, sums)
        finally:
            sh("umount", str(mnt))
        # (no write attempt here: an fd left open on /dev/ublkbN would make DEL_DEV wait)


def test_null_reads_zeros_and_accepts_writes() -> None:
    from vdisk.backends.null import NullDevice

    with NullDevice(64 << 20) as null, served(null) as path:
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert Path(path).read_bytes()[: 1 << 20] == bytes(1 << 20)


def test_fio_randwrite_verify_several_queues(tmp_path: Path) -> None:
    from vdisk.backends.raw import RawDevice, create_raw

    if shutil.which("fio") is None:
        pytest.skip("fio not installed")
    image = tmp_path / "fio.raw"
    create_raw(str(image), 64 << 20)
    with RawDevice(str(image)) as raw, served(raw, queues=2, depth=64) as path:
        out = sh(
            "fio", "--name=v", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--size=16m",
            "--iodepth=64", "--ioengine=libaio", "--direct=1", "--numjobs=2",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--group_reporting",
            "--offset_increment=24m", check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "verify" not in out.stderr.lower(), out.stderr


def test_discard_and_write_zeroes(tmp_path: Path) -> None:
    from vdisk.backends.memory import MemoryDevice

    with MemoryDevice(32 << 20) as mem, served(mem) as path:
        limits = Path(f"/sys/block/{Path(path).name}/queue/discard_max_bytes").read_text()
        assert 0 < int(limits) < 1 << 32
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"\xaa" * (4 << 20), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        sh("blkdiscard", "-z", "-o", "0", "-l", str(1 << 20), path)
        sh("blkdiscard", "-o", str(2 << 20), "-l", str(1 << 20), path)
        assert mem.pread(1 << 20, 0) == bytes(1 << 20)
        assert mem.pread(1 << 20, 1 << 20) == b"\xaa" * (1 << 20)
        assert mem.pread(1 << 20, 2 << 20) == bytes(1 << 20)  # the memory backend zeroes
        data = open(path, "rb").read(4 << 20)  # noqa: SIM115
        assert data[: 1 << 20] == bytes(1 << 20)
        assert data[3 << 20 :] == b"\xaa" * (1 << 20)


def test_metrics_count_requests() -> None:
    from vdisk.backends.memory import MemoryDevice
    from vdisk.ublk.device import Device, UblkParams

    with MemoryDevice(8 << 20) as mem:
        dev = Device.create(mem, UblkParams())
        try:
            path = dev.start()
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            import mmap

            buf = mmap.mmap(-1, 1 << 16)
            os.pwritev(fd, [buf], 0)
            os.preadv(fd, [buf], 1 << 16)
            os.close(fd)
            assert dev.metrics is not None
            snap = dev.metrics.snapshot()
            assert snap["write"].count >= 1 and snap["write"].bytes >= 1 << 16
            assert snap["read"].count >= 1
            assert snap["read"].p99_us >= snap["read"].p50_us > 0
        finally:
            dev.close()


def test_bad_input_gives_clear_errors_and_no_stuck_device(tmp_path: Path) -> None:
    from vdisk.backends.memory import MemoryDevice
    from vdisk.ublk.control import list_device_ids
    from vdisk.ublk.device import Device, UblkParams
    from vdisk.ublk.errors import UblkError

    before = list_device_ids()
    with MemoryDevice(8 << 20) as mem:
        for bad in (
            UblkParams(queues=0),
            UblkParams(depth=5000),
            UblkParams(logical_block_size=1000),
            UblkParams(max_io_buf_bytes=1000),
            UblkParams(size=1 << 30),
        ):
            with pytest.raises(UblkError) as info:
                Device.create(mem, bad)
            assert info.value.errno == errno.EINVAL
            assert "\n" not in str(info.value)
        with pytest.raises(UblkError) as info:
            Device.create(mem, UblkParams(queues=5000))
        assert "queues" in str(info.value)
        # More queues than CPUs: Linux clamps to the CPU count; the device uses what it got.
        dev = Device.create(mem, UblkParams(queues=64))
        try:
            assert 1 <= dev.info.nr_hw_queues <= (os.cpu_count() or 1)
            dev.start()
        finally:
            dev.close()
    assert list_device_ids() == before

    # A backend that raises: the request fails with EIO, the device stays usable and closes.
    class Failing(MemoryDevice):
        def readinto(self, buf: object, offset: int) -> int:  # type: ignore[override]
            if offset >= 4 << 20:
                raise OSError(errno.EIO, "injected")
            return super().readinto(buf, offset)  # type: ignore[arg-type]

    with Failing(8 << 20) as failing, served(failing) as path:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            with pytest.raises(OSError) as err:
                os.preadv(fd, [buf], 5 << 20)
            assert err.value.errno == errno.EIO
            assert os.preadv(fd, [buf], 0) == 4096
        finally:
            os.close(fd)

    # The backing file vanishes while served: I/O still goes to the open file; nothing hangs.
    from vdisk.backends.raw import RawDevice, create_raw

    image = tmp_path / "gone.raw"
    create_raw(str(image), 8 << 20)
    with RawDevice(str(image)) as raw, served(raw) as path:
        image.unlink()
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"z" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert list_device_ids() == before


def _server_pid(dev_id: int) -> int:
    import json

    out = sh("vdisk", "ublk", "list", "-n", str(dev_id), "--json").stdout
    return int(json.loads(out)[0]["pid"])


def test_cli_add_list_del_and_kill9_recover(tmp_path: Path) -> None:
    image = tmp_path / "cli.raw"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(
        ["vdisk", "ublk", "add", "-t", "raw", "-f", str(image), "-r", "-q", "2", "-n", "7"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout
    assert out.strip() == "/dev/ublkb7"
    listing = subprocess.run(["vdisk", "ublk", "list", "-n", "7"], capture_output=True,
                             text=True, env=env, check=True).stdout
    assert "state LIVE" in listing and str(image) in listing
    pattern = os.urandom(1 << 20)
    fd = os.open("/dev/ublkb7", os.O_WRONLY)
    os.pwrite(fd, pattern, 1 << 20)
    os.fsync(fd)
    os.close(fd)
    os.kill(_server_pid(7), 9)
    out = subprocess.run(["vdisk", "ublk", "recover", "-n", "7"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/dev/ublkb7"
    fd = os.open("/dev/ublkb7", os.O_RDWR)
    try:
        assert os.pread(fd, 1 << 20, 1 << 20) == pattern
        os.pwrite(fd, b"after" * 100, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert image.read_bytes()[:500] == b"after" * 100
    # The recovered server serves until deleted; Linux 6.1 may not let DEL_DEV finish after a
    # recovery (its device reference), so bound the wait and accept that outcome.
    subprocess.run(["vdisk", "ublk", "del", "-n", "7", "--timeout", "10"], env=env,
                   capture_output=True, timeout=60)
