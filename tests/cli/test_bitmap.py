"""`vdisk bitmap` against `qemu-img bitmap`, `convert --bitmaps`, and `vdisk nbd -B` on a
writable export.

Each case runs the same arguments with vdisk on one copy of an image and with qemu-img on
another (same file name, in two directories): the exit status, the messages (prefix and
QEMU's node names aside) and the bitmaps `qemu-img info` lists afterwards must match, and
`qemu-img check` must be clean on ours.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

from oracles import assert_check_clean

MiB = 1 << 20


def _messages(run: Run, prog: str, image: str) -> list[str]:
    lines = [ln.removeprefix(f"{prog}: ") for ln in run.err.strip().splitlines()]
    return [re.sub(r"#block\d+", image, ln) for ln in lines if not ln.startswith("WARNING")]


def _bitmaps(path: Path) -> list[dict[str, object]]:
    run = qemu_img(["info", "--output=json", "-U", path.name], path.parent)
    assert run.rc == 0, run.err
    data = json.loads(run.out)["format-specific"].get("data", {})
    listed: list[dict[str, object]] = data.get("bitmaps", [])
    return listed


def _prepare(d: Path) -> None:
    d.mkdir()
    assert qemu_img(["create", "-q", "-f", "qcow2", "x.qcow2", "16M"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "qcow2", "other.qcow2", "16M"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "qcow2", "small.qcow2", "8M"], d).rc == 0
    assert (
        qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"], d).rc == 0
    )
    assert qemu_img(["create", "-q", "-f", "raw", "r.raw", "1M"], d).rc == 0
    for img in ("x.qcow2", "other.qcow2", "small.qcow2"):
        assert qemu_img(["bitmap", "--add", img, "b0"], d).rc == 0
    assert qemu_img(["bitmap", "--add", "-g", "4k", "--disable", "x.qcow2", "off"], d).rc == 0
    qemu_io(["-c", "write 1M 64k", "-c", "write 7M 3M", "x.qcow2"], d)
    qemu_io(["-c", "write 12M 4k", "other.qcow2"], d)


CASES = [
    ["--add", "x.qcow2", "new"],
    ["--add", "-g", "512k", "x.qcow2", "new"],
    ["--add", "-g", "0", "x.qcow2", "new"],
    ["--add", "--disable", "x.qcow2", "new"],
    ["--add", "--remove", "x.qcow2", "new"],
    ["--add", "x.qcow2", "b0"],
    ["--add", "-g", "1000", "x.qcow2", "new"],
    ["--add", "-g", "256", "x.qcow2", "new"],
    ["--add", "-g", "4G", "x.qcow2", "new"],
    ["--add", "-g", "abc", "x.qcow2", "new"],
    ["--add", "x.qcow2", "n" * 1024],
    ["--add", "v2.qcow2", "new"],
    ["--add", "-f", "raw", "r.raw", "new"],
    ["--remove", "x.qcow2", "b0"],
    ["--remove", "x.qcow2", "nope"],
    ["--clear", "x.qcow2", "b0"],
    ["--enable", "x.qcow2", "off"],
    ["--disable", "x.qcow2", "b0"],
    ["--enable", "--disable", "x.qcow2", "b0"],
    ["--merge", "b0", "x.qcow2", "off"],
    ["--merge", "nope", "x.qcow2", "off"],
    ["--add", "--merge", "off", "x.qcow2", "both"],
    ["--merge", "b0", "-b", "other.qcow2", "x.qcow2", "off"],
    ["--merge", "b0", "-b", "other.qcow2", "-F", "qcow2", "x.qcow2", "b0"],
    ["--merge", "b0", "-b", "small.qcow2", "x.qcow2", "off"],
    ["--merge", "b0", "-b", "missing.qcow2", "x.qcow2", "off"],
    ["x.qcow2", "b0"],
    ["--clear", "x.qcow2"],
    ["--clear", "x.qcow2", "b0", "extra"],
    ["-g", "64k", "--enable", "x.qcow2", "b0"],
    ["-b", "other.qcow2", "--add", "x.qcow2", "new"],
    ["--merge", "b0", "-F", "qcow2", "x.qcow2", "off"],
    ["--add", "missing.qcow2", "new"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a)[:40] for a in CASES])
def test_bitmap_matches_qemu_img(tmp_path: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    mine_dir, theirs_dir = tmp_path / "v", tmp_path / "q"
    _prepare(mine_dir)
    shutil.copytree(mine_dir, theirs_dir)
    ours = vdisk_cli(["bitmap", *args], mine_dir)
    theirs = qemu_img(["bitmap", *args], theirs_dir)
    assert ours.rc == theirs.rc, (ours, theirs)
    target = args[-2] if len(args) >= 2 else "x.qcow2"
    assert _messages(ours, "vdisk", target) == _messages(theirs, "qemu-img", target)
    for name in ("x.qcow2", "other.qcow2"):
        assert _bitmaps(mine_dir / name) == _bitmaps(theirs_dir / name), name
        assert_check_clean(mine_dir / name)


def _dirty_map(path: Path, name: str) -> list[tuple[int, int, int]]:
    """qemu-nbd's qemu:dirty-bitmap:NAME of ``path`` read with nbdinfo."""
    sock = str(path) + ".sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", name, "-k", sock, str(path)],
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(sock)
        out = subprocess.run(
            ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def _wait(sock: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


needs_nbd_tools = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("nbdinfo") is None,
    reason="qemu-nbd/nbdinfo are not installed",
)


@needs_nbd_tools
def test_convert_bitmaps_copies_them(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _prepare(tmp_path / "d")
    d = tmp_path / "d"
    ours = vdisk_cli(["convert", "--bitmaps", "-O", "qcow2", "x.qcow2", "mine.qcow2"], d)
    assert ours.rc == 0, ours
    theirs = qemu_img(["convert", "--bitmaps", "-O", "qcow2", "x.qcow2", "theirs.qcow2"], d)
    assert theirs.rc == 0, theirs
    assert _bitmaps(d / "mine.qcow2") == _bitmaps(d / "theirs.qcow2")
    assert_check_clean(d / "mine.qcow2")
    assert qemu_img(["compare", "mine.qcow2", "theirs.qcow2"], d).rc == 0
    for name in ("b0", "off"):
        assert _dirty_map(d / "mine.qcow2", name) == _dirty_map(d / "theirs.qcow2", name)


CONVERT_ERRORS = [
    ["convert", "--bitmaps", "-O", "raw", "x.qcow2", "o.raw"],
    ["convert", "--bitmaps", "-f", "raw", "-O", "qcow2", "r.raw", "o.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "x.qcow2", "other.qcow2", "o.qcow2"],
    ["convert", "--skip-broken-bitmaps", "-O", "qcow2", "x.qcow2", "o.qcow2"],
]


@pytest.mark.parametrize("args", CONVERT_ERRORS, ids=[" ".join(a[1:4]) for a in CONVERT_ERRORS])
def test_convert_bitmaps_refusals(tmp_path: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    _prepare(tmp_path / "d")
    d = tmp_path / "d"
    ours = vdisk_cli(args, d)
    theirs = qemu_img(args, d)
    assert (ours.rc, _messages(ours, "vdisk", "")) == (theirs.rc, _messages(theirs, "qemu-img", ""))


def _crash_write(path: Path) -> None:
    code = (
        "import os, sys\n"
        "from vdisk.qcow2 import Qcow2Image\n"
        "img = Qcow2Image.open(sys.argv[1])\n"
        "img.write(b'x' * 512, 0)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def test_convert_inconsistent_bitmap(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    _prepare(tmp_path / "d")
    d = tmp_path / "d"
    _crash_write(d / "x.qcow2")  # b0 is left in-use
    for extra in ([], ["--skip-broken-bitmaps"]):
        args = ["convert", "--bitmaps", *extra, "-O", "qcow2", "x.qcow2"]
        ours = vdisk_cli([*args, "mine.qcow2"], d)
        theirs = qemu_img([*args, "theirs.qcow2"], d)
        assert ours.rc == theirs.rc
        assert _messages(ours, "vdisk", "") == _messages(theirs, "qemu-img", "")
    assert _bitmaps(d / "mine.qcow2") == _bitmaps(d / "theirs.qcow2")


@needs_nbd_tools
def test_nbd_writable_export_keeps_bitmap_in_sync(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    assert qemu_img(["create", "-q", "-f", "qcow2", img.name, "16M"], tmp_path).rc == 0
    assert qemu_img(["bitmap", "--add", img.name, "b0"], tmp_path).rc == 0
    sock = str(tmp_path / "v.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "vdisk", "nbd", "-t", "-f", "qcow2", "-B", "b0", "-k", sock, str(img)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    uri = f"nbd+unix:///?socket={sock}"
    try:
        _wait(sock)
        qemu_io(["-f", "raw", "-c", "write 3M 4k", "-c", "write -z 8M 128k", uri], tmp_path)
        out = subprocess.run(
            ["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", uri],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        live = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    finally:
        server.terminate()
        server.wait(20)
    want = [
        (0, 3 * MiB, 0),
        (3 * MiB, 65536, 1),
        (3 * MiB + 65536, 5 * MiB - 65536, 0),
        (8 * MiB, 131072, 1),
        (8 * MiB + 131072, 8 * MiB - 131072, 0),
    ]
    assert live == want
    assert_check_clean(img)
    assert _dirty_map(img, "b0") == want  # stored at exit, as the export showed it
