"""``-p`` for convert and compare: in a pipe, qemu-img's own progress text (which qemu-img 7.2
prints in a pipe too, checked here); on a terminal, a real bar with rate and ETA."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io


@pytest.fixture
def images(tmp_path: Path) -> Path:
    assert qemu_img(["create", "-q", "-f", "qcow2", "a.qcow2", "64M"], tmp_path).rc == 0
    qemu_io(["-c", "write -P 3 0 10M", "-c", "write -P 4 40M 1M", "a.qcow2"], tmp_path)
    assert qemu_img(["convert", "-O", "raw", "a.qcow2", "a.raw"], tmp_path).rc == 0
    return tmp_path


def _on_a_terminal(argv: list[str], cwd: Path) -> str:
    """Run argv with stdout and stderr on a 100-column pseudo-terminal; all it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out
    return out.decode()


def _lines(text: str) -> list[str]:
    # qemu_img() reads text mode, which turns qemu-img's "\r" into "\n"; compare lines.
    return text.replace("\r", "\n").splitlines()


def test_compare_progress_in_a_pipe_is_qemu_img_text(images: Path, vdisk_cli: VdiskRunner) -> None:
    # Byte for byte: qemu-img moves by 2 MiB reads and by block status extents (a qcow2 one
    # ends with its L2 table), prints past each 2% in C float arithmetic, and puts the size
    # warning between progress lines.
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "b.qcow2", "80M"], images)
    qemu_io(
        [
            "-c",
            "write -P 3 0 10M",
            "-c",
            "write -z 10M 1M",
            "-c",
            "write -P 4 40M 1M",
            "-c",
            "write -z 70M 2M",
            "b.qcow2",
        ],
        images,
    )
    qemu_img(["create", "-q", "-f", "qcow2", "c.qcow2", "1G"], images)
    qemu_io(
        [
            "-c",
            "write -P 3 0 10M",
            "-c",
            "write -P 4 40M 1M",
            "-c",
            "write -P 5 700M 9M",
            "c.qcow2",
        ],
        images,
    )
    for args in (
        ["compare", "-p", "a.qcow2", "a.raw"],
        ["compare", "-p", "-s", "a.qcow2", "a.raw"],
        ["compare", "-p", "a.raw", "b.qcow2"],
        ["compare", "-p", "b.qcow2", "a.qcow2"],
        ["compare", "-p", "c.qcow2", "c.qcow2"],
        ["compare", "-p", "a.qcow2", "c.qcow2"],
    ):
        ours, theirs = vdisk_cli(args, images), qemu_img(args, images)
        assert (ours.rc, _lines(ours.out)) == (theirs.rc, _lines(theirs.out)), args
        assert ours.out.startswith("    (0.00/100%)\r")
        assert len(_lines(ours.out)) > 4, ours.out  # progress in steps, not just 0 and 100


def test_convert_progress_in_a_pipe_is_qemu_img_text(images: Path, vdisk_cli: VdiskRunner) -> None:
    theirs = qemu_img(["convert", "-p", "-O", "raw", "a.qcow2", "q.raw"], images)
    ours = vdisk_cli(["convert", "-p", "-O", "raw", "a.qcow2", "v.raw"], images)
    mine, oracle = _lines(ours.out), _lines(theirs.out)
    assert mine[0] == oracle[0] == "    (0.00/100%)"
    # qemu-img ends with "\r\n", which text mode reads as one newline.
    assert mine[-2:] == [oracle[-1], ""] == ["    (100.00/100%)", ""]
    assert ours.out.startswith("    (0.00/100%)\r") and ours.out.endswith("(100.00/100%)\r\n")


@pytest.mark.parametrize(
    "args",
    [["convert", "-p", "-O", "raw", "a.qcow2", "t.raw"], ["compare", "-p", "a.qcow2", "a.raw"]],
    ids=["convert", "compare"],
)
def test_progress_on_a_terminal_is_a_bar(images: Path, args: list[str]) -> None:
    out = _on_a_terminal([sys.executable, "-m", "vdisk", *args], images)
    assert "100%|" in out and "64.0M/64.0M" in out and "B/s]" in out, out
    assert "/100%)" not in out
    if args[0] == "compare":
        assert out.endswith("Images are identical.\r\n")
