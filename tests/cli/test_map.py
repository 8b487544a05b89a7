"""`vdisk map` against `qemu-img map` on the same files: stdout and exit status identical.

Images come from qemu-img / qemu-io: data, zero and unallocated clusters, backing chains
(qcow2 over qcow2 over raw, a shorter backing file, relative names in subdirectories),
compressed clusters (which the human format refuses) and sparse raw files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io

Maker = Callable[[Path], str]


def _qcow2(d: Path, name: str, size: str, *opts: str) -> None:
    sized = [size] if size else []
    assert qemu_img(["create", "-q", "-f", "qcow2", *opts, name, *sized], d).rc == 0


def _io(d: Path, image: str, *commands: str, fmt: str = "qcow2") -> None:
    args = ["-f", fmt]
    for c in commands:
        args += ["-c", c]
    qemu_io([*args, image], d)


def _empty(d: Path) -> str:
    _qcow2(d, "empty.qcow2", "3M")
    return "empty.qcow2"


def _mixed(d: Path) -> str:
    _qcow2(d, "mixed.qcow2", "8M", "-o", "cluster_size=4096")
    _io(
        d,
        "mixed.qcow2",
        "write -P 1 0 12k",
        "write -P 2 20k 4k",  # a separate run, host-contiguous with the first
        "write -P 3 1M 64k",
        "write -z 2M 64k",
        "write -P 4 3M 8k",
        "write -z 3M 4k",  # zero over data keeps a preallocated zero cluster
        "discard 1M 4k",
    )
    return "mixed.qcow2"


def _chain(d: Path) -> str:
    (d / "sub").mkdir()
    assert qemu_img(["create", "-q", "-f", "raw", "sub/base.img", "4M"], d).rc == 0
    _io(d, "sub/base.img", "write -P 9 0 256k", "write -P 8 3M 4k", fmt="raw")
    _qcow2(d, "sub/mid.qcow2", "", "-b", "base.img", "-F", "raw")
    _io(d, "sub/mid.qcow2", "write -P 1 64k 64k", "write -z 1M 128k")
    _qcow2(d, "top.qcow2", "6M", "-b", "sub/mid.qcow2", "-F", "qcow2")
    _io(d, "top.qcow2", "write -P 2 128k 64k", "write -P 3 5M 64k", "write -z 3M 64k")
    return "top.qcow2"


def _absolute(d: Path) -> str:
    _qcow2(d, "abs-base.qcow2", "2M")
    _io(d, "abs-base.qcow2", "write -P 7 0 64k")
    _qcow2(d, "abs.qcow2", "", "-b", str(d / "abs-base.qcow2"), "-F", "qcow2")
    _io(d, "abs.qcow2", "write -P 6 64k 64k")
    return "abs.qcow2"


def _compressed(d: Path) -> str:
    _qcow2(d, "comp.qcow2", "4M")
    _io(d, "comp.qcow2", "write -P 1 0 64k", "write -c -P 5 1M 128k", "write -P 2 2M 64k")
    return "comp.qcow2"


def _raw(d: Path) -> str:
    assert qemu_img(["create", "-q", "-f", "raw", "disk.img", "2M"], d).rc == 0
    _io(d, "disk.img", "write -P 1 300k 4k", "write -P 2 1M 16k", fmt="raw")
    return "disk.img"


MAKERS: dict[str, Maker] = {
    "empty": _empty,
    "mixed": _mixed,
    "chain": _chain,
    "absolute": _absolute,
    "compressed": _compressed,
    "raw": _raw,
}

FLAGS = [
    [],
    ["--output=json"],
    ["--output=json", "--start-offset", "1M", "--max-length", "2M"],
    ["--start-offset", "4k", "--max-length", "1M"],
    ["--output=json", "--start-offset", "100M"],
]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_map_matches_qemu(tmp_path: Path, vdisk_cli: VdiskRunner, name: str) -> None:
    image = MAKERS[name](tmp_path)
    for flags in FLAGS:
        args = ["map", *flags, image]
        ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (flags, ours, theirs)
        if theirs.rc:
            assert "compressed clusters" in theirs.err
            assert ours.err.count("\n") == 1 and "compressed clusters" in ours.err


def test_map_absolute_path_and_format(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    image = str(tmp_path / _chain(tmp_path))
    for args in (["map", image], ["map", "-f", "qcow2", "--output=json", image]):
        ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out)


def test_map_errors(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _raw(tmp_path)
    for args in (
        ["map", "missing.qcow2"],
        ["map", "-f", "qcow2", "disk.img"],
        ["map", "--output=xml", "disk.img"],
        ["map", "-f", "vmdk", "disk.img"],
    ):
        ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
        assert theirs.rc == 1 and ours.rc == 1, (args, ours)
        assert ours.out == "" and ours.err.count("\n") == 1, (args, ours)
