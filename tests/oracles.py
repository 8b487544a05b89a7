"""QEMU's tools as oracles: check, compare and convert, with their answers parsed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io are not installed")


def qemu_check(path: str | Path) -> dict[str, Any]:
    """``qemu-img check --output=json``; the parsed report plus its exit status as ``rc``."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"unparsable": proc.stdout + proc.stderr}
    report["rc"] = proc.returncode
    return report


def assert_check_clean(path: str | Path) -> None:
    report = qemu_check(path)
    assert report["rc"] == 0, report
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def qemu_compare(image: str | Path, raw: str | Path, fmt: str = "qcow2") -> tuple[int, str]:
    """``qemu-img compare`` of an image against a raw file (rc 0: identical contents)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_compare_equal(image: str | Path, raw: str | Path) -> None:
    rc, out = qemu_compare(image, raw)
    assert rc == 0, out


def qemu_to_raw(image: str | Path, raw: str | Path) -> bytes:
    """The image's guest contents as QEMU reads them (``qemu-img convert -O raw``)."""
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image), str(raw)],
        check=True,
        capture_output=True,
    )
    return Path(raw).read_bytes()


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def run_qemu_luks(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool that may derive a LUKS key, past QEMU's PBKDF2 self-benchmark.

    The benchmark times 2^15 iterations by the thread's user CPU time, which moves only on a
    scheduler tick, and fails with "Unable to get accurate CPU usage" when none landed. With
    SHA-NI that round is shorter than a tick: sha1 failed 42 of 60 creates on our host.
    Turning off nettle's SHA-NI path (4 of 60 failed) and retrying makes a failure negligible."""
    env = {**os.environ, "NETTLE_FAT_OVERRIDE": "none"}
    for _attempt in range(50):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    return proc


def run(*args: str | Path) -> str:
    """Run a tool that must succeed; its stdout."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def qemu_io(image: str | Path, *commands: str, fmt: str = "qcow2") -> str:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    return run(*args, image)


def qemu_map(path: str | Path) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``, parsed."""
    result: list[dict[str, Any]] = json.loads(run("qemu-img", "map", "--output=json", path))
    return result


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` at ``where``, for disk-full tests (mounting needs root:
    the test skips, saying why, where it cannot mount)."""
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
