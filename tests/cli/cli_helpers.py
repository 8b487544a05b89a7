"""Helpers to run ``vdisk`` (in-process, through its real entry point) and ``qemu-img``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdisk.cli import main as cli_main


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str


VdiskRunner = Callable[[list[str], Path], Run]


def qemu_img(args: list[str], cwd: Path) -> Run:
    proc = subprocess.run(
        ["qemu-img", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def qemu_io(args: list[str], cwd: Path) -> None:
    subprocess.run(["qemu-io", *args], cwd=cwd, capture_output=True, check=True)


def make_vdisk_runner(capsys: pytest.CaptureFixture[str]) -> VdiskRunner:
    def run(args: list[str], cwd: Path) -> Run:
        old = os.getcwd()
        capsys.readouterr()
        os.chdir(cwd)
        try:
            rc = cli_main(args)
        finally:
            os.chdir(old)
        out, err = capsys.readouterr()
        return Run(rc, out, err)

    return run


# The struct-crafting helpers live with the qcow2 tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qcow2"))
