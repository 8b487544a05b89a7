"""Our NBD client against qemu-nbd (the reference server), through vdisk.open(URI)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import vdisk
from vdisk.nbd.client import list_exports, parse_uri

from .conftest import need, run, wait_for_socket

MiB = 1 << 20


def test_parse_uri() -> None:
    assert parse_uri("nbd://example.com:1234/disk") == (("example.com", 1234), "disk")
    assert parse_uri("nbd://h") == (("h", 10809), "")
    assert parse_uri("nbd+unix:///x?socket=/tmp/s") == ("/tmp/s", "x")


def test_client_against_qemu_nbd(tmp_path: Path, sock_path: str) -> None:
    need("qemu-nbd")
    need("qemu-io")
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 1M", "-c", "write -z 4M 1M", str(img))
    proc = subprocess.Popen(["qemu-nbd", "-t", "-e", "0", "-x", "exp", "-D", "desc", "-k",
                             sock_path, str(img)])
    try:
        wait_for_socket(sock_path)
        assert list_exports(sock_path) == [("exp", "desc")]
        uri = f"nbd+unix:///exp?socket={sock_path}"
        with vdisk.open(uri) as dev:
            assert dev.size == 16 * MiB
            data = os.urandom(70000)
            dev.write(data, 8 * MiB + 3)
            buf = bytearray(3 * MiB)
            dev.readinto(buf, 0)
            assert buf[MiB : 2 * MiB] == b"\x61" * MiB and buf[:MiB] == bytes(MiB)
            got = bytearray(len(data))
            dev.readinto(got, 8 * MiB + 3)
            assert got == data
            dev.write_zeroes(MiB, 4096)
            dev.flush()
            ours = [(e.offset, e.length, e.data, e.zero) for e in dev.block_status(0, dev.size)]
        theirs = json.loads(run("nbdinfo", "--json", "--map", uri).stdout)
        assert ours == [(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2))
                        for e in theirs]
    finally:
        proc.terminate()
        proc.wait(10)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(out))
    raw = out.read_bytes()
    assert raw[8 * MiB + 3 : 8 * MiB + 3 + len(data)] == data
    assert raw[MiB : MiB + 4096] == bytes(4096)
