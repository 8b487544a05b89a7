"""The VM test bed works: the guest has ublk and io_uring, runs the project's Python, can write,
and the ublk server speaks the opcode form the guest kernel wants (legacy on 6.1, ioctl-encoded
where GET_FEATURES advertises it, e.g. Debian's 6.12 run through ``VDISK_TEST_KERNELS``).

The host-side tests check that a failing command, a timeout and a boot failure come back as
clear results rather than hangs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
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


@pytest.mark.vm
def test_ublk_opcode_form_follows_the_kernel() -> None:
    """Control commands and queue commands use the ioctl-encoded opcodes exactly when the kernel
    advertises UBLK_F_CMD_IOCTL_ENCODE in GET_FEATURES; 6.1 has no GET_FEATURES and gets legacy."""
    from vdisk.backends.memory import MemoryDevice
    from vdisk.ublk import control, uapi
    from vdisk.ublk.device import Device, UblkParams

    with control.Control() as ctl:
        features = ctl.get_features()
    encode = features is not None and bool(features & uapi.UBLK_F_CMD_IOCTL_ENCODE)
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if release == (6, 1):
        assert features is None
    if release >= (6, 12):
        assert encode, f"GET_FEATURES on {os.uname().release}: {features:#x}"

    dev = Device.create(MemoryDevice(1 << 20), UblkParams(queues=2, depth=4))
    try:
        path = dev.start()
        with open(path, "rb") as f:  # requests through the queues, committed with their opcode
            assert f.read(65536) == bytes(65536)
        assert control.encoded_mode() is encode
        assert bool(dev.info.flags & uapi.UBLK_F_CMD_IOCTL_ENCODE) is encode
        fetch, commit = uapi.UBLK_IO_FETCH_REQ, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ
        if encode:
            fetch, commit = uapi.ioctl_encode_io(fetch), uapi.ioctl_encode_io(commit)
        assert {(q.op_fetch, q.op_commit) for q in dev.queues} == {(fetch, commit)}
    finally:
        dev.close()
    print(f"{os.uname().release}: {'ioctl-encoded' if encode else 'legacy'} opcodes")


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
def test_command_that_reports_done_ends_the_run_without_powering_off() -> None:
    """A guest command stuck after writing its DONE file (as the vm pytest does before exiting)
    ends the run with that status rather than at the hard timeout."""
    r = vm.run(["sh", "-c", f'echo 3 >"${vm.RESULTS_ENV}/{vm.DONE_NAME}"; sleep 600'], timeout=240)
    assert (r.status, r.returncode) == ("ok", 3), r.describe()
    assert "reported done" in r.console


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
        env={
            **{k: v for k, v in os.environ.items() if k != "VDISK_TEST_KERNELS"},
            "PYTHONPATH": str(vm.project_root() / "src"),
        },
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


def test_further_kernels_get_labelled_copies_that_skip_with_the_reason(tmp_path: Path) -> None:
    """VDISK_TEST_KERNELS adds a copy of each vm test per kernel, selectable by its label; an
    entry ``LABEL=!REASON`` (a kernel that could not be fetched) makes the copies skip."""
    import subprocess

    (tmp_path / "test_demo.py").write_text(_PLUGIN_DEMO)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    vm: in the VM\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(vm.project_root() / "src"),
        "VDISK_TEST_KERNELS": "linux-x=!no network to fetch it",
    }

    def pytest(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "vdisk.testing.pytest_plugin",
             "-p", "no:cacheprovider", *args, "test_demo.py"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
        ).stdout  # fmt: skip

    ids = pytest("--collect-only", "-q").split()
    assert "test_demo.py::test_passes" in ids and "test_demo.py::test_passes[linux-x]" in ids
    assert "test_demo.py::test_hangs[linux-x]" in ids
    out = pytest("-k", "linux-x", "-rs")  # no VM boots: the default kernel's tests are deselected
    assert "6 skipped, 6 deselected" in out, out
    assert "kernel linux-x: no network to fetch it" in out or "qemu-system-x86_64" in out, out


def test_extra_kernels_parses_entries(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(b"k")
    specs = vm.extra_kernels(f"a={kernel},{initrd}; b={kernel};c=!offline;d=nonsense-path;e")
    assert [s.label for s in specs] == ["a", "b", "c", "d", "e"]
    assert (specs[0].kernel, specs[0].initrd) == (kernel, initrd)
    assert "initrd.gz" in (specs[0].unavailable or "")
    assert (specs[1].kernel, specs[1].initrd, specs[1].unavailable) == (kernel, None, None)
    assert specs[2].unavailable == "offline"
    assert "nonsense-path" in (specs[3].unavailable or "")
    assert "bad VDISK_TEST_KERNELS entry" in (specs[4].unavailable or "")
    assert vm.extra_kernels("") == []


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
