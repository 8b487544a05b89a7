"""qcow2 images over NBD: writes keep the image consistent; bitmaps and allocation depth match
qemu-nbd's export of the same image."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import vdisk
from vdisk.nbd import Export, NbdServer
from vdisk.nbd import protocol as p

from .conftest import need, run, unix_uri, wait_for_socket

MiB = 1 << 20


def qemu_img(*args: str) -> str:
    need("qemu-img")
    return run("qemu-img", *args).stdout


def nbd_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    need("nbdinfo")
    out = json.loads(run("nbdinfo", "--json", f"--map={context}", uri).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def test_bitmaps_and_depth_match_qemu_nbd(tmp_path: Path, cli_server: Callable[..., object],
                                          sock_path: str) -> None:
    need("qemu-nbd")
    need("qemu-io")
    base = tmp_path / "base.qcow2"
    img = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 30M 2M", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img))
    qemu_img("bitmap", "--add", str(img), "b0")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -P 2 10M 3M", str(img))
    qemu_img("bitmap", "--add", "-g", "512k", str(img), "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 20M 4k", "-c", "write -z 40M 1M", str(img))
    qemu_img("bitmap", "--add", "--merge", "b1", str(img), "merged")
    qemu_img("bitmap", "--merge", "b0", str(img), "merged")
    cli_server("-r", "-t", "-e", "0", "-A", "-B", "b0", "-B", "b1", "-B", "merged", str(img))
    qsock = sock_path + "q"
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "0", "-A", "-B", "b0", "-B", "b1",
                             "-B", "merged", "-k", qsock, str(img)])
    try:
        wait_for_socket(qsock)
        for ctx in ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:merged",
                    "qemu:allocation-depth", "base:allocation"):
            ours = nbd_map(unix_uri(sock_path), ctx)
            theirs = nbd_map(unix_uri(qsock), ctx)
            assert ours == theirs, ctx
        dirty = nbd_map(unix_uri(sock_path), "qemu:dirty-bitmap:b0")
        assert (MiB, 65536, 1) in dirty
    finally:
        qemu.terminate()
        qemu.wait(10)


def test_qcow2_writes_stay_consistent(tmp_path: Path, serve_inproc: Callable[..., NbdServer],
                                      sock_path: str) -> None:
    need("qemu-io")
    img = tmp_path / "d.qcow2"
    vdisk.create(str(img), 64 * MiB, format="qcow2")
    dev = vdisk.open(str(img))
    server = serve_inproc(Export(dev, discard="unmap"))
    uri = unix_uri(sock_path)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 3M", "-c", "write -P 0xb2 33M 70k",
        "-c", "write -z 1M 1M", "-c", "discard 33M 64k", "-c", "flush", uri)
    run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(tmp_path / "via-nbd.raw"))
    server.close()
    dev.close()
    run("qemu-img", "check", str(img))
    run("qemu-img", "convert", "-f", "qcow2", str(img), "-O", "raw", str(tmp_path / "direct.raw"))
    direct = (tmp_path / "direct.raw").read_bytes()
    assert direct == (tmp_path / "via-nbd.raw").read_bytes()
    assert direct[:MiB] == b"\xa1" * MiB and direct[MiB : 2 * MiB] == bytes(MiB)
    assert direct[33 * MiB : 33 * MiB + 65536] == bytes(65536)
    assert direct[33 * MiB + 65536 : 33 * MiB + 70 * 1024] == b"\xb2" * (6 * 1024)


def test_disconnect_mid_write_keeps_image_clean(tmp_path: Path,
                                                serve_inproc: Callable[..., NbdServer],
                                                sock_path: str) -> None:
    img = tmp_path / "d.qcow2"
    vdisk.create(str(img), 64 * MiB, format="qcow2")
    dev = vdisk.open(str(img))
    server = serve_inproc(Export(dev))
    from vdisk.nbd.client import NbdClient

    with NbdClient(sock_path) as c:
        c.write(b"\x5c" * MiB, 0)
        c.flush()
    # A raw client that sends a write header and half its payload, then vanishes.
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.recv(18)
    s.sendall(struct_u32(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_EXPORT_NAME, 0))
    s.recv(10)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 2 * MiB, MiB))
    s.sendall(os.urandom(MiB // 2))
    s.close()
    with NbdClient(sock_path) as c:  # the server still serves, data intact
        buf = bytearray(MiB)
        c.readinto(buf, 0)
        assert buf == b"\x5c" * MiB
    server.close()
    dev.close()
    run("qemu-img", "check", str(img))


def struct_u32(v: int) -> bytes:
    return p.U32.pack(v)


def test_enabled_bitmap_tracks_writes_through_nbd(serve_inproc: Callable[..., NbdServer],
                                                  sock_path: str) -> None:
    from vdisk.backends.memory import MemoryDevice
    from vdisk.block import DirtyBitmap as BitmapSource

    size, g = 8 * MiB, 65536
    bitmap = BitmapSource("live", size, g, bytearray(size // g // 8), enabled=True)
    serve_inproc(Export(MemoryDevice(size), bitmaps=[bitmap]))
    uri = unix_uri(sock_path)
    run("qemu-io", "-f", "raw", "-c", "write -P 1 100k 4k", "-c", "write -z 2M 128k", uri)
    assert nbd_map(uri, "qemu:dirty-bitmap:live") == [
        (0, g, 0), (g, g, 1), (2 * g, 2 * MiB - 2 * g, 0), (2 * MiB, 2 * g, 1),
        (2 * MiB + 2 * g, size - 2 * MiB - 2 * g, 0)]
