"""qcow2 overlays whose backing file is an NBD export (nbd+unix:// and nbd://), qemu-nbd serving.

Judged by qemu-img: it reads what vdisk made and wrote, and vdisk reads what it made."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vdisk
from vdisk.errors import UnsupportedFeatureError

from .conftest import VDISK, free_port, need, run, wait_for_socket

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A raw image with data at a few places, some not cluster-aligned."""
    need("qemu-io")
    path = tmp_path / "golden.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(path), str(SIZE))
    run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 10M 3M",
        "-c",
        "write -P 0x5e 20971000 70000",
        str(path),
    )
    return path


def _serve(args: list[str], golden: Path) -> Iterator[subprocess.Popen[str]]:
    need("qemu-nbd")
    # -r: the golden image stays as it is; -t: one export for many clients in turn.
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-e", "0", "-f", "raw", *args, str(golden)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


@pytest.fixture
def unix_export(golden: Path, sock_path: str) -> Iterator[str]:
    for proc in _serve(["-k", sock_path], golden):
        wait_for_socket(sock_path, proc=proc)
        yield f"nbd+unix:///?socket={sock_path}"


@pytest.fixture
def tcp_export(golden: Path) -> Iterator[str]:
    port = free_port()
    for proc in _serve(["-b", "127.0.0.1", "-p", str(port)], golden):
        wait_for_socket(port=port, proc=proc)
        yield f"nbd://127.0.0.1:{port}"


def _expected(golden: Path, tmp_path: Path, writes: list[tuple[int, bytes]]) -> Path:
    """The golden image with ``writes`` applied: what the overlay must read as."""
    path = tmp_path / "expected.raw"
    data = bytearray(golden.read_bytes())
    for offset, chunk in writes:
        data[offset : offset + len(chunk)] = chunk
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("export", ["unix_export", "tcp_export"])
def test_qemu_overlay_read_and_written_by_vdisk(
    export: str, request: pytest.FixtureRequest, golden: Path, tmp_path: Path
) -> None:
    uri: str = request.getfixturevalue(export)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", str(top))
    with vdisk.open(str(top), readonly=True) as dev:
        assert dev.size == SIZE
        buf = bytearray(SIZE)
        dev.readinto(buf, 0)
        assert bytes(buf) == golden.read_bytes()
    # Partial-cluster writes: the rest of each cluster is copied from the remote export.
    writes = [
        (10 * MiB + 512, b"\x11" * 512),
        (20971000 + 4096, b"\x22" * 100000),
        (30 * MiB, b"\x33" * 65536),
    ]
    with vdisk.open(str(top)) as dev:
        for offset, chunk in writes:
            dev.write(chunk, offset)
        dev.flush()
    run("qemu-img", "check", str(top))
    expected = _expected(golden, tmp_path, writes)
    run("qemu-img", "compare", str(top), str(expected))
    run(*VDISK, "compare", str(top), str(expected))
    out = tmp_path / "out.raw"
    run(*VDISK, "convert", "-O", "raw", str(top), str(out))
    assert out.read_bytes() == expected.read_bytes()
    assert run(*VDISK, "map", str(top)).stdout == run("qemu-img", "map", str(top)).stdout
    ours = json.loads(run(*VDISK, "info", "--output=json", str(top)).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    for key in (
        "virtual-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ):
        assert ours.get(key) == theirs.get(key), key
    chain = ("info", "--backing-chain", str(top))
    assert run(*VDISK, *chain).stdout == run("qemu-img", *chain).stdout


def test_vdisk_create_over_export_as_qemu_img(
    unix_export: str, golden: Path, tmp_path: Path
) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    made = run(*VDISK, "create", "-f", "qcow2", "-b", unix_export, "-F", "raw", str(ours))
    ref = run("qemu-img", "create", "-f", "qcow2", "-b", unix_export, "-F", "raw", str(theirs))
    assert made.stdout.replace("ours", "theirs") == ref.stdout
    assert f"size={SIZE} " in made.stdout
    run("qemu-img", "check", str(ours))
    run("qemu-img", "compare", str(ours), str(golden))
    with vdisk.open(str(ours)) as dev:
        dev.write(b"\x44" * 3000, 10 * MiB - 1000)
    run("qemu-img", "check", str(ours))
    run(
        "qemu-img",
        "compare",
        str(ours),
        str(_expected(golden, tmp_path, [(10 * MiB - 1000, b"\x44" * 3000)])),
    )


def test_two_overlays_over_one_export(unix_export: str, golden: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.qcow2", tmp_path / "two.qcow2"
    for top in (one, two):
        run(*VDISK, "create", "-q", "-f", "qcow2", "-b", unix_export, "-F", "raw", str(top))
    with vdisk.open(str(one)) as a, vdisk.open(str(two)) as b:
        a.write(b"\x01" * 4096, 0)
        b.write(b"\x02" * 4096, 11 * MiB)
        got_a, got_b = bytearray(SIZE), bytearray(SIZE)
        a.readinto(got_a, 0)
        b.readinto(got_b, 0)
    expected = golden.read_bytes()
    assert bytes(got_a) == b"\x01" * 4096 + expected[4096:]
    assert bytes(got_b) == expected[: 11 * MiB] + b"\x02" * 4096 + expected[11 * MiB + 4096 :]
    for top in (one, two):
        run("qemu-img", "check", str(top))


def test_refusals(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    for uri, fmt, words in (
        ("nbds://127.0.0.1:1/", "raw", "TLS"),
        ("nbd://127.0.0.1:1/", "qcow2", "only raw"),
    ):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", uri, "-F", fmt, str(top), "1M")
        with pytest.raises(UnsupportedFeatureError, match=words):
            vdisk.open(str(top), readonly=True)
        proc = run(*VDISK, "info", "--backing-chain", str(top), check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    os.unlink(top)


def test_ublk_nbd_backend_opens_the_export(unix_export: str, golden: Path) -> None:
    """`vdisk ublk add -t nbd URI` serves what this opens (the device itself needs a VM)."""
    from vdisk.cli.ublk import open_backend
    from vdisk.ublk.serve import describe

    with open_backend("nbd", unix_export, readonly=True) as dev:
        assert dev.size == SIZE and dev.readonly
        buf = bytearray(SIZE)
        dev.readinto(buf, 0)
        assert bytes(buf) == golden.read_bytes()
    assert describe("nbd", unix_export, None)["file"] == unix_export
    for bad, words in (("nbds://h/", "TLS"), ("/some/file", "needs an nbd://")):
        with pytest.raises(vdisk.VdiskError, match=words):
            open_backend("nbd", bad)
    proc = run(*VDISK, "ublk", "add", "-t", "nbd", "-f", "/x", "nbd://h/", check=False)
    assert proc.returncode != 0 and "not both" in proc.stderr, proc.stderr


def test_commit_into_exports(unix_export: str, golden: Path, tmp_path: Path) -> None:
    """A read-only export refuses the commit before any write (qemu-img's words); a writable
    one takes the overlay's data, as qemu-img commit puts it there."""
    top = tmp_path / "top.qcow2"
    run(*VDISK, "create", "-q", "-f", "qcow2", "-b", unix_export, "-F", "raw", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 64k 100k", str(top))
    before = golden.read_bytes()
    proc = run(*VDISK, "commit", str(top), check=False)
    assert proc.returncode == 1
    assert proc.stderr == "vdisk: Can't reopen read-only NBD mount as read/write\n"
    assert golden.read_bytes() == before
    writable = tmp_path / "writable.raw"
    writable.write_bytes(before)
    sock = unix_export.split("socket=")[1] + "w"
    proc_w = subprocess.Popen(
        ["qemu-nbd", "-t", "-e", "0", "-f", "raw", "-k", sock, str(writable)], text=True
    )
    try:
        wait_for_socket(sock, proc=proc_w)
        run(*VDISK, "rebase", "-u", "-b", f"nbd+unix:///?socket={sock}", "-F", "raw", str(top))
        run(*VDISK, "commit", str(top))
    finally:
        proc_w.terminate()
        proc_w.wait(timeout=20)
    expected = _expected(golden, tmp_path, [(64 << 10, b"\x77" * (100 << 10))])
    assert writable.read_bytes() == expected.read_bytes()
