"""`vdisk measure` against `qemu-img measure`, byte for byte (human and JSON).

Sizes and input images (qcow2 with data, zero, compressed and unallocated clusters, a backing
chain, persistent bitmaps; sparse raw files) are measured for raw and qcow2 targets across
cluster sizes, refcount widths, extended L2, compat levels and preallocation modes. Error cases
compare the message and exit status.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io

TARGETS = [
    [],
    ["-O", "raw"],
    ["-O", "qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
    ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
    ["-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on"],
    ["-O", "qcow2", "-o", "extended_l2=on,preallocation=metadata"],
    ["-O", "qcow2", "-o", "preallocation=falloc"],
    ["-O", "qcow2", "-o", "preallocation=full,cluster_size=8k"],
    ["-O", "qcow2", "-o", "compat=0.10"],
    ["-O", "qcow2", "-o", "refcount_bits=8", "-o", "cluster_size=32768"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("measure")
    assert qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2",
                     "5M"], d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 1 0 100k", "-c", "write -P 2 3M 1000", "base.qcow2"], d)
    assert qemu_img(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     "top.qcow2", "7M"], d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 3 200k 8k", "-c", "write -z 0 16k", "-c", "write -c -P 4 6M 64k",
             "top.qcow2"], d)  # fmt: skip
    assert qemu_img(["create", "-q", "-f", "qcow2", "bm.qcow2", "100M"], d).rc == 0
    qemu_io(["-c", "write -P 5 1M 130k", "-c", "write -P 6 99M 1M", "bm.qcow2"], d)
    assert qemu_img(["bitmap", "--add", "bm.qcow2", "b0"], d).rc == 0
    assert qemu_img(["bitmap", "--add", "-g", "512", "bm.qcow2", "a-longer-name"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "9M"],
                    d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 7 1M 300k", "v2.qcow2"], d)
    with (d / "sparse.raw").open("wb") as f:
        f.truncate(10 * 1024 * 1024 + 1000)
        f.seek(4096)
        f.write(b"x" * 70000)
        f.seek(9 << 20)
        f.write(b"y")
    (d / "small.raw").write_bytes(b"z" * 3000)
    return d


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: " ".join(t) or "default")
@pytest.mark.parametrize(
    "source",
    [
        ["--size", "1G"],
        ["--size", "1001"],
        ["--size", "100G"],
        ["base.qcow2"],
        ["top.qcow2"],
        ["-f", "qcow2", "bm.qcow2"],
        ["v2.qcow2"],  # a v2 source has no bitmaps line, even for a v3 target
        ["sparse.raw"],
        ["-f", "raw", "small.raw"],
    ],
    ids=lambda s: " ".join(s),
)
@pytest.mark.parametrize("output", ["human", "json"])
def test_measure_matches_qemu(
    images: Path, vdisk_cli: VdiskRunner, target: list[str], source: list[str], output: str
) -> None:
    args = ["measure", f"--output={output}", *target, *source]
    ref = qemu_img(args, images)
    mine = vdisk_cli(args, images)
    assert ref.rc == 0, ref.err
    assert (mine.rc, mine.out) == (ref.rc, ref.out), mine.err


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--size", "1M", "base.qcow2"],
        ["--size", "-1"],
        ["--size", "1M", "--output=xml"],
        ["--size", "1M", "-f", "raw"],
        ["-O", "qcow2", "-o", "bogus=1", "--size", "1M"],
        ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1M"],
        ["-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "--size", "1M"],
        ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
        ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1M"],
        ["-O", "qcow2", "-o", "compat=v9", "--size", "1M"],
        ["-O", "qcow2", "-o", "preallocation=xx", "--size", "1M"],
        ["-O", "qcow2", "nope.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", "3T"],
    ],
)
def test_measure_errors_match_qemu(images: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    ref = qemu_img(["measure", *args], images)
    mine = vdisk_cli(["measure", *args], images)
    assert mine.rc == ref.rc == 1, (mine, ref)
    assert mine.out == ref.out == ""
    first = ref.err.splitlines()[0].removeprefix("qemu-img: ")
    if first.startswith("Could not open"):
        assert "nope.qcow2" in mine.err and "No such file" in mine.err
    else:
        assert first in mine.err
