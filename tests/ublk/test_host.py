"""ublk pieces that need no ublk driver: parameter checks, the zip backend, CLI errors."""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path

import pytest

from vdisk.backends.zipmember import ZipMemberDevice, split_member
from vdisk.cli import main
from vdisk.errors import FormatError, ReadOnlyError, UnsupportedFeatureError
from vdisk.ublk import uapi
from vdisk.ublk.device import MAX_DISCARD_BYTES, UblkParams
from vdisk.ublk.errors import UblkError


@pytest.mark.parametrize(
    ("params", "size", "words"),
    [
        (UblkParams(queues=0), 1 << 20, "queues"),
        (UblkParams(depth=4097), 1 << 20, "depth"),
        (UblkParams(logical_block_size=1000), 1 << 20, "logical_block_size"),
        (UblkParams(logical_block_size=4096, physical_block_size=512), 1 << 20, "smaller"),
        (UblkParams(max_io_buf_bytes=1000), 1 << 20, "max_io_buf_bytes"),
        (UblkParams(max_sectors=5000), 1 << 20, "max_sectors"),
        (UblkParams(), 1000, "multiple"),
        (UblkParams(), 0, "positive"),
        (UblkParams(dev_id=-5), 1 << 20, "device id"),
    ],
)
def test_invalid_params_are_one_line_errors(params: UblkParams, size: int, words: str) -> None:
    with pytest.raises(UblkError) as info:
        params.validate(size)
    assert info.value.errno == errno.EINVAL
    assert words in str(info.value) and "\n" not in str(info.value)


def test_params_to_uapi() -> None:
    p = UblkParams(logical_block_size=4096, physical_block_size=4096, rotational=True)
    p.validate(1 << 30)
    u = p.to_uapi(1 << 30, readonly=False)
    assert u.basic.logical_bs_shift == 12 and u.basic.dev_sectors == (1 << 30) >> 9
    assert u.basic.attrs & uapi.UBLK_ATTR_ROTATIONAL
    assert u.basic.attrs & uapi.UBLK_ATTR_VOLATILE_CACHE and u.basic.attrs & uapi.UBLK_ATTR_FUA
    assert u.types == uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DISCARD
    assert u.discard.max_discard_sectors << 9 == MAX_DISCARD_BYTES < 1 << 32
    assert u.basic.max_sectors == p.max_io_buf_bytes >> 9
    ro = p.to_uapi(1 << 30, readonly=True)
    assert ro.basic.attrs & uapi.UBLK_ATTR_READ_ONLY and ro.types == uapi.UBLK_PARAM_TYPE_BASIC


def _zip(tmp_path: Path, compression: int = zipfile.ZIP_STORED) -> tuple[Path, bytes]:
    data = os.urandom(200_000)
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("other.txt", "x" * 100)
        zf.writestr("disk.img", data)
    return path, data


def test_zip_member_reads_the_stored_bytes(tmp_path: Path) -> None:
    path, data = _zip(tmp_path)
    with ZipMemberDevice(str(path), "disk.img") as dev:
        assert dev.size == len(data) and dev.readonly
        assert dev.pread(1000, 12345) == data[12345:13345]
        assert dev.pread(len(data), 0) == data
        with pytest.raises(ReadOnlyError):
            dev.write(b"x", 0)
    assert split_member(f"{path}:disk.img") == (str(path), "disk.img")


def test_zip_member_errors(tmp_path: Path) -> None:
    path, _ = _zip(tmp_path)
    with pytest.raises(FormatError, match="2 members"):
        ZipMemberDevice(str(path))
    with pytest.raises(FormatError, match="no member"):
        ZipMemberDevice(str(path), "nope")
    deflated, _ = _zip(tmp_path / "..", zipfile.ZIP_DEFLATED)
    with pytest.raises(UnsupportedFeatureError, match="compressed"):
        ZipMemberDevice(str(deflated), "disk.img")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a zip"):
        ZipMemberDevice(str(junk))


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    if os.path.exists("/dev/ublk-control"):
        pytest.skip("this host has ublk; the error path is for hosts without it")
    assert main(["ublk", "add", "-t", "mem", "--size", "1M", "--foreground"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ublk-control" in err
    assert main(["ublk", "del"]) == 1
    assert "exactly one" in capsys.readouterr().err


def test_process_alive_tells_running_from_zombie_and_gone() -> None:
    from vdisk.ublk.device import process_alive

    assert process_alive(os.getpid())
    assert not process_alive(0) and not process_alive(-1)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    # The child exits at once; until reaped it is a zombie, which is not a live server.
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    assert not process_alive(pid)
    os.waitpid(pid, 0)
    assert not process_alive(pid)


def test_queue_failures_become_one_line_ublk_errors() -> None:
    from vdisk.ublk.device import _as_ublk_error

    err = _as_ublk_error(OSError(errno.ENOMEM, "Cannot allocate memory"), "queue 0 setup")
    assert isinstance(err, UblkError) and err.errno == errno.ENOMEM
    assert str(err) == "ublk queue 0 setup: Cannot allocate memory"
    bug = _as_ublk_error(ValueError("bad"), "queue 1 setup")
    assert isinstance(bug, UblkError) and bug.errno == errno.EIO and "bad" in str(bug)
    same = UblkError(errno.EBUSY, "x")
    assert _as_ublk_error(same, "queue 0 setup") is same
    interrupt = KeyboardInterrupt()
    assert _as_ublk_error(interrupt, "queue 0 setup") is interrupt


def test_fds_open_on_finds_our_descriptors_even_after_unlink(tmp_path: Path) -> None:
    from vdisk.ublk.device import fds_open_on

    path = tmp_path / "node"
    path.write_bytes(b"x")
    other = str(tmp_path / "node1")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fds_open_on(str(path), other) == [(fd, str(path))]
        path.unlink()
        assert fds_open_on(str(path)) == [(fd, str(path))]
        assert fds_open_on(other) == []
    finally:
        os.close(fd)
    assert fds_open_on(str(path)) == []


def test_holds_sees_a_process_descriptor(tmp_path: Path) -> None:
    from vdisk.ublk.device import _holds

    path = tmp_path / "node"
    path.write_bytes(b"x")
    assert not _holds(os.getpid(), str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _holds(os.getpid(), str(path))
    finally:
        os.close(fd)
    assert not _holds(2**22 + 1, str(path))  # no such process


def test_device_sees_queues_that_end_together_as_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queue threads that finish at the same moment (STOP_DEV aborts every tag of every queue
    at once) are each still alive while the others report their end: the device must still
    learn that all of them ended (a 2-queue server once hung after STOP_DEV this way)."""
    import threading

    from vdisk.backends.null import NullDevice
    from vdisk.ublk import device

    queues = 4
    all_ending = threading.Barrier(queues)
    reported = threading.Barrier(queues)

    class EndingQueue(threading.Thread):
        def __init__(self, q_id: int, *args: object) -> None:
            super().__init__()
            self.q_id = q_id
            self.on_exit = args[6]
            self.ready = threading.Event()
            self.error: BaseException | None = None

        def run(self) -> None:
            self.ready.set()
            all_ending.wait(10)
            self.on_exit(self)  # type: ignore[operator]
            reported.wait(10)  # each is alive until all have reported

    class NoAffinity:
        def get_queue_affinity(self, dev_id: int, q_id: int) -> None:
            return None

    char = tmp_path / "ublkc"
    char.touch()
    monkeypatch.setattr(device, "Queue", EndingQueue)
    monkeypatch.setattr(device.Device, "char_path", property(lambda self: str(char)))
    dev = device.Device(NoAffinity(), uapi.DevInfo(nr_hw_queues=queues),  # type: ignore[arg-type]
                        NullDevice(1 << 20), UblkParams(queues=queues), 1 << 20, None, False, None)
    dev._start_queues()
    assert dev.wait(10)
    for q in dev.queues:
        q.join(10)
    os.close(dev._cdev_fd or -1)
