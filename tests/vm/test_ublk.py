"""The ublk server for real, inside the test VM (Linux 6.1): filesystems on every backend, fio
verify, discard and write-zeroes, bad input. Oracles: mkfs/mount/sha256 of a file tree, fio's
own verification, qemu-img check/convert, blkdiscard and the kernel's view of the device."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
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


def test_null_reads_whole_and_accepts_writes() -> None:
    """Reads before any write are zeros (fresh buffers); after writes a read is whole, its
    bytes unspecified (the compiled loop leaves the buffer as it is, as ublksrv's null does)."""
    from vdisk.backends.null import NullDevice

    with NullDevice(64 << 20) as null, served(null) as path:
        assert Path(path).read_bytes()[: 1 << 20] == bytes(1 << 20)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert len(Path(path).read_bytes()) == 64 << 20


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


def assert_gone(dev_id: int, env: dict[str, str] | None = None) -> None:
    """The device left no trace: no nodes, not known to the driver, not listed."""
    import json

    from vdisk.ublk.control import list_device_ids

    assert not os.path.exists(f"/dev/ublkb{dev_id}")
    assert not os.path.exists(f"/dev/ublkc{dev_id}")
    assert dev_id not in list_device_ids()
    if env is not None:
        listing = sh_env(env, "vdisk", "ublk", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        assert dev_id not in [row["dev_id"] for row in json.loads(listing.stdout)]


def sh_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)


def one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    """A failed CLI command: exit status 1, one line on stderr naming the problem."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def test_bad_input_gives_clear_errors_and_no_stuck_device(tmp_path: Path) -> None:
    from vdisk.backends.memory import MemoryDevice
    from vdisk.ublk import uapi
    from vdisk.ublk.control import list_device_ids
    from vdisk.ublk.device import Device, DeviceState, UblkParams
    from vdisk.ublk.errors import UblkError

    before = list_device_ids()
    with MemoryDevice(8 << 20) as mem:
        # Invalid parameters: refused before ADD_DEV.
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
        # Too many queues: refused (before or by ADD_DEV).
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

        # START_DEV fails after every queue has fetched its tags: the kernel dropped the
        # parameters when SET_PARAMS refused a bad block size, and START_DEV needs them.
        dev = Device.create(mem, UblkParams())
        bad_params = uapi.Params(basic=uapi.ParamBasic(logical_bs_shift=20, dev_sectors=16384))
        with pytest.raises(UblkError) as info:
            dev.control.set_params(dev.dev_id, bad_params)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(UblkError) as info:
            dev.start()
        assert info.value.operation.startswith("START_DEV") and "\n" not in str(info.value)
        assert dev.state is DeviceState.CLOSED
        assert list_device_ids() == before

        # The server fails between FETCH_REQ and START_DEV (an interrupt, a crash in our code).
        class Interrupted(Device):
            def _start_queues(self) -> None:
                super()._start_queues()
                raise RuntimeError("injected between FETCH_REQ and START_DEV")

        dev = Interrupted.create(mem, UblkParams(queues=2))
        with pytest.raises(RuntimeError):
            dev.start()
        assert dev.state is DeviceState.CLOSED
        assert list_device_ids() == before

        # A queue fails to set up (its tag buffers cannot be allocated: 4096 x 32 MiB).
        dev = Device.create(mem, UblkParams(depth=4096, max_io_buf_bytes=32 << 20))
        with pytest.raises(UblkError) as info:
            dev.start()
        assert "queue" in info.value.operation and info.value.errno == errno.ENOMEM
        assert "\n" not in str(info.value)
        assert list_device_ids() == before

    # A backend that raises: the request fails with EIO, the device stays usable and closes.
    class Failing(MemoryDevice):
        def readinto(self, buf: object, offset: int) -> int:  # type: ignore[override]
            if offset >= 4 << 20:
                raise OSError(errno.EIO, "injected")
            return super().readinto(buf, offset)  # type: ignore[arg-type]

        def write(self, buf: object, offset: int, fua: bool = False) -> None:  # type: ignore[override]
            if offset >= 4 << 20:
                raise ValueError("a bug in the backend")  # not an OSError: still EIO
            super().write(buf, offset, fua)  # type: ignore[arg-type]

    with Failing(8 << 20) as failing, served(failing) as path:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            with pytest.raises(OSError) as err:
                os.preadv(fd, [buf], 5 << 20)
            assert err.value.errno == errno.EIO
            with pytest.raises(OSError) as err:
                os.pwritev(fd, [buf], 6 << 20)
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

    # Backends that cannot be opened: one line, no device (the daemon never creates one).
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    missing = sh_env(env, "vdisk", "ublk", "add", "-t", "raw", "-f", str(image), "-n", "12")
    one_line_error(missing, str(image))
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"not an image" * 100)
    not_qcow2 = sh_env(env, "vdisk", "ublk", "add", "-t", "qcow2", "-f", str(junk), "-n", "12",
                       "--foreground")
    one_line_error(not_qcow2)
    assert list_device_ids() == before


def _server_pid(dev_id: int, env: dict[str, str]) -> int:
    import json

    out = sh_env(env, "vdisk", "ublk", "list", "-n", str(dev_id), "--json").stdout
    return int(json.loads(out)[0]["pid"])


def _server_state(pid: int, env: dict[str, str]) -> str:
    """What a server that failed to finish was doing: its threads' wait channels and kernel
    stacks, and its log (for a failure seen only on a loaded CI host)."""
    lines = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}") else []:
        for name in ("comm", "wchan", "stack"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    lines.append(f"{tid} {name}: {f.read().strip()}")
            except OSError as exc:
                lines.append(f"{tid} {name}: {exc}")
    try:
        with open(env["VDISK_UBLK_LOG"]) as f:
            lines.append("log:\n" + f.read())
    except OSError:
        pass
    return "\n".join(lines)


def test_cli_add_list_del_and_kill9_recover(tmp_path: Path) -> None:
    image = tmp_path / "cli.raw"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"),
               VDISK_UBLK_LOG=str(tmp_path / "server.log"))
    out = sh_env(env, "vdisk", "ublk", "add", "-t", "raw", "-f", str(image), "-r", "-q", "2",
                 "-n", "7")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/dev/ublkb7"
    listing = sh_env(env, "vdisk", "ublk", "list", "-n", "7").stdout
    assert "state LIVE" in listing and str(image) in listing
    one_line_error(sh_env(env, "vdisk", "ublk", "add", "-t", "null", "--size", "1M", "-n", "7"),
                   "already exists")
    # Nothing to recover while the server lives.
    one_line_error(sh_env(env, "vdisk", "ublk", "recover", "-n", "7"), "live", "pid")
    pattern = os.urandom(1 << 20)
    fd = os.open("/dev/ublkb7", os.O_WRONLY)
    os.pwrite(fd, pattern, 1 << 20)
    os.fsync(fd)
    os.close(fd)
    os.kill(_server_pid(7, env), 9)
    out = sh_env(env, "vdisk", "ublk", "recover", "-v", "-n", "7")
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
    # The recovered device deletes like any other (the server sends the one DEL_DEV).
    server = _server_pid(7, env)
    out = sh_env(env, "vdisk", "ublk", "del", "-n", "7")
    assert out.returncode == 0, (out.stderr, _server_state(server, env))
    assert_gone(7, env)
    one_line_error(sh_env(env, "vdisk", "ublk", "del", "-n", "7"), "no such device")
    one_line_error(sh_env(env, "vdisk", "ublk", "recover", "-n", "7"), "no such device")
    one_line_error(sh_env(env, "vdisk", "ublk", "list", "-n", "7"), "no such device")


def test_cli_del_after_kill9_without_recover(tmp_path: Path) -> None:
    """A server killed for good: its device (quiesced with -r, dead without) is deleted by
    `del` itself; recovery of a missing backing file fails in one line and changes nothing."""
    image = tmp_path / "k.raw"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    for dev_id, flags in ((10, ["-r"]), (11, [])):
        out = sh_env(env, "vdisk", "ublk", "add", "-t", "raw", "-f", str(image), "-n",
                     str(dev_id), *flags)
        assert out.returncode == 0, out.stderr
        os.kill(_server_pid(dev_id, env), 9)
    moved = tmp_path / "moved.raw"
    image.rename(moved)
    one_line_error(sh_env(env, "vdisk", "ublk", "recover", "-n", "10"), str(image))
    one_line_error(sh_env(env, "vdisk", "ublk", "recover", "-n", "11"), "user recovery")
    for dev_id in (10, 11):
        out = sh_env(env, "vdisk", "ublk", "del", "-n", str(dev_id))
        assert out.returncode == 0, out.stderr
        assert_gone(dev_id)
    assert_gone(10, env)


def _wait_gone(dev_id: int, pid: int) -> None:
    """Wait (bounded) until the server process ended and its device is gone."""
    import time

    from vdisk.ublk.device import process_alive

    deadline = time.monotonic() + 120
    while process_alive(pid) or os.path.exists(f"/dev/ublkc{dev_id}"):
        assert time.monotonic() < deadline, f"server {pid} of ublk{dev_id} did not exit"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_foreground_server_shuts_down_cleanly_on_signal(tmp_path: Path, sig: str) -> None:
    import signal

    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(
        ["vdisk", "ublk", "add", "-t", "mem", "--size", "16M", "-n", "8", "--foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "/dev/ublkb8"
        fd = os.open("/dev/ublkb8", os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 4096, 4096)
            os.fsync(fd)
            assert os.pread(fd, 4096, 4096) == b"x" * 4096
        finally:
            os.close(fd)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert err == "", err
    assert_gone(8, env)


def test_background_server_shuts_down_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal

    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    out = sh_env(env, "vdisk", "ublk", "add", "-t", "null", "--size", "16M", "-q", "2", "-n", "9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/dev/ublkb9"
    pid = _server_pid(9, env)
    os.kill(pid, signal.SIGTERM)
    _wait_gone(9, pid)
    assert_gone(9, env)


def test_del_waits_for_an_opener_and_says_so(tmp_path: Path) -> None:
    """DEL_DEV cannot finish while /dev/ublkbN is open: `del` gives up after its --timeout with
    one line naming the server; once the opener closes, the server finishes the deletion."""
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    out = sh_env(env, "vdisk", "ublk", "add", "-t", "mem", "--size", "8M", "-n", "13")
    assert out.returncode == 0, out.stderr
    pid = _server_pid(13, env)
    fd = os.open("/dev/ublkb13", os.O_RDONLY)
    try:
        out = sh_env(env, "vdisk", "ublk", "del", "-n", "13", "--timeout", "3")
        one_line_error(out, f"pid {pid}", "did not delete")
        assert not os.path.exists("/dev/ublkb13")  # stopped: the disk is gone already
    finally:
        os.close(fd)
    _wait_gone(13, pid)
    assert_gone(13, env)


def test_close_refuses_to_wait_for_its_own_opener() -> None:
    """DEL_DEV from a process that still has /dev/ublkbN open would wait for itself for ever
    (unkillably); close() says so instead, and `delete` finishes once the fd is closed."""
    from vdisk.backends.memory import MemoryDevice
    from vdisk.ublk.control import Control
    from vdisk.ublk.device import Device, UblkParams, delete
    from vdisk.ublk.errors import UblkError

    with MemoryDevice(8 << 20) as mem:
        dev = Device.create(mem, UblkParams())
        path = dev.start()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(UblkError) as info:
                dev.close()
            assert info.value.errno == errno.EBUSY and f"fd {fd}" in str(info.value)
        finally:
            os.close(fd)
        with Control() as ctl:
            delete(dev.dev_id, ctl)
        assert_gone(dev.dev_id)


def test_cli_add_nbd_serves_a_qemu_nbd_export(tmp_path: Path) -> None:
    """`vdisk ublk add -t nbd URI` (issue 11): a qcow2 image served by qemu-nbd on a unix
    socket becomes /dev/ublkbN; reads show the image, writes land in it (qemu-img compare)."""
    image = tmp_path / "exp.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(image))
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-x", "exp", "-f", "qcow2", "-t",
                               str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = dict(os.environ, VDISK_UBLK_RUN_DIR=str(tmp_path / "run"))
    try:
        for _ in range(300):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.1)
        assert sock.exists(), server.stderr.read() if server.stderr else "qemu-nbd exited"
        out = sh_env(env, "vdisk", "ublk", "add", "-t", "nbd", f"nbd+unix:///exp?socket={sock}",
                     "-n", "9")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "/dev/ublkb9"
        assert Path("/sys/block/ublkb9/size").read_text().strip() == str((16 << 20) >> 9)
        pattern = os.urandom(1 << 20)
        fd = os.open("/dev/ublkb9", os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 1 << 20)
            assert os.preadv(fd, [buf], 0) == 1 << 20
            assert buf[:] == b"\x5a" * (1 << 20)
            buf[:] = pattern
            assert os.pwritev(fd, [buf], 4 << 20) == 1 << 20
            os.fsync(fd)
            buf.close()
        finally:
            os.close(fd)
        out = sh_env(env, "vdisk", "ublk", "del", "-n", "9")
        assert out.returncode == 0, out.stderr
        assert_gone(9, env)
    finally:
        server.terminate()
        server.wait(30)
    expected = tmp_path / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(16 << 20)
        f.write(b"\x5a" * (1 << 20))
        f.seek(4 << 20)
        f.write(pattern)
    out = sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(expected), str(image),
             check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sh("qemu-img", "check", str(image)).returncode == 0
