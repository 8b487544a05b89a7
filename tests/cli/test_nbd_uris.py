"""Every command that takes a FILE takes an ``nbd://`` / ``nbd+unix://`` URI as qemu-img does:
info, map, measure, check, compare, convert (source and target) and dd, against a real
qemu-nbd export and a ``vdisk nbd`` export, output and exit status compared with qemu-img's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img, qemu_io


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(proc: subprocess.Popen[bytes], ready: object) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the NBD server exited"
        if callable(ready) and ready():
            return
        time.sleep(0.05)
    raise AssertionError("the NBD server did not start")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture(params=["qemu-nbd", "vdisk-nbd"])
def exports(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A qcow2 image served twice (unix socket, TCP with an export name), read-write, and a
    private copy of it to compare with; yields (dir, [unix URI, TCP URI])."""
    if request.param == "qemu-nbd" and shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed")
    assert qemu_img(["create", "-q", "-f", "qcow2", "src.qcow2", "64M"], tmp_path).rc == 0
    qemu_io(["-c", "write -P 5 1M 2M", "-c", "write -z 8M 1M", "src.qcow2"], tmp_path)
    for name in ("a.qcow2", "b.qcow2", "copy.qcow2"):
        shutil.copy(tmp_path / "src.qcow2", tmp_path / name)
    sock, port = tmp_path / "a.sock", _free_port()
    if request.param == "qemu-nbd":
        cmds = [
            ["qemu-nbd", "-t", "-f", "qcow2", "-k", str(sock), "a.qcow2"],
            ["qemu-nbd", "-t", "-f", "qcow2", "-b", "127.0.0.1", "-p", str(port), "-x", "exp",
             "b.qcow2"],
        ]  # fmt: skip
    else:
        vdisk = [sys.executable, "-m", "vdisk", "nbd", "-t", "-e", "0", "-f", "qcow2"]
        cmds = [
            [*vdisk, "-k", str(sock), "a.qcow2"],
            [*vdisk, "-b", "127.0.0.1", "-p", str(port), "-x", "exp", "b.qcow2"],
        ]
    procs = [subprocess.Popen(c, cwd=tmp_path, stderr=subprocess.DEVNULL) for c in cmds]
    try:
        _wait_for(procs[0], sock.exists)
        _wait_for(procs[1], lambda: _port_open(port))
        yield tmp_path, [f"nbd+unix:///?socket={sock}", f"nbd://127.0.0.1:{port}/exp"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def _same(vdisk_cli: VdiskRunner, args: list[str], cwd: Path) -> None:
    theirs = qemu_img(args, cwd)
    ours = vdisk_cli(args, cwd)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (args, ours, theirs)
    assert ours.err == theirs.err.replace("qemu-img:", "vdisk:"), (args, ours.err, theirs.err)


READ_COMMANDS = [
    ["info"],
    ["info", "--output=json"],
    ["map"],
    ["map", "--output=json"],
    ["measure", "-O", "qcow2"],
    ["measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=4k"],
    ["check"],  # a raw export: "This image format does not support checks", 63
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_commands_take_uris(
    exports: tuple[Path, list[str]], vdisk_cli: VdiskRunner, command: list[str]
) -> None:
    d, uris = exports
    for uri in uris:
        _same(vdisk_cli, [*command, uri], d)


def test_compare_takes_uris(exports: tuple[Path, list[str]], vdisk_cli: VdiskRunner) -> None:
    d, (unix, tcp) = exports
    for args in (
        ["compare", unix, tcp],
        ["compare", "-s", unix, tcp],
        ["compare", "-F", "qcow2", unix, "copy.qcow2"],
        ["compare", unix, "src.qcow2"],  # raw (the qcow2 file's bytes) against its content
    ):
        _same(vdisk_cli, args, d)


def test_convert_and_dd_from_and_to_uris(
    exports: tuple[Path, list[str]], vdisk_cli: VdiskRunner
) -> None:
    d, (unix, tcp) = exports
    assert qemu_img(["create", "-q", "-f", "qcow2", "new.qcow2", "64M"], d).rc == 0
    qemu_io(["-c", "write -P 9 5M 3M", "new.qcow2"], d)
    ours = vdisk_cli(["convert", "-O", "qcow2", unix, "out.qcow2"], d)
    assert ours.rc == 0, ours
    assert qemu_img(["compare", "out.qcow2", "copy.qcow2"], d).rc == 0
    for flags in (["-n"], []):  # an export is written in place; without -n, size checked
        ours = vdisk_cli(["convert", *flags, "-O", "raw", "new.qcow2", tcp], d)
        assert ours.rc == 0, ours
        assert qemu_img(["compare", "-F", "qcow2", tcp, "new.qcow2"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "qcow2", "big.qcow2", "65M"], d).rc == 0
    _same(vdisk_cli, ["convert", "-O", "raw", "big.qcow2", unix], d)
    for tool in ("qemu", "vdisk"):
        args = ["dd", f"if={unix}", f"of={tool}.raw", "bs=1M", "count=5"]
        run = qemu_img(args, d) if tool == "qemu" else vdisk_cli(args, d)
        assert run.rc == 0, run
    assert (d / "qemu.raw").read_bytes() == (d / "vdisk.raw").read_bytes()


def test_header_commands_take_uris(exports: tuple[Path, list[str]], vdisk_cli: VdiskRunner) -> None:
    """resize, commit, rebase, create and amend on an export: qemu-img's outcomes (an export
    keeps its size and has no backing file; a raw create on it only opens it)."""
    d, (unix, tcp) = exports
    for args in (
        ["resize", "-f", "raw", tcp, "64M"],
        ["resize", "-f", "raw", tcp, "128M"],
        ["commit", "-f", "raw", unix],
        ["create", "-f", "raw", unix, "1M"],
        ["amend", "-f", "raw", "-o", "size=1M", unix],
    ):
        theirs, ours = qemu_img(args, d), vdisk_cli(args, d)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (args, ours, theirs)
        assert ours.err == theirs.err.replace("qemu-img:", "vdisk:"), (args, ours, theirs)
    for args in (["rebase", "-u", "-b", "", unix], ["create", "-f", "qcow2", unix, "1M"]):
        ours = vdisk_cli(args, d)
        assert ours.rc == 1 and ours.err.count("\n") == 1, (args, ours)
    assert qemu_img(["compare", "-F", "qcow2", unix, "copy.qcow2"], d).rc == 0  # untouched
