"""`vdisk compare` against `qemu-img compare` on the same pairs: messages and exit status.

Pairs cover identical images in different formats, a one-byte difference (the reported offset
is its 512-byte sector), size mismatches with zero and nonzero tails, strict mode, quiet mode
and open errors (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io


def _poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path
    assert qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d).rc == 0
    qemu_io(
        ["-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k",
         "base.qcow2"],
        d,
    )  # fmt: skip
    assert qemu_img(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     "top.qcow2", "6M"], d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 3 64k 64k", "-c", "write -P 4 5M 64k", "-c",
             "write -c -P 5 4M 128k", "top.qcow2"], d)  # fmt: skip
    assert qemu_img(["convert", "-O", "raw", "top.qcow2", "top.raw"], d).rc == 0
    assert qemu_img(["convert", "-O", "raw", "base.qcow2", "base.raw"], d).rc == 0
    (d / "top2.raw").write_bytes((d / "top.raw").read_bytes())
    _poke(d / "top2.raw", 1049000, b"X")
    (d / "late.raw").write_bytes((d / "top.raw").read_bytes())
    _poke(d / "late.raw", (6 << 20) - 1, b"Z")
    for name, tail in (("long0.raw", b""), ("long1.raw", b"Y")):
        (d / name).write_bytes((d / "base.raw").read_bytes())
        with (d / name).open("r+b") as f:
            f.truncate(5 << 20)
        if tail:
            _poke(d / name, 4500000, tail)
    assert qemu_img(["create", "-q", "-f", "qcow2", "e1.qcow2", "4M"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "qcow2", "e2.qcow2", "4M"], d).rc == 0
    qemu_io(["-c", "write -z 0 64k", "e2.qcow2"], d)
    return d


PAIRS = [
    ["top.qcow2", "top.raw"],
    ["top.raw", "top.qcow2"],
    ["top.raw", "top2.raw"],
    ["top.qcow2", "top2.raw"],
    ["top.qcow2", "late.raw"],
    ["top.qcow2", "base.qcow2"],
    ["base.raw", "long0.raw"],
    ["long1.raw", "base.qcow2"],
    ["base.qcow2", "long1.raw"],
    ["-q", "top.raw", "top2.raw"],
    ["-q", "top.raw", "top.qcow2"],
    ["-s", "top.raw", "top2.raw"],
    ["-s", "base.raw", "long0.raw"],
    ["-s", "top.qcow2", "top.raw"],
    ["-s", "top.raw", "top.raw"],
    ["-s", "base.qcow2", "base.qcow2"],
    ["-s", "e1.qcow2", "e2.qcow2"],
    ["-s", "-F", "raw", "top.qcow2", "top.raw"],
    ["-f", "qcow2", "-F", "raw", "top.qcow2", "top.raw"],
]


def test_compare_matches_qemu(images: Path, vdisk_cli: VdiskRunner) -> None:
    for pair in PAIRS:
        args = ["compare", *pair]
        ours, theirs = vdisk_cli(args, images), qemu_img(args, images)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (pair, ours, theirs)


def test_compare_errors_exit_2(images: Path, vdisk_cli: VdiskRunner) -> None:
    for pair in (["missing.raw", "top.raw"], ["-f", "qcow2", "top.raw", "top.raw"],
                 ["top.raw", "-F", "qcow2", "base.raw"]):  # fmt: skip
        args = ["compare", *pair]
        ours, theirs = vdisk_cli(args, images), qemu_img(args, images)
        assert theirs.rc == 2 and ours.rc == 2, (pair, ours)
        assert ours.out == "" and ours.err.count("\n") == 1


def test_compare_large_sparse(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """A 3 GiB image: zero ranges are skipped, data compared across probe windows."""
    d = tmp_path
    for name in ("a.qcow2", "b.qcow2"):
        assert qemu_img(["create", "-q", "-f", "qcow2", name, "3G"], d).rc == 0
        qemu_io(["-c", "write -P 1 1023M 2M", "-c", "write -P 2 2G 64k", name], d)
    qemu_io(["-c", "write -P 3 2049M 512", "b.qcow2"], d)
    for pair in (["a.qcow2", "a.qcow2"], ["a.qcow2", "b.qcow2"]):
        args = ["compare", *pair]
        ours, theirs = vdisk_cli(args, d), qemu_img(args, d)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (pair, ours, theirs)


def test_compare_strict_allocation(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """-s: the first offset where allocation status differs, even with equal contents."""
    d = tmp_path
    for name, cmds in (
        ("sa.qcow2", []),
        ("sb.qcow2", ["write -z 1M 64k"]),
        ("sc.qcow2", ["write -P 0 1M 64k"]),
        ("sd.qcow2", ["write -P 0 1M 64k", "write -P 0 3M 1M"]),
    ):
        assert qemu_img(["create", "-q", "-f", "qcow2", name, "4M"], d).rc == 0
        if cmds:
            qemu_io([arg for c in cmds for arg in ("-c", c)] + [name], d)
    assert qemu_img(["create", "-q", "-f", "qcow2", "-b", "sc.qcow2", "-F", "qcow2",
                     "se.qcow2"], d).rc == 0  # fmt: skip
    for name, at in (("sr1.raw", 63), ("sr2.raw", 16)):
        with (d / name).open("wb") as f:
            f.truncate(4 << 20)
            f.seek(at << 16)
            f.write(bytes(64 << 10))
    for pair in (
        ["sa.qcow2", "sb.qcow2"],
        ["sa.qcow2", "sc.qcow2"],
        ["sc.qcow2", "sd.qcow2"],
        ["sd.qcow2", "sc.qcow2"],
        ["sr1.raw", "sr2.raw"],
        ["sa.qcow2", "sr1.raw"],
        ["sc.qcow2", "se.qcow2"],
        ["sd.qcow2", "sr1.raw"],
    ):
        args = ["compare", "-s", *pair]
        ours, theirs = vdisk_cli(args, d), qemu_img(args, d)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (pair, ours, theirs)


def test_compare_odd_sized_raw(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """QEMU sees a raw file's size rounded up to whole sectors, the tail as zeros."""
    d = tmp_path
    (d / "z1000.raw").write_bytes(bytes(1000))
    (d / "z1024.raw").write_bytes(bytes(1024))
    (d / "a3.raw").write_bytes(b"abc")
    (d / "b3.raw").write_bytes(b"abd")
    for pair in (
        ["z1000.raw", "z1024.raw"],
        ["-s", "z1000.raw", "z1024.raw"],
        ["a3.raw", "b3.raw"],
        ["a3.raw", "z1000.raw"],
        ["-s", "a3.raw", "a3.raw"],
    ):
        args = ["compare", *pair]
        ours, theirs = vdisk_cli(args, d), qemu_img(args, d)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (pair, ours, theirs)
