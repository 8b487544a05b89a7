"""Hostile qcow2 headers: each gives a clean VdiskError quickly, with no huge allocation.

Every file is crafted with struct (qcow2_craft), one broken rule at a time. ``qemu-img info`` is
the oracle for "this image must not open": where QEMU refuses, `vdisk info` refuses too, in one
line and with exit status 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_cases import ACCESS_CASES, CASES, Case
from qcow2_craft import Craft, build, write

import vdisk
from vdisk.cli import main as cli_main
from vdisk.errors import BackingChainError, VdiskError

pytestmark = pytest.mark.timeout(5)

#: No hostile header may make the library allocate more than this (the traced peak).
MEMORY_LIMIT = 64 << 20


def _measured(fn: Callable[[], object]) -> tuple[object, BaseException | None, int]:
    """Run ``fn``; return its result, the exception it raised (if any) and the peak allocation."""
    tracemalloc.start()
    try:
        result, error = fn(), None
    except Exception as exc:
        result, error = None, exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, error, peak


def _open_and_read(path: str, readonly: bool) -> None:
    with vdisk.open(path, format="qcow2", readonly=readonly) as dev:
        buf = bytearray(min(dev.size, 1 << 16))
        dev.readinto(buf, 0)


def _qemu_img_refuses(path: str) -> bool:
    if shutil.which("qemu-img") is None:
        return False
    return (
        subprocess.run(["qemu-img", "info", path], capture_output=True, check=False).returncode
        != 0
    )


def _assert_clean_error(error: BaseException | None, case: Case) -> None:
    assert error is not None, f"{case.name}: opened without error"
    assert isinstance(error, VdiskError), f"{case.name}: {type(error).__name__}: {error}"
    if case.error is not None:
        assert isinstance(error, case.error), (
            f"{case.name}: expected {case.error.__name__}, got {type(error).__name__}: {error}"
        )
    message = str(error)
    assert "\n" not in message, message
    for word in case.mentions:
        assert word.lower() in message.lower(), message


def _assert_info_fails_in_one_line(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    rc = cli_main(["info", path])
    out, err = capsys.readouterr()
    assert rc == 1, out
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_header(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(str(tmp_path / f"{case.name}.qcow2"), case.craft)
    for readonly in (True, False):
        _, error, peak = _measured(lambda ro=readonly: _open_and_read(path, ro))  # type: ignore[misc]
        assert peak < MEMORY_LIMIT, f"{case.name}: allocated {peak} bytes"
        if case.error is None or (readonly and case.readonly_ok):
            assert error is None or isinstance(error, VdiskError), repr(error)
        else:
            _assert_clean_error(error, case)
    if (case.error is not None and not case.readonly_ok) or _qemu_img_refuses(path):
        _assert_info_fails_in_one_line(path, capsys)
    else:
        capsys.readouterr()
        rc = cli_main(["info", path])
        _, err = capsys.readouterr()
        assert rc == 0 or (len(err.splitlines()) == 1 and "Traceback" not in err), err


@pytest.mark.parametrize("case", ACCESS_CASES, ids=[c.name for c in ACCESS_CASES])
def test_hostile_l2_pointer(case: Case, tmp_path: Path) -> None:
    """Damage that only shows on access: reads and writes there fail cleanly (or read zeros)."""
    path = write(str(tmp_path / f"{case.name}.qcow2"), case.craft)
    for readonly in (True, False):
        _, error, peak = _measured(lambda ro=readonly: _open_and_read(path, ro))  # type: ignore[misc]
        assert peak < MEMORY_LIMIT
        if case.error is None:
            assert error is None or isinstance(error, VdiskError), repr(error)
        else:
            _assert_clean_error(error, case)


def test_qemu_agrees_where_it_refuses(tmp_path: Path) -> None:
    """Sanity of the generator: QEMU refuses most of our cases and accepts the valid default."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    valid = write(str(tmp_path / "valid.qcow2"), Craft())
    check = subprocess.run(["qemu-img", "check", valid], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout
    refused = [c.name for c in CASES if _qemu_img_refuses(write(str(tmp_path / "x"), c.craft))]
    assert len(refused) >= len(CASES) // 2


def test_valid_crafted_image_opens(tmp_path: Path) -> None:
    path = write(str(tmp_path / "valid.qcow2"), Craft())
    with vdisk.open(path) as dev:
        assert dev.size == 1 << 20
        dev.write(b"x" * 512, 4096)
    with vdisk.open(path, readonly=True) as dev:
        assert dev.pread(512, 4096) == b"x" * 512  # type: ignore[attr-defined]


# -- backing chains ------------------------------------------------------------------------------


def _qcow2_with_backing(path: Path, backing: str) -> str:
    return write(str(path), Craft(backing_file=backing.encode(), backing_format=b"qcow2"))


@pytest.fixture
def loop_pair(tmp_path: Path) -> Iterator[Path]:
    _qcow2_with_backing(tmp_path / "a.qcow2", "b.qcow2")
    _qcow2_with_backing(tmp_path / "b.qcow2", "a.qcow2")
    yield tmp_path


def test_backing_loop(loop_pair: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(loop_pair / "a.qcow2")
    for readonly in (True, False):
        _, error, peak = _measured(lambda ro=readonly: _open_and_read(path, ro))  # type: ignore[misc]
        assert peak < MEMORY_LIMIT
        assert isinstance(error, BackingChainError), repr(error)
    # Like qemu-img: plain info does not open the chain; --backing-chain sees the loop.
    assert cli_main(["info", path]) == 0
    capsys.readouterr()
    assert cli_main(["info", "--backing-chain", path]) == 1
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "infinite loop" in err, err


def test_backing_self_loop(tmp_path: Path) -> None:
    path = _qcow2_with_backing(tmp_path / "self.qcow2", "self.qcow2")
    with pytest.raises(BackingChainError):
        _open_and_read(path, True)


@pytest.mark.timeout(60)  # 70 opens under tracemalloc: seconds on a loaded host; still a hang bound
def test_backing_chain_too_deep(tmp_path: Path) -> None:
    depth = 70
    write(str(tmp_path / "img0.qcow2"), Craft())
    for i in range(1, depth + 1):
        _qcow2_with_backing(tmp_path / f"img{i}.qcow2", f"img{i - 1}.qcow2")
    _, error, peak = _measured(lambda: _open_and_read(str(tmp_path / f"img{depth}.qcow2"), True))
    assert peak < MEMORY_LIMIT
    assert isinstance(error, BackingChainError), repr(error)
    # A chain of 10 is fine.
    _open_and_read(str(tmp_path / "img10.qcow2"), True)


def test_backing_missing(tmp_path: Path) -> None:
    path = _qcow2_with_backing(tmp_path / "orphan.qcow2", "does-not-exist.qcow2")
    with pytest.raises(VdiskError) as info:
        _open_and_read(path, True)
    assert "does-not-exist" in str(info.value)


def test_cli_subprocess_prints_one_line(tmp_path: Path) -> None:
    """The installed entry point, not just main(): one line on stderr, exit 1, no traceback."""
    path = str(tmp_path / "bad.qcow2")
    Path(path).write_bytes(build(Craft(l1_size=0xFFFF_FFFF)))
    proc = subprocess.run(
        [sys.executable, "-m", "vdisk", "info", path],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
