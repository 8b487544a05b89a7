"""Image locking against QEMU's own tools, on one file per test.

Peers hold the image in another process: qemu-io reading commands from a pipe, or qemu-nbd
--fork. The oracle for each outcome is the matching QEMU tool in the same situation (qemu-io
opens with the same permissions as vdisk's opens), and the lock bytes themselves are read with
F_OFD_GETLK from a separate open, independently of vdisk.locking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vdisk
from vdisk import locking
from vdisk.errors import LockError, RequestError

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-nbd"))
    or not hasattr(fcntl, "F_OFD_GETLK"),
    reason="needs qemu-img, qemu-io, qemu-nbd and OFD locks (Linux)",
)

FLOCK = struct.Struct("@hhqqi4x")  # struct flock on 64-bit Linux
LOCK_BYTES = (*range(100, 104), *range(200, 204))
HINT = "Is another process using the image [{}]?"


def locked_bytes(path: Path) -> set[int]:
    """The permission bytes some open of ``path`` holds, seen from a fresh open."""
    fd = os.open(path, os.O_RDONLY)
    try:
        held = set()
        for offset in LOCK_BYTES:
            probe = FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            if FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK:
                held.add(offset)
        return held
    finally:
        os.close(fd)


@pytest.fixture(params=["qcow2", "raw"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    fmt: str = request.param
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-f", fmt, path, "1M"], check=True, capture_output=True)
    return path, fmt


# -- peers -----------------------------------------------------------------------------------
def _mode_flags(mode: str) -> list[str]:
    return {"rw": [], "ro": ["-r"], "ro-U": ["-r", "-U"]}[mode]


@contextlib.contextmanager
def qemu_io_holding(path: Path, fmt: str, mode: str) -> Iterator[None]:
    """qemu-io keeps ``path`` open (in ``mode``) until its stdin closes."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", fmt, *_mode_flags(mode), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # qemu-io answers a command only once the whole chain (backing files too) is open
        # and locked, so the answer is the readiness signal; waiting for the top file's
        # lock alone raced with the backing file's open.
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"length\n")
        proc.stdin.flush()
        if not proc.stdout.readline():
            assert proc.stderr is not None
            pytest.fail(f"qemu-io did not hold {path}: {proc.stderr.read()!r}")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # end of input: qemu-io quits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@contextlib.contextmanager
def _forked_server(command: list[str]) -> Iterator[None]:
    """Run a server that forks once listening and writes ``{run_dir}/pid``; kill it after."""
    with tempfile.TemporaryDirectory(prefix="vlk") as run_dir:  # short: a unix socket path
        subprocess.run(
            [arg.format(run_dir=run_dir) for arg in command],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pid = int(Path(run_dir, "pid").read_text())
        try:
            yield
        finally:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


def qemu_nbd_holding(path: Path, fmt: str, mode: str) -> contextlib.AbstractContextManager[None]:
    """qemu-nbd --fork serves ``path`` (in ``mode``) until killed."""
    return _forked_server(
        [
            *("qemu-nbd", "--fork", "--persistent", "-f", fmt, *_mode_flags(mode)),
            *("-k", "{run_dir}/sock", "--pid-file", "{run_dir}/pid", str(path)),
        ]
    )


def vdisk_nbd_holding(path: Path, fmt: str, mode: str) -> contextlib.AbstractContextManager[None]:
    """vdisk's own NBD server, forked, serves ``path`` (read-write, or read-only with -r)."""
    flags = {"rw": [], "ro": ["-r"]}[mode]
    return _forked_server(
        [
            *(sys.executable, "-m", "vdisk", "nbd", "--fork", "-t", "-f", fmt, *flags),
            *("-k", "{run_dir}/sock", "--pid-file", "{run_dir}/pid", str(path)),
        ]
    )


PEERS = {"qemu-io": qemu_io_holding, "qemu-nbd": qemu_nbd_holding}


# -- QEMU's answers ----------------------------------------------------------------------------
def qemu_io_open(path: Path, fmt: str, mode: str, command: str = "read 0 512") -> str | None:
    """None if qemu-io opens ``path`` in ``mode`` and runs ``command``; else its refusal."""
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, *_mode_flags(mode), "-c", command, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    prefix = f"qemu-io: can't open device {path}: "
    if proc.returncode == 0 and not proc.stderr:
        return None
    assert proc.stderr.startswith(prefix), proc.stderr
    return proc.stderr[len(prefix) :].rstrip("\n")


def qemu_img_info(path: Path, fmt: str, *flags: str) -> str | None:
    """None if ``qemu-img info`` opens ``path``; else its refusal."""
    proc = subprocess.run(
        ["qemu-img", "info", "-f", fmt, *flags, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    prefix = f"qemu-img: Could not open '{path}': "
    if proc.returncode == 0:
        return None
    assert proc.stderr.startswith(prefix), proc.stderr
    return proc.stderr[len(prefix) :].rstrip("\n")


def first_sector(dev: vdisk.BlockDevice) -> bytes:
    buf = bytearray(512)
    dev.readinto(buf, 0)
    return bytes(buf)


def vdisk_open(path: Path, fmt: str, mode: str) -> vdisk.BlockDevice:
    return vdisk.open(str(path), format=fmt, readonly=mode != "rw", force_share=mode == "ro-U")


def vdisk_outcome(path: Path, fmt: str, mode: str) -> str | None:
    """None if vdisk opens ``path`` in ``mode``; else its refusal (without the path prefix)."""
    try:
        dev = vdisk_open(path, fmt, mode)
    except LockError as exc:
        return exc.message
    dev.close()
    return None


# -- a QEMU peer holds the image ------------------------------------------------------------------
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("peer_mode", ["rw", "ro"])
@pytest.mark.parametrize("mode", ["rw", "ro", "ro-U"])
def test_vdisk_open_beside_a_qemu_peer(
    image: tuple[Path, str], peer: str, peer_mode: str, mode: str
) -> None:
    """vdisk opens (or refuses, with the same words) exactly where qemu-io does."""
    path, fmt = image
    with PEERS[peer](path, fmt, peer_mode):
        peer_bytes = locked_bytes(path)
        expected = qemu_io_open(path, fmt, mode)
        assert vdisk_outcome(path, fmt, mode) == expected
        if mode == "ro":
            assert (vdisk_outcome(path, fmt, mode) is None) == (qemu_img_info(path, fmt) is None)
        assert locked_bytes(path) == peer_bytes  # a refused open leaves no byte behind


@pytest.mark.parametrize("peer", PEERS)
def test_qcow2_writer_refuses_vdisk_writer_and_reader(tmp_path: Path, peer: str) -> None:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, "1M"], check=True)
    with PEERS[peer](path, "qcow2", "rw"):
        with pytest.raises(LockError) as rw:
            vdisk.open(str(path))
        assert str(rw.value) == f'{path}: Failed to get "write" lock\n' + HINT.format(path)
        assert rw.value.errno == 11 and rw.value.permission == "write"
        with pytest.raises(LockError) as ro:
            vdisk.open(str(path), readonly=True)
        assert ro.value.message == 'Failed to get shared "write" lock\n' + HINT.format(path)
        with vdisk.open(str(path), readonly=True, force_share=True) as dev:
            assert first_sector(dev) == bytes(512)


# -- vdisk holds the image -------------------------------------------------------------------------
QEMU_USERS = {
    "qemu-img info": lambda path, fmt: qemu_img_info(path, fmt),
    "qemu-img info -U": lambda path, fmt: qemu_img_info(path, fmt, "-U"),
    "qemu-io write": lambda path, fmt: qemu_io_open(path, fmt, "rw", "write 0 512"),
    "qemu-io -r read": lambda path, fmt: qemu_io_open(path, fmt, "ro"),
    "qemu-io -r -U read": lambda path, fmt: qemu_io_open(path, fmt, "ro-U"),
}


@pytest.mark.parametrize("mode", ["rw", "ro", "ro-U"])
@pytest.mark.parametrize("user", QEMU_USERS)
def test_qemu_beside_vdisk_as_beside_qemu_io(image: tuple[Path, str], mode: str, user: str) -> None:
    """A QEMU tool meets vdisk holding the image in a mode as it meets qemu-io holding it so."""
    path, fmt = image
    with qemu_io_holding(path, fmt, mode):
        expected = QEMU_USERS[user](path, fmt)
    with vdisk_open(path, fmt, mode):
        assert QEMU_USERS[user](path, fmt) == expected


@pytest.mark.parametrize("mode", ["rw", "ro", "ro-U"])
def test_lock_bytes_are_qemu_ios(image: tuple[Path, str], mode: str) -> None:
    path, fmt = image
    with qemu_io_holding(path, fmt, mode):
        expected = locked_bytes(path)
    with vdisk_open(path, fmt, mode):
        assert locked_bytes(path) == expected
    assert locked_bytes(path) == set()  # close releases


def test_vdisk_qcow2_writer_keeps_qemu_out(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, "1M"], check=True)
    with vdisk.open(str(path)):
        assert qemu_img_info(path, "qcow2") == (
            'Failed to get shared "write" lock\n' + HINT.format(path)
        )
        assert qemu_img_info(path, "qcow2", "-U") is None
        assert qemu_io_open(path, "qcow2", "rw", "write 0 512") == (
            'Failed to get "write" lock\n' + HINT.format(path)
        )
        with (
            pytest.raises(subprocess.CalledProcessError) as nbd,
            qemu_nbd_holding(path, "qcow2", "rw"),
        ):
            pass
        assert b'Failed to get "write" lock' in nbd.value.stderr
    assert qemu_io_open(path, "qcow2", "rw", "write 0 512") is None  # released on close


@pytest.mark.parametrize("mode", ["rw", "ro"])
@pytest.mark.parametrize("user", QEMU_USERS)
def test_export_locks_as_qemu_nbd(image: tuple[Path, str], mode: str, user: str) -> None:
    """An open narrowed with lock_for_export meets QEMU's tools as qemu-nbd does."""
    path, fmt = image
    with qemu_nbd_holding(path, fmt, mode):
        expected = QEMU_USERS[user](path, fmt), locked_bytes(path)
    with vdisk_open(path, fmt, mode) as dev:
        locking.lock_for_export(dev)
        assert (QEMU_USERS[user](path, fmt), locked_bytes(path)) == expected


def test_export_refused_beside_a_resizer_keeps_its_locks(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-f", "raw", path, "1M"], check=True)
    with vdisk.open(str(path), format="raw") as dev:
        before = locked_bytes(path)
        resizer = os.open(path, os.O_RDWR)
        try:
            assert locking.lock(resizer, str(path), locking.RAW_RESIZE)
            with pytest.raises(LockError, match='Failed to get shared "resize" lock'):
                locking.lock_for_export(dev)
        finally:
            os.close(resizer)
        assert locked_bytes(path) == before


@pytest.mark.parametrize("mode", ["rw", "ro"])
@pytest.mark.parametrize("user", ["qemu-img info", "qemu-io write"])  # each run starts vdisk
def test_vdisk_nbd_server_locks_as_qemu_nbd(image: tuple[Path, str], mode: str, user: str) -> None:
    """vdisk nbd locks what it serves: QEMU's tools meet it as they meet qemu-nbd."""
    path, fmt = image
    with qemu_nbd_holding(path, fmt, mode):
        expected = QEMU_USERS[user](path, fmt), locked_bytes(path)
    with vdisk_nbd_holding(path, fmt, mode):
        assert (QEMU_USERS[user](path, fmt), locked_bytes(path)) == expected


# -- vdisk beside vdisk (two opens in one process conflict as two processes do) -----------------
@pytest.mark.parametrize("first", ["rw", "ro", "ro-U"])
@pytest.mark.parametrize("second", ["rw", "ro", "ro-U"])
def test_two_vdisk_opens_as_two_qemu_ios(image: tuple[Path, str], first: str, second: str) -> None:
    path, fmt = image
    with qemu_io_holding(path, fmt, first):
        expected = qemu_io_open(path, fmt, second)
    with vdisk_open(path, fmt, first):
        assert vdisk_outcome(path, fmt, second) == expected


def test_two_readers_share(image: tuple[Path, str]) -> None:
    path, fmt = image
    with vdisk_open(path, fmt, "ro") as a, vdisk_open(path, fmt, "ro") as b:
        assert first_sector(a) == first_sector(b)
        assert qemu_io_open(path, fmt, "ro") is None
    with qemu_io_holding(path, fmt, "ro"), vdisk_open(path, fmt, "ro") as c:
        assert first_sector(c) == bytes(512)


def test_force_share_needs_readonly(image: tuple[Path, str]) -> None:
    path, fmt = image
    with pytest.raises(RequestError, match="force-share=on can only be used with read-only"):
        vdisk.open(str(path), format=fmt, force_share=True)
    assert locked_bytes(path) == set()


# -- backing files ------------------------------------------------------------------------------
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_backing_file_locked_as_qemu_locks_it(tmp_path: Path, base_fmt: str, mode: str) -> None:
    base = tmp_path / f"base.{base_fmt}"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-f", base_fmt, base, "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", base_fmt, top], check=True
    )
    with qemu_io_holding(top, "qcow2", mode):
        expected = locked_bytes(base)
    with vdisk_open(top, "qcow2", mode):
        assert locked_bytes(base) == expected
    with qemu_io_holding(base, base_fmt, "rw"):
        refusal = qemu_io_open(top, "qcow2", mode)
        outcome = vdisk_outcome(top, "qcow2", mode)
        # QEMU puts "Could not open backing file: " before the lock's words
        assert (outcome is None) == (refusal is None)
        assert refusal is None or (outcome is not None and refusal.endswith(outcome))
