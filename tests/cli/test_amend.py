"""`vdisk amend` beside `qemu-img amend`: the same image copied twice, the same options on each;
the exit statuses, the messages, `qemu-img info` / `map` and the contents agree, and `qemu-img
check` finds vdisk's result clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io


def _ok(run: Run) -> Run:
    assert run.rc == 0, run
    return run


def _image(d: Path, create_opts: list[str], backing: bool = False) -> None:
    if backing:
        _ok(qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d))
        qemu_io(["-c", "write -P 1 0 4M", "base.qcow2"], d)
        create_opts = [*create_opts, "-b", "base.qcow2", "-F", "qcow2"]
    _ok(qemu_img(["create", "-q", "-f", "qcow2", *create_opts, "img.qcow2", "4M"], d))
    qemu_io(
        ["-c", "write -P 5 0 1M", "-c", "write -z 1M 64k", "-c", "write -P 6 2M 64k",
         "-c", "write -z 2M 64k", "-c", "write -z 3M 128k", "img.qcow2"],
        d,
    )  # fmt: skip
    shutil.copy(d / "img.qcow2", d / "ours.qcow2")
    shutil.copy(d / "img.qcow2", d / "theirs.qcow2")


def _info(d: Path, name: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(_ok(qemu_img(["info", "--output=json", name], d)).out)
    for key in ("filename", "actual-size", "dirty-flag"):
        info.pop(key, None)
    return info


def _side_by_side(d: Path, vdisk_cli: VdiskRunner, opts: str) -> tuple[Run, Run]:
    ours = vdisk_cli(["amend", "-o", opts, "ours.qcow2"], d)
    theirs = qemu_img(["amend", "-o", opts, "theirs.qcow2"], d)
    assert ours.rc == theirs.rc, (opts, ours, theirs)
    assert ours.out == ""
    if theirs.rc:
        first = theirs.err.splitlines()[0].removeprefix("qemu-img: ")
        assert first in ours.err and ours.err.count("\n") == 1, (opts, ours.err, theirs.err)
    assert _info(d, "ours.qcow2") == _info(d, "theirs.qcow2"), opts
    check = _ok(qemu_img(["check", "ours.qcow2"], d))
    assert check.out.startswith("No errors were found on the image."), check
    _ok(qemu_img(["compare", "ours.qcow2", "theirs.qcow2"], d))
    return ours, theirs


CASES = [
    ([], "compat=0.10"),
    (["-o", "compat=0.10"], "compat=1.1"),
    (["-o", "compat=0.10"], "compat=v3,lazy_refcounts=on"),
    (["-o", "lazy_refcounts=on"], "compat=0.10"),
    (["-o", "extended_l2=on"], "compat=0.10"),
    (["-o", "refcount_bits=8"], "compat=0.10"),
    (["-o", "refcount_bits=8"], "compat=0.10,refcount_bits=16"),
    ([], "refcount_bits=1"),
    ([], "refcount_bits=8"),
    ([], "refcount_bits=64"),
    ([], "refcount_bits=3"),
    (["-o", "compat=0.10"], "refcount_bits=8"),
    (["-o", "compat=0.10"], "lazy_refcounts=on"),
    ([], "lazy_refcounts=on"),
    (["-o", "lazy_refcounts=on"], "lazy_refcounts=off"),
    ([], "compat=0.10,lazy_refcounts=on"),
    ([], "compat=2.0"),
    ([], "cluster_size=4k"),
    ([], "foo=bar"),
    ([], "size=8M"),
]


@pytest.mark.parametrize(("create_opts", "opts"), CASES)
def test_amend_like_qemu(
    tmp_path: Path, vdisk_cli: VdiskRunner, create_opts: list[str], opts: str
) -> None:
    _image(tmp_path, create_opts)
    _side_by_side(tmp_path, vdisk_cli, opts)
    if opts.startswith("compat=0.10") and "extended" not in str(create_opts):
        # Zero clusters become holes (no backing file): the same allocation as QEMU's.
        maps = [
            _ok(qemu_img(["map", "--output=json", name], tmp_path)).out
            for name in ("ours.qcow2", "theirs.qcow2")
        ]
        assert maps[0] == maps[1]


@pytest.mark.parametrize("opts", ["compat=0.10", "refcount_bits=2"])
def test_amend_over_backing(tmp_path: Path, vdisk_cli: VdiskRunner, opts: str) -> None:
    """Over a backing file a downgrade writes zero clusters as data (as QEMU does)."""
    _image(tmp_path, [], backing=True)
    _side_by_side(tmp_path, vdisk_cli, opts)


@pytest.mark.parametrize(
    "opts",
    [
        "backing_file=base.qcow2,backing_fmt=qcow2",  # the current values: accepted
        "backing_file=other.qcow2,backing_fmt=qcow2",  # QEMU 7.2 points to rebase
        "backing_file=base.qcow2",
        "backing_fmt=raw",
        "backing_file=,backing_fmt=",
    ],
)
def test_amend_backing_file(tmp_path: Path, vdisk_cli: VdiskRunner, opts: str) -> None:
    _image(tmp_path, [], backing=True)
    shutil.copy(tmp_path / "base.qcow2", tmp_path / "other.qcow2")
    _side_by_side(tmp_path, vdisk_cli, opts)


DATA_FILE_CASES = [
    ([], "data_file=new.raw"),  # refused: no data file to rename
    ([], "data_file_raw=on"),
    ([], "data_file_raw=off"),  # nothing to switch off: accepted
    (["-o", "data_file=d.raw"], "data_file=new.raw"),
    (["-o", "data_file=d.raw"], "data_file_raw=on"),  # QEMU never switches it on
    (["-o", "data_file=d.raw"], "data_file_raw=off"),
    (["-o", "data_file=d.raw,data_file_raw=on"], "data_file_raw=on"),  # already on
    (["-o", "data_file=d.raw,data_file_raw=on"], "data_file_raw=off"),
    (["-o", "data_file=d.raw,data_file_raw=on"], "data_file=new.raw,data_file_raw=off"),
    (["-o", "data_file=d.raw"], "data_file=new.raw,lazy_refcounts=on,refcount_bits=8"),
    # (data_file=NEW,compat=0.10: QEMU writes the new name, then refuses the downgrade;
    # vdisk refuses before any change, so its image differs there on purpose.)
]


@pytest.mark.parametrize(("create_opts", "opts"), DATA_FILE_CASES)
def test_amend_data_file(
    tmp_path: Path, vdisk_cli: VdiskRunner, create_opts: list[str], opts: str
) -> None:
    _image(tmp_path, create_opts)
    if (tmp_path / "d.raw").exists():
        shutil.copy(tmp_path / "d.raw", tmp_path / "new.raw")
    _side_by_side(tmp_path, vdisk_cli, opts)


def test_amend_data_file_name_dropped_or_missing(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """An empty name drops the extension (QEMU keeps the bit); a missing data file stops the
    amend with QEMU's message, the image unchanged."""
    _image(tmp_path, ["-o", "data_file=d.raw"])
    for name in ("ours.qcow2", "theirs.qcow2"):
        run = qemu_img(["amend", "-o", "data_file=gone.raw", name], tmp_path)
        assert run.rc == 0, run
    before = (tmp_path / "ours.qcow2").read_bytes()
    ours = vdisk_cli(["amend", "-o", "data_file=d.raw", "ours.qcow2"], tmp_path)
    theirs = qemu_img(["amend", "-o", "data_file=d.raw", "theirs.qcow2"], tmp_path)
    assert ours.rc == theirs.rc == 1
    assert ours.err == theirs.err.replace("qemu-img", "vdisk").replace("theirs", "ours")
    assert (tmp_path / "ours.qcow2").read_bytes() == before
    _image(tmp_path, ["-o", "data_file=d.raw"])
    ours = vdisk_cli(["amend", "-o", "data_file=", "ours.qcow2"], tmp_path)
    theirs = qemu_img(["amend", "-o", "data_file=", "theirs.qcow2"], tmp_path)
    assert ours.rc == theirs.rc == 0, (ours, theirs)
    assert _info(tmp_path, "ours.qcow2") == _info(tmp_path, "theirs.qcow2")
    assert "data-file" not in str(_info(tmp_path, "ours.qcow2")).replace("data-file-raw", "")


def test_amend_refcount_width_with_snapshot(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """A shared cluster (refcount 2) does not fit one bit: refused before any change."""
    _image(tmp_path, [])
    _ok(qemu_img(["snapshot", "-c", "s1", "img.qcow2"], tmp_path))
    for name in ("ours.qcow2", "theirs.qcow2"):
        shutil.copy(tmp_path / "img.qcow2", tmp_path / name)
    before = (tmp_path / "ours.qcow2").read_bytes()
    _side_by_side(tmp_path, vdisk_cli, "refcount_bits=1")
    assert (tmp_path / "ours.qcow2").read_bytes() == before
    _side_by_side(tmp_path, vdisk_cli, "refcount_bits=4")


def test_amend_help_and_refusals(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _image(tmp_path, [])
    ours = vdisk_cli(["amend", "-o", "help", "ours.qcow2"], tmp_path)
    assert ours.rc == 0 and ours.out == qemu_img(["amend", "-o", "help", "img.qcow2"], tmp_path).out
    _ok(qemu_img(["create", "-q", "-f", "raw", "r.raw", "1M"], tmp_path))
    for args in (["-f", "raw", "-o", "size=2M", "r.raw"], ["img.qcow2"], ["-o", "x=1", "no.qcow2"]):
        ours = vdisk_cli(["amend", *args], tmp_path)
        assert ours.rc == 1 and ours.err.startswith("vdisk: ") and not ours.out, (args, ours)
        assert qemu_img(["amend", *args], tmp_path).rc == 1
    # Options of features built elsewhere: refused, the image unchanged.
    before = (tmp_path / "ours.qcow2").read_bytes()
    ours = vdisk_cli(["amend", "-o", "data_file=x.raw", "ours.qcow2"], tmp_path)
    assert ours.rc == 1 and "can only be set for images that use an external data" in ours.err
    ours = vdisk_cli(["amend", "-o", "encrypt.state=inactive", "ours.qcow2"], tmp_path)
    assert ours.rc == 1
    assert ours.err == "vdisk: Can't amend encryption options - encryption not present\n"
    assert (tmp_path / "ours.qcow2").read_bytes() == before


def test_amend_progress(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _image(tmp_path, [])
    run = vdisk_cli(["amend", "-p", "-o", "refcount_bits=8", "ours.qcow2"], tmp_path)
    assert run.rc == 0
    assert run.out.startswith("    (0.00/100%)\r") and run.out.endswith("    (100.00/100%)\r\n")
