"""`vdisk commit` and `vdisk rebase` against qemu-img 7.2: each tool works on its own copy of the
same chain; the results show the same content (qemu-img compare), are clean (qemu-img check)
and name the same backing file (qemu-img info); messages and exit statuses match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io

CHAIN = ("base.qcow2", "mid.qcow2", "top.qcow2")


def _make_chain(d: Path, extl2: bool = False) -> None:
    opts = ["-o", "extended_l2=on"] if extl2 else []
    d.mkdir()
    assert qemu_img(["create", "-q", "-f", "qcow2", *opts, "base.qcow2", "16M"], d).rc == 0
    qemu_io(["-c", "write -P 1 0 4M", "-c", "write -P 7 12M 64k", "base.qcow2"], d)
    assert qemu_img(["create", "-q", "-f", "qcow2", *opts, "-b", "base.qcow2", "-F", "qcow2",
                     "mid.qcow2"], d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 2 1M 1M", "-c", "write -z 2M 64k", "-c", "write -P 9 6M 4k",
             "mid.qcow2"], d)  # fmt: skip
    assert qemu_img(["create", "-q", "-f", "qcow2", *opts, "-b", "mid.qcow2", "-F", "qcow2",
                     "top.qcow2"], d).rc == 0  # fmt: skip
    qemu_io(["-c", "write -P 3 3M 64k", "-c", "write -P 4 1536k 4k", "top.qcow2"], d)


@pytest.fixture(params=[False, True], ids=["plain", "extended-l2"])
def chains(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(qemu's copy, vdisk's copy, a pristine copy) of a three-image chain."""
    _make_chain(tmp_path / "orig", request.param)
    copies = []
    for name in ("qemu", "vdisk"):
        shutil.copytree(tmp_path / "orig", tmp_path / name)
        copies.append(tmp_path / name)
    return copies[0], copies[1], tmp_path / "orig"


def _backing(d: Path, name: str) -> tuple[object, object]:
    info = json.loads(qemu_img(["info", "--output=json", name], d).out)
    return info.get("backing-filename"), info.get("backing-filename-format")


def _clean(d: Path, name: str) -> None:
    check = qemu_img(["check", name], d)
    assert check.rc == 0, check


def _same_run(vdisk_cli: VdiskRunner, args: list[str], q: Path, v: Path) -> None:
    theirs, ours = qemu_img(args, q), vdisk_cli(args, v)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out.replace("\r\n", "\n")), (ours, theirs)
    assert ours.err == theirs.err.replace("qemu-img:", "vdisk:"), (ours.err, theirs.err)


@pytest.mark.parametrize(
    "args",
    [
        ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        ["rebase", "-b", "", "top.qcow2"],
        ["rebase", "-b", "", "mid.qcow2"],
        ["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ],
    ids=["to-base", "flatten-top", "flatten-mid", "unsafe", "to-a-new-image"],
)
def test_rebase_like_qemu_img(
    chains: tuple[Path, Path, Path], vdisk_cli: VdiskRunner, args: list[str]
) -> None:
    q, v, orig = chains
    for d in (q, v):  # a new backing with content of its own
        assert qemu_img(["create", "-q", "-f", "qcow2", "other.qcow2", "16M"], d).rc == 0
        qemu_io(["-c", "write -P 8 0 8M", "other.qcow2"], d)
    name = args[-1]
    _same_run(vdisk_cli, args, q, v)
    assert _backing(v, name) == _backing(q, name)
    _clean(v, name)
    if "-u" not in args:  # the visible content is kept
        assert qemu_img(["compare", str(orig / name), str(v / name)], v).rc == 0
        assert qemu_img(["compare", str(q / name), str(v / name)], v).rc == 0


@pytest.mark.parametrize(
    "args",
    [
        ["commit", "top.qcow2"],
        ["commit", "-d", "top.qcow2"],
        ["commit", "-q", "mid.qcow2"],
        ["commit", "-b", "base.qcow2", "top.qcow2"],
        ["commit", "-p", "top.qcow2"],
        ["commit", "-t", "unsafe", "top.qcow2"],
        ["commit", "-t", "writethrough", "-r", "64M", "top.qcow2"],
    ],
    ids=["into-backing", "drop", "quiet-mid", "into-base", "progress", "unsafe", "rate"],
)
def test_commit_like_qemu_img(
    chains: tuple[Path, Path, Path], vdisk_cli: VdiskRunner, args: list[str]
) -> None:
    q, v, orig = chains
    theirs, ours = qemu_img(args, q), vdisk_cli(args, v)
    assert (ours.rc, ours.err) == (theirs.rc, theirs.err), (ours, theirs)
    assert ours.out.replace("\r", "\n").splitlines()[-1:] == theirs.out.splitlines()[-1:]
    top = args[-1]
    for name in CHAIN:
        _clean(v, name)
        assert _backing(v, name) == _backing(q, name)
    # The top's view is unchanged, and so is every image qemu-img leaves valid.
    assert qemu_img(["compare", str(orig / top), str(v / top)], v).rc == 0
    for name in CHAIN:
        assert qemu_img(["compare", str(q / name), str(v / name)], v).rc == 0, name
    ours_map = qemu_img(["map", "--output=json", top], v).out.replace("/vdisk/", "/qemu/")
    if "-d" not in args and "-b" not in args:  # emptied: nothing of its own left
        assert '"depth": 0' not in ours_map
        assert '"depth": 0' not in qemu_img(["map", "--output=json", top], q).out


@pytest.mark.parametrize(
    "args",
    [
        ["rebase", "top.qcow2"],
        ["rebase", "-b", "base.qcow2", "top.qcow2"],
        ["rebase", "-u", "-b", "x.qcow2", "top.qcow2"],
        ["commit", "base.qcow2"],
        ["commit", "-b", "nothere.qcow2", "top.qcow2"],
        ["commit", "-t", "bogus", "top.qcow2"],
    ],
)
def test_errors_like_qemu_img(
    chains: tuple[Path, Path, Path], vdisk_cli: VdiskRunner, args: list[str]
) -> None:
    q, v, orig = chains
    theirs, ours = qemu_img(args, q), vdisk_cli(args, v)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (ours, theirs)
    assert ours.err == theirs.err.replace("qemu-img", "vdisk"), (ours.err, theirs.err)
    for name in CHAIN:  # nothing changed
        assert (v / name).read_bytes() == (orig / name).read_bytes()


def test_backing_name_that_does_not_fit_is_refused(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """As QEMU: the header, its extensions and the name must fit in the first cluster."""
    for name in ("q.qcow2", "v.qcow2"):
        assert qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", name, "1M"],
                        tmp_path).rc == 0  # fmt: skip
    before = (tmp_path / "v.qcow2").read_bytes()
    args = ["rebase", "-u", "-b", "b" * 400 + ".qcow2", "-F", "qcow2"]
    theirs, ours = qemu_img([*args, "q.qcow2"], tmp_path), vdisk_cli([*args, "v.qcow2"], tmp_path)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out) == (1, "")
    assert ours.err == theirs.err.replace("qemu-img:", "vdisk:")
    assert (tmp_path / "v.qcow2").read_bytes() == before


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_grows_a_smaller_base(tmp_path: Path, vdisk_cli: VdiskRunner, base_fmt: str) -> None:
    for tool in ("q", "v"):
        d = tmp_path / tool
        d.mkdir()
        assert qemu_img(["create", "-q", "-f", base_fmt, "base", "16M"], d).rc == 0
        qemu_io(["-f", base_fmt, "-c", "write -P 1 0 1M", "base"], d)
        assert qemu_img(["create", "-q", "-f", "qcow2", "-b", "base", "-F", base_fmt,
                         "top.qcow2", "32M"], d).rc == 0  # fmt: skip
        qemu_io(["-c", "write -P 2 20M 1M", "top.qcow2"], d)
    q, v = tmp_path / "q", tmp_path / "v"
    theirs, ours = qemu_img(["commit", "top.qcow2"], q), vdisk_cli(["commit", "top.qcow2"], v)
    assert (ours.rc, ours.out, ours.err) == (theirs.rc, theirs.out, theirs.err)
    same = qemu_img(["compare", "-f", base_fmt, "-F", base_fmt, str(q / "base"), str(v / "base")],
                    tmp_path)  # fmt: skip
    assert same.rc == 0, same
    assert (v / "base").stat().st_size == (q / "base").stat().st_size or base_fmt == "qcow2"
    if base_fmt == "qcow2":
        _clean(v, "base")
