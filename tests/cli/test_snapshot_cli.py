"""``vdisk snapshot`` and ``vdisk convert -l`` against qemu-img 7.2: output, messages, exit
codes, and the images they leave (qemu-img check, snapshot -l, convert -l)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io

from oracles import assert_check_clean

MIB = 1 << 20


def _image(d: Path, name: str = "a.qcow2", opts: str = "cluster_size=4096") -> Path:
    assert qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, name, "2M"], d).rc == 0
    qemu_io(["-c", "write -P 1 0 64k", "-c", "write -P 2 1M 8k", name], d)
    return d / name


def _twins(d: Path) -> None:
    """a.qcow2 (for vdisk) and b.qcow2 (for qemu-img), the same content and snapshots."""
    _image(d)
    assert qemu_img(["snapshot", "-c", "one", "a.qcow2"], d).rc == 0
    qemu_io(["-c", "write -P 3 4k 4k", "a.qcow2"], d)
    assert qemu_img(["snapshot", "-c", "two", "a.qcow2"], d).rc == 0
    shutil.copy(d / "a.qcow2", d / "b.qcow2")


def _err_line(text: str, prog: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("Try ")]
    return lines[-1].removeprefix(f"{prog}: ") if lines else ""


def test_list_matches_qemu_img(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _twins(tmp_path)
    mine = vdisk_cli(["snapshot", "-l", "a.qcow2"], tmp_path)
    ref = qemu_img(["snapshot", "-l", "a.qcow2"], tmp_path)
    assert (mine.rc, mine.out) == (ref.rc, ref.out)
    assert ref.out.startswith("Snapshot list:\n")
    for flags in (["-q"], ["-U"]):
        mine = vdisk_cli(["snapshot", *flags, "-l", "a.qcow2"], tmp_path)
        assert (mine.rc, mine.out) == (0, ref.out)
    _image(tmp_path, "empty.qcow2")
    mine = vdisk_cli(["snapshot", "-l", "empty.qcow2"], tmp_path)
    assert (mine.rc, mine.out) == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ["-a", "nosuch"],
        ["-d", "nosuch"],
        ["-d", "1"],  # qemu-img deletes by name only
        ["-l", "-l"],
        ["-l", "-c", "x"],
        ["-x"],
        ["-f", "qcow2", "-l"],
        ["-c", "x", "-U"],
        ["-c"],
        [],
        ["-a", "one"],
        ["-a", "2"],
        ["-d", "two"],
        ["-c", "three"],
        ["-c", ""],
    ],
)
def test_actions_match_qemu_img(tmp_path: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    _twins(tmp_path)
    files = [] if args == ["-c"] else None
    mine = vdisk_cli(["snapshot", *args, *(["a.qcow2"] if files is None else [])], tmp_path)
    ref = qemu_img(["snapshot", *args, *(["b.qcow2"] if files is None else [])], tmp_path)
    assert mine.rc == ref.rc, (mine, ref)
    assert mine.out == ref.out
    want = _err_line(ref.err, "qemu-img").replace("b.qcow2", "a.qcow2")
    assert want in mine.err
    if ref.rc == 0:
        assert_check_clean(tmp_path / "a.qcow2")
        a = json.loads(qemu_img(["info", "--output=json", "a.qcow2"], tmp_path).out)
        b = json.loads(qemu_img(["info", "--output=json", "b.qcow2"], tmp_path).out)
        keys = ("id", "name", "vm-state-size", "vm-clock-sec", "icount")
        assert [[s.get(k) for k in keys] for s in a.get("snapshots", [])] == [
            [s.get(k) for k in keys] for s in b.get("snapshots", [])
        ]
        assert a["virtual-size"] == b["virtual-size"]
        assert qemu_img(["compare", "a.qcow2", "b.qcow2"], tmp_path).rc == 0


def test_raw_images(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    assert qemu_img(["create", "-q", "-f", "raw", "r.raw", "1M"], tmp_path).rc == 0
    for args in (["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]):
        mine = vdisk_cli(["snapshot", *args, "r.raw"], tmp_path)
        ref = qemu_img(["snapshot", *args, "r.raw"], tmp_path)
        assert (mine.rc, mine.out) == (ref.rc, ref.out), args
        assert _err_line(ref.err, "qemu-img") in mine.err


def test_vdisk_cli_cycle_judged_by_qemu(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    _image(d, opts="cluster_size=65536")
    assert vdisk_cli(["snapshot", "-c", "base", "a.qcow2"], d).rc == 0
    qemu_io(["-c", "write -P 9 0 8k", "a.qcow2"], d)
    assert vdisk_cli(["snapshot", "-c", "later", "a.qcow2"], d).rc == 0
    assert_check_clean(d / "a.qcow2")
    assert (
        vdisk_cli(["snapshot", "-l", "a.qcow2"], d).out
        == qemu_img(["snapshot", "-l", "a.qcow2"], d).out
    )
    assert vdisk_cli(["snapshot", "-a", "base", "a.qcow2"], d).rc == 0
    qemu_io(["-c", "read -P 1 0 64k", "a.qcow2"], d)
    assert vdisk_cli(["snapshot", "-d", "base", "a.qcow2"], d).rc == 0
    assert_check_clean(d / "a.qcow2")
    assert qemu_img(["snapshot", "-a", "later", "a.qcow2"], d).rc == 0
    qemu_io(["-c", "read -P 9 0 8k", "a.qcow2"], d)


def test_info_shows_snapshots_as_qemu_img(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    _image(d)
    assert vdisk_cli(["snapshot", "-c", "made by vdisk", "a.qcow2"], d).rc == 0
    assert qemu_img(["snapshot", "-c", "made by qemu", "a.qcow2"], d).rc == 0
    for extra in ([], ["--output=json"]):
        mine = vdisk_cli(["info", *extra, "a.qcow2"], d)
        ref = qemu_img(["info", *extra, "a.qcow2"], d)
        assert mine.rc == ref.rc == 0
        if extra:
            got, want = json.loads(mine.out), json.loads(ref.out)
            got.pop("actual-size"), want.pop("actual-size")
            assert got == want
        else:
            strip = [ln for ln in mine.out.splitlines() if not ln.startswith("disk size")]
            assert strip == [ln for ln in ref.out.splitlines() if not ln.startswith("disk size")]


@pytest.mark.parametrize(
    "spec",
    [
        "one",
        "2",
        "snapshot.name=one",
        "snapshot.id=2",
        "snapshot.id=1,snapshot.name=one",
        "snapshot.id=2,snapshot.name=one",
        "nosuch",
        "snapshot.foo=1",
        "foo=bar",
    ],
)
def test_convert_from_snapshot_matches_qemu_img(
    tmp_path: Path, vdisk_cli: VdiskRunner, spec: str
) -> None:
    d = tmp_path
    _twins(d)
    assert qemu_img(["resize", "-q", "a.qcow2", "3M"], d).rc == 0  # convert -l keeps this size
    mine = vdisk_cli(["convert", "-l", spec, "-O", "raw", "a.qcow2", "v.raw"], d)
    ref = qemu_img(["convert", "-l", spec, "-O", "raw", "a.qcow2", "q.raw"], d)
    assert mine.rc == ref.rc, (mine, ref)
    if ref.rc:
        assert _err_line(ref.err, "qemu-img") in mine.err
        return
    assert (d / "v.raw").read_bytes() == (d / "q.raw").read_bytes()
    mine = vdisk_cli(["convert", "-l", spec, "-O", "qcow2", "a.qcow2", "v.qcow2"], d)
    assert mine.rc == 0, mine
    assert_check_clean(d / "v.qcow2")
    assert qemu_img(["compare", "-F", "raw", "v.qcow2", "q.raw"], d).rc == 0


def test_convert_l_refuses_several_sources(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    d = tmp_path
    _twins(d)
    args = ["convert", "-l", "one", "-O", "raw", "a.qcow2", "b.qcow2", "o.raw"]
    mine, ref = vdisk_cli(args, d), qemu_img(args, d)
    assert mine.rc == ref.rc == 1
    assert _err_line(ref.err, "qemu-img") in mine.err
