"""`vdisk resize` against `qemu-img resize`.

Each qcow2 case resizes an image with data (plain, zero and compressed clusters) with vdisk and
a raw copy with qemu-img the same way; then `qemu-img check` must be clean, `qemu-img info`
must show the new virtual size, `qemu-img compare` must find the two equal, and qemu-io must
read the data (and write past the old end afterwards). Error cases compare the last stderr
line and the exit status with qemu-img's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

from oracles import assert_check_clean


def _last_line(run: Run, prog: str) -> str:
    line = run.err.strip().splitlines()[-1] if run.err.strip() else ""
    return line.removeprefix(f"{prog}: ")


def _virtual_size(path: Path) -> int:
    run = qemu_img(["info", "--output=json", str(path)], path.parent)
    assert run.rc == 0, run.err
    size: int = json.loads(run.out)["virtual-size"]
    return size


def _make(d: Path, opts: str, size: str) -> None:
    assert qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", size], d).rc == 0
    qemu_io(
        ["-c", "write -P 1 0 100k", "-c", "write -P 2 1000k 200k", "-c", "write -z 1536k 64k",
         "-c", "write -c -P 3 2M 64k", "-c", "write -P 4 3M 1M", "a.qcow2"],
        d,
    )  # fmt: skip
    assert qemu_img(["convert", "-O", "raw", "a.qcow2", "a.raw"], d).rc == 0
    (d / "b.qcow2").write_bytes((d / "a.qcow2").read_bytes())


@pytest.mark.parametrize(
    ("opts", "steps"),
    [
        ("cluster_size=65536", [["a", "10G"], ["a", "--shrink", "3500k"]]),
        ("cluster_size=512", [["a", "+60M"], ["a", "--shrink", "--", "-63M"]]),
        ("cluster_size=16384,extended_l2=on", [["a", "--shrink", "1536512"], ["a", "+1G"]]),
        ("cluster_size=65536,refcount_bits=1", [["a", "--shrink", "1M"], ["a", "5M"]]),
        ("cluster_size=65536,compat=0.10", [["a", "--shrink", "2100k"], ["a", "3G"]]),
        ("cluster_size=65536", [["a", "--shrink", "2100k"], ["a", "5M"]]),
        ("cluster_size=2048,lazy_refcounts=on", [["a", "100M"], ["a", "--shrink", "3M"]]),
    ],
)
def test_resize_qcow2_matches_raw(
    tmp_path: Path, vdisk_cli: VdiskRunner, opts: str, steps: list[list[str]]
) -> None:
    d = tmp_path
    _make(d, opts, "4M")
    for step in steps:
        flags = step[1:-1]
        size = step[-1]
        run = vdisk_cli(["resize", *flags, "a.qcow2", size], d)
        assert (run.rc, run.out) == (0, "Image resized.\n"), run.err
        ref = qemu_img(["resize", "-q", "-f", "raw", *flags, "a.raw", size], d)
        assert ref.rc == 0, ref.err
        assert qemu_img(["resize", "-q", *flags, "b.qcow2", size], d).rc == 0
        assert_check_clean(d / "a.qcow2")
        assert _virtual_size(d / "a.qcow2") == (d / "a.raw").stat().st_size
        # Same content as qemu-img's own resize; and as a raw copy wherever QEMU's is (after
        # an unaligned shrink, regrowing shows the old tail of the last cluster in QEMU too).
        cmp = qemu_img(["compare", "a.qcow2", "b.qcow2"], d)
        assert cmp.rc == 0, cmp.out + cmp.err
        mine = qemu_img(["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"], d)
        theirs = qemu_img(["compare", "-f", "qcow2", "-F", "raw", "b.qcow2", "a.raw"], d)
        assert (mine.rc, mine.out) == (theirs.rc, theirs.out)
    # The resized image stays writable at its new end.
    end = _virtual_size(d / "a.qcow2")
    qemu_io(["-c", f"write -P 9 {end - 65536} 65536", "a.qcow2"], d)
    qemu_io(["-c", f"read -P 9 {end - 65536} 65536", "-c", "read -P 1 0 100k", "a.qcow2"], d)
    assert_check_clean(d / "a.qcow2")


def test_resize_qcow2_with_snapshot(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    _make(d, "cluster_size=65536", "4M")
    assert qemu_img(["snapshot", "-c", "s1", "a.qcow2"], d).rc == 0
    for flags, size in ((["--shrink"], "1M"), ([], "2G")):
        run = vdisk_cli(["resize", *flags, "a.qcow2", size], d)
        assert run.rc == 0, run.err
        assert qemu_img(["resize", "-q", "-f", "raw", *flags, "a.raw", size], d).rc == 0
        assert_check_clean(d / "a.qcow2")
        assert qemu_img(["compare", "-F", "raw", "a.qcow2", "a.raw"], d).rc == 0
    # The snapshot still holds the old data.
    assert qemu_img(["snapshot", "-a", "s1", "a.qcow2"], d).rc == 0
    qemu_io(["-c", "read -P 4 3M 1M", "a.qcow2"], d)


def _shape(path: Path) -> list[tuple[int, int, bool, bool, bool]]:
    """``qemu-img map`` without host offsets, adjacent runs with equal flags merged."""
    out: list[tuple[int, int, bool, bool, bool]] = []
    for e in json.loads(qemu_img(["map", "--output=json", str(path)], path.parent).out):
        flags = (e["present"], e["zero"], e["data"])
        if out and out[-1][2:] == flags and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *flags)
        else:
            out.append((e["start"], e["length"], *flags))
    return out


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096",
                                  "cluster_size=16384,extended_l2=on", "compat=0.10"])  # fmt: skip
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_resize_qcow2_preallocation(
    tmp_path: Path, vdisk_cli: VdiskRunner, opts: str, mode: str
) -> None:
    d = tmp_path
    _make(d, opts, "4M")
    for size in ("4100k", "+3M"):
        run = vdisk_cli(["resize", f"--preallocation={mode}", "a.qcow2", size], d)
        assert run.rc == 0, run.err
        assert qemu_img(["resize", "-q", f"--preallocation={mode}", "b.qcow2", size], d).rc == 0
        assert qemu_img(["resize", "-q", "-f", "raw", "a.raw", size], d).rc == 0
        assert_check_clean(d / "a.qcow2")
        assert qemu_img(["compare", "-F", "raw", "a.qcow2", "a.raw"], d).rc == 0
    if opts != "compat=0.10":  # v2: QEMU also writes zeros over the old tail cluster
        assert _shape(d / "a.qcow2") == _shape(d / "b.qcow2")
    assert qemu_img(["compare", "a.qcow2", "b.qcow2"], d).rc == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize(
    "args",
    [
        ["2M"],
        ["+1000"],
        ["+1x"],
        ["--", "-1M"],
        ["-1M"],
        ["--shrink", "-1M"],
        ["--shrink", "-4M"],
        ["--shrink", "-8M"],
        ["--preallocation=bad", "8M"],
        ["--preallocation=metadata", "8M"],
        ["--preallocation=full", "--shrink", "1M"],
        ["--preallocation=falloc", "+513"],
        ["8M", "9M"],
        [],
    ],
)
def test_resize_messages_match_qemu(
    tmp_path: Path, vdisk_cli: VdiskRunner, fmt: str, args: list[str]
) -> None:
    d = tmp_path
    for name in ("v.img", "q.img"):
        assert qemu_img(["create", "-q", "-f", fmt, name, "4M"], d).rc == 0
    pos = args.index("--") + 1 if "--" in args else len(args) - 1 if args else 0
    mine = vdisk_cli(["resize", *args[:pos], "v.img", *args[pos:]], d)
    ref = qemu_img(["resize", "-f", fmt, *args[:pos], "q.img", *args[pos:]], d)
    assert mine.rc == ref.rc, (mine, ref)
    assert mine.out == ref.out
    if ref.rc:
        want = _last_line(ref, "qemu-img")
        if "Try 'qemu-img --help'" in want:
            want = ref.err.strip().splitlines()[0].removeprefix("qemu-img: ")
        assert want in mine.err
    assert (d / "v.img").stat().st_size == (d / "q.img").stat().st_size or fmt == "qcow2"
    assert _virtual_size(d / "v.img") == _virtual_size(d / "q.img")


def test_resize_v2_with_snapshots_refused(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    assert (
        qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "1M"], d).rc == 0
    )
    assert qemu_img(["snapshot", "-c", "s", "a.qcow2"], d).rc == 0
    ref = qemu_img(["resize", "a.qcow2", "2M"], d)
    run = vdisk_cli(["resize", "a.qcow2", "2M"], d)
    assert run.rc == ref.rc == 1
    assert _last_line(ref, "qemu-img") in run.err
    assert _virtual_size(d / "a.qcow2") == 1 << 20


def test_resize_raw_modes(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    (d / "r").write_bytes(b"\x05" * 3000)
    for args in (["+1M"], ["--preallocation=falloc", "+100k"], ["--preallocation=full", "+3"],
                 ["--shrink", "1001"], ["-q", "1M"]):  # fmt: skip
        pos = len(args) - 1
        before = (d / "r").stat().st_size
        run = vdisk_cli(["resize", *args[:pos], "r", args[pos]], d)
        assert run.rc == 0, run.err
        assert run.out == ("" if "-q" in args else "Image resized.\n")
        (d / "q").write_bytes(b"\x05" * 3000)
        assert before >= 1001
    data = (d / "r").read_bytes()
    assert len(data) == 1 << 20
    assert data[:1001] == b"\x05" * 1001
    assert data[1001:] == bytes(len(data) - 1001)
    assert vdisk_cli(["resize", "nope.raw", "1M"], d).rc == 1


@pytest.mark.parametrize(
    "opts", ["cluster_size=65536", "cluster_size=4096", "cluster_size=16384,extended_l2=on"]
)
def test_resize_overlay_hides_longer_backing(
    tmp_path: Path, vdisk_cli: VdiskRunner, opts: str
) -> None:
    d = tmp_path
    assert qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d).rc == 0
    qemu_io(["-c", "write -P 5 0 4M", "base.qcow2"], d)
    create = ["create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2"]
    assert qemu_img([*create, "a.qcow2", "1000k"], d).rc == 0
    qemu_io(["-c", "write -P 7 900k 50k", "a.qcow2"], d)
    (d / "b.qcow2").write_bytes((d / "a.qcow2").read_bytes())
    run = vdisk_cli(["resize", "a.qcow2", "3M"], d)
    assert run.rc == 0, run.err
    assert qemu_img(["resize", "-q", "b.qcow2", "3M"], d).rc == 0
    assert_check_clean(d / "a.qcow2")
    assert qemu_img(["compare", "a.qcow2", "b.qcow2"], d).rc == 0
    qemu_io(["-c", "read -P 0 1000k 2072k", "-c", "read -P 5 0 900k", "a.qcow2"], d)


def test_resize_v2_overlay_refused(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    assert qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d).rc == 0
    create = ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F"]
    assert qemu_img([*create, "qcow2", "a.qcow2", "1M"], d).rc == 0
    (d / "b.qcow2").write_bytes((d / "a.qcow2").read_bytes())
    ref = qemu_img(["resize", "b.qcow2", "3M"], d)
    run = vdisk_cli(["resize", "a.qcow2", "3M"], d)
    assert run.rc == ref.rc == 1
    assert _last_line(ref, "qemu-img") in run.err
    assert _virtual_size(d / "a.qcow2") == _virtual_size(d / "b.qcow2") == 1 << 20


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=8"])
def test_shrink_trims_the_file(tmp_path: Path, vdisk_cli: VdiskRunner, opts: str) -> None:
    d = tmp_path
    assert qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "40M"], d).rc == 0
    qemu_io(["-c", "write -P 1 0 40M", "a.qcow2"], d)
    (d / "b.qcow2").write_bytes((d / "a.qcow2").read_bytes())
    assert vdisk_cli(["resize", "-q", "--shrink", "a.qcow2", "5M"], d).rc == 0
    assert qemu_img(["resize", "-q", "--shrink", "b.qcow2", "5M"], d).rc == 0
    assert_check_clean(d / "a.qcow2")
    assert (d / "a.qcow2").stat().st_size == (d / "b.qcow2").stat().st_size
    assert qemu_img(["compare", "a.qcow2", "b.qcow2"], d).rc == 0
