"""Helpers for the qcow2 core tests: qemu-img/qemu-io as oracles."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io are not installed")


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def qemu_io(path: str | Path, *commands: str, fmt: str = "qcow2") -> str:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    return run(*args, path)


def check(path: str | Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    report: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    report["rc"] = proc.returncode
    report["stderr"] = proc.stderr
    return report


def assert_clean(path: str | Path) -> None:
    r = check(path)
    assert r["rc"] == 0, r
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r


def to_raw(path: str | Path, out: str | Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", path, out)
    return Path(out).read_bytes()


def compare(image: str | Path, raw: str | Path) -> None:
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)


def qemu_map(path: str | Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(run("qemu-img", "map", "--output=json", path))
    return result
