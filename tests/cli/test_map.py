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


def _extended(d: Path) -> str:
    """Extended L2: subclusters of an allocated cluster that are not written keep an offset."""
    _qcow2(d, "ext.qcow2", "16M", "-o", "extended_l2=on,cluster_size=128k")
    _io(
        d,
        "ext.qcow2",
        "write -P 1 0 4k",
        "write -P 2 1M 200k",
        "write -z 3M 128k",
        "write -P 3 5M 64k",
        "write -z 5M 4k",
    )
    return "ext.qcow2"


def _prealloc_metadata(d: Path) -> str:
    """preallocation=metadata: QEMU asks the file system which data clusters are holes."""
    _qcow2(d, "pre.qcow2", "2M", "-o", "preallocation=metadata,cluster_size=4k")
    _io(d, "pre.qcow2", "write -P 1 0 4k", "write -P 2 2044k 4k", "write -P 3 1M 6k")
    _qcow2(d, "pre-top.qcow2", "", "-b", "pre.qcow2", "-F", "qcow2")
    _io(d, "pre-top.qcow2", "write -P 4 512k 6k")
    return "pre-top.qcow2"


def _prealloc_falloc(d: Path) -> str:
    _qcow2(d, "falloc.qcow2", "4M", "-o", "preallocation=falloc")
    return "falloc.qcow2"


def _odd_raw(d: Path) -> str:
    """A raw file that ends mid-sector (QEMU rounds its size up), as a backing file too."""
    with (d / "odd.img").open("wb") as f:
        f.truncate(70000)
        f.seek(69000)
        f.write(b"x")
    _qcow2(d, "odd-top.qcow2", "100k", "-b", "odd.img", "-F", "raw")
    return "odd-top.qcow2"


def _odd_raw_alone(d: Path) -> str:
    (d / "short.img").write_bytes(b"hello" + bytes(995))
    return "short.img"


MAKERS: dict[str, Maker] = {
    "odd-raw-backing": _odd_raw,
    "odd-raw": _odd_raw_alone,
    "extended-l2": _extended,
    "prealloc-metadata": _prealloc_metadata,
    "prealloc-falloc": _prealloc_falloc,
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
