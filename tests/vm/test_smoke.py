"""The VM test bed works: the guest has ublk and io_uring, runs the project's Python, can write.

The host-side tests check that a failing command, a timeout and a boot failure come back as
clear results rather than hangs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
from pathlib import Path

import pytest

from vdisk.testing import vm

_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_IORING_OFF_SQ_RING = 0
_IORING_OFF_SQES = 0x10000000
_IORING_ENTER_GETEVENTS = 1

needs_vm = pytest.mark.skipif(
    vm.unavailable_reason() is not None, reason=f"VM test bed: {vm.unavailable_reason()}"
)


@pytest.mark.vm
def test_guest_is_a_vm_with_ublk() -> None:
    assert os.environ.get("VDISK_IN_VM") == "1"
    assert Path("/dev/ublk-control").exists()
    assert os.getuid() == 0


@pytest.mark.vm
def test_project_python_imports() -> None:
    import vdisk

    assert Path(vdisk.__file__).resolve().is_relative_to(vm.project_root())
    assert sys.prefix != sys.base_prefix  # the venv's python


@pytest.mark.vm
def test_guest_can_write_tmp(tmp_path: Path) -> None:
    p = Path("/tmp") / "vdisk-vm-smoke"
    p.write_bytes(b"x" * 4096)
    assert p.read_bytes() == b"x" * 4096
    (tmp_path / "f").write_text("ok")
    assert (tmp_path / "f").read_text() == "ok"


@pytest.mark.vm
def test_io_uring_nop_round_trip() -> None:
    """io_uring_setup gives a ring; one IORING_OP_NOP comes back with res 0 and our user_data."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = bytearray(120)  # struct io_uring_params
    buf = (ctypes.c_char * len(params)).from_buffer(params)
    fd = libc.syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(4), buf)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        sq_entries, cq_entries = struct.unpack_from("<II", params, 0)
        # struct io_sqring_offsets at 40, io_cqring_offsets at 80 (10 u32 / 8 u32 + u64 each)
        _, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("<7I", params, 40)
        cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("<6I", params, 80)
        sq_len = sq_array + sq_entries * 4
        cq_len = cqes + cq_entries * 16
        ring = mmap.mmap(fd, max(sq_len, cq_len), offset=_IORING_OFF_SQ_RING)  # single mmap
        sqes = mmap.mmap(fd, sq_entries * 64, offset=_IORING_OFF_SQES)
        try:
            tail = struct.unpack_from("<I", ring, sq_tail)[0]
            idx = tail & struct.unpack_from("<I", ring, sq_mask)[0]
            sqe = bytearray(64)  # opcode 0 = IORING_OP_NOP
            struct.pack_into("<Q", sqe, 32, 0xFEEDF00D)  # user_data
            sqes[idx * 64 : idx * 64 + 64] = bytes(sqe)
            struct.pack_into("<I", ring, sq_array + idx * 4, idx)
            struct.pack_into("<I", ring, sq_tail, tail + 1)
            n = libc.syscall(_SYS_IO_URING_ENTER, fd, 1, 1, _IORING_ENTER_GETEVENTS, None, 0)
            assert n == 1, os.strerror(ctypes.get_errno())
            head = struct.unpack_from("<I", ring, cq_head)[0]
            assert struct.unpack_from("<I", ring, cq_tail)[0] == head + 1
            off = cqes + (head & struct.unpack_from("<I", ring, cq_mask)[0]) * 16
            user_data, res = struct.unpack_from("<Qi", ring, off)
            assert (user_data, res) == (0xFEEDF00D, 0)
        finally:
            sqes.close()
            ring.close()
    finally:
        os.close(fd)


@needs_vm
def test_failing_command_reports_status_and_output() -> None:
    r = vm.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"], timeout=120)
    assert r.status == "ok"
    assert r.returncode == 7
    assert "to-stdout" in r.output and "to-stderr" in r.output
    assert "Linux version" in r.dmesg  # the kernel log comes back on failure
    assert "status 7" in r.describe()


@needs_vm
def test_timeout_kills_vm_and_says_so() -> None:
    r = vm.run(["sh", "-c", "echo started; sleep 600"], timeout=12)
    assert r.status == "timeout"
    assert r.returncode is None
    assert "timed out" in r.describe()
    with pytest.raises(vm.VMTimeoutError):
        r.check()


@needs_vm
def test_boot_failure_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "bzImage"
    bogus.write_bytes(b"not a kernel" * 100)
    r = vm.run(["true"], timeout=60, kernel=bogus)
    assert r.status == "boot-failed"
    with pytest.raises(vm.VMBootError):
        r.check()


_PLUGIN_DEMO = """
import os
import pytest

pytestmark = pytest.mark.vm


def test_passes():
    assert os.environ["VDISK_IN_VM"] == "1"


def test_fails():
    print("guest-stdout-marker")
    assert 1 + 1 == 3, "guest-assert-marker"


def test_skips():
    pytest.skip("guest-skip-marker")


@pytest.mark.xfail(reason="guest-xfail-marker")
def test_xfails():
    raise ValueError


@pytest.mark.vm(timeout=3)
def test_hangs():
    import time
    time.sleep(60)


def test_after_hang_still_runs():
    pass
"""


@needs_vm
def test_marker_maps_guest_outcomes_to_host_tests(tmp_path: Path) -> None:
    """The plugin, run by a real pytest, reports each guest outcome on the matching host test."""
    import subprocess

    (tmp_path / "test_demo.py").write_text(_PLUGIN_DEMO)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    vm: in the VM\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "vdisk.testing.pytest_plugin",
         "-p", "no:cacheprovider", "-rA", "test_demo.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(vm.project_root() / "src")},
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "PASSED test_demo.py::test_passes" in out
    assert "FAILED test_demo.py::test_fails" in out
    assert "guest-assert-marker" in out and "guest-stdout-marker" in out
    assert "kernel log (in the VM)" in out
    assert "guest-skip-marker" in out
    assert "XFAIL test_demo.py::test_xfails" in out
    assert "FAILED test_demo.py::test_hangs" in out and "Timeout" in out
    assert "PASSED test_demo.py::test_after_hang_still_runs" in out


def test_unavailable_reason_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VDISK_TEST_KERNEL", str(tmp_path / "no-such-bzImage"))
    monkeypatch.delenv("VDISK_QEMU", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = vm.unavailable_reason()
    assert reason is not None
    assert "no-such-bzImage" in reason and "qemu-system-x86_64 not found" in reason
    with pytest.raises(vm.VMUnavailableError):
        vm.run(["true"])
