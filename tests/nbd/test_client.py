"""Our NBD client against qemu-nbd (the reference server), through vdisk.open(URI)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vdisk
from vdisk.backends.memory import MemoryDevice
from vdisk.errors import VdiskError
from vdisk.nbd import Export, NbdServer
from vdisk.nbd import protocol as p
from vdisk.nbd.client import NbdClient, NbdError, list_exports, parse_uri

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


def _one_shot_server(path: str, greeting: bytes | None) -> threading.Thread:
    """A unix server that accepts once, optionally sends ``greeting``, then resets (SO_LINGER 0)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            if greeting is not None:
                conn.sendall(greeting)
                with contextlib.suppress(OSError):
                    conn.recv(4)  # the client's flags: the reset then hits its next read
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("greeting", [None, p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT, 3)],
                         ids=["before-greeting", "after-greeting"])
def test_reset_during_connect_is_a_vdisk_error(sock_path: str, greeting: bytes | None) -> None:
    thread = _one_shot_server(sock_path, greeting)
    with pytest.raises(VdiskError) as info:
        vdisk.open(f"nbd+unix:///?socket={sock_path}")
    thread.join(10)
    assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
    assert sock_path in str(info.value) and "\n" not in str(info.value)


def test_not_an_nbd_server_is_a_vdisk_error(sock_path: str) -> None:
    thread = _one_shot_server(sock_path, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(VdiskError) as info:
        vdisk.open(f"nbd+unix:///?socket={sock_path}")
    thread.join(10)
    assert info.value.errno == errno.EPROTO
    assert "not an NBD newstyle server" in str(info.value)


def test_missing_socket_is_a_vdisk_error(sock_path: str) -> None:
    with pytest.raises(VdiskError) as info:
        vdisk.open(f"nbd+unix:///?socket={sock_path}")
    assert info.value.errno == errno.ENOENT and sock_path in str(info.value)


def test_server_gone_mid_session_is_a_vdisk_error(serve_inproc: Callable[..., NbdServer],
                                                  sock_path: str) -> None:
    server = serve_inproc(Export(MemoryDevice(MiB)))
    dev = vdisk.open(f"nbd+unix:///?socket={sock_path}")
    assert dev.pread(512, 0) == bytes(512)
    server.shutdown()
    with pytest.raises(VdiskError) as info:
        dev.pread(512, 0)
    assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
    dev.close()


@contextlib.contextmanager
def nbdkit(sock_path: str, *args: str) -> Iterator[None]:
    need("nbdkit")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock_path, *args],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock_path)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("structured", [True, False])
def test_client_against_nbdkit_memory(sock_path: str, structured: bool) -> None:
    with nbdkit(sock_path, "memory", "size=8M"):
        uri = f"nbd+unix:///?socket={sock_path}"
        with NbdClient(sock_path, structured=structured) as dev:
            assert dev.size == 8 * MiB
            data = os.urandom(3 * 65536 + 5)
            dev.write(data, MiB + 7)
            dev.write(b"\x99" * 65536, 4 * MiB, fua=True)
            dev.write_zeroes(4 * MiB, 4096)
            dev.discard(6 * MiB, MiB)
            dev.flush()
            assert dev.pread(len(data), MiB + 7) == data
            assert dev.pread(8192, 4 * MiB) == bytes(4096) + b"\x99" * 4096
            ours = [(e.offset, e.length, e.data, e.zero) for e in dev.block_status(0, dev.size)]
        theirs = json.loads(run("nbdinfo", "--json", "--map", uri).stdout)
        if structured:  # without structured replies there is no block status to compare
            assert ours == [(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2))
                            for e in theirs]


def test_client_sees_enospc_from_nbdkit_full(sock_path: str) -> None:
    with nbdkit(sock_path, "full", "size=1M"), NbdClient(sock_path) as dev:
        with pytest.raises(NbdError) as info:
            dev.write(b"x" * 4096, 0)
        assert info.value.errno == p.NBD_ENOSPC
        assert dev.pread(4096, 0) == bytes(4096)  # the connection still serves


def test_client_lists_nbdkit_exports(sock_path: str) -> None:
    with nbdkit(sock_path, "memory", "size=1M"):
        assert [name for name, _ in list_exports(sock_path)] == [""]


def test_malformed_reply_is_eproto_and_poisons_the_connection(sock_path: str) -> None:
    """A server that negotiates properly (through the real state machine) and then answers the
    first request with garbage."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            machine = p.ServerConnection([p.ExportInfo("", MiB)])
            with conn:
                while True:
                    event = machine.next_event()
                    conn.sendall(machine.data_to_send())
                    if isinstance(event, p.Negotiated):
                        break
                    if event is p.NEED_DATA:
                        machine.receive_data(conn.recv(4096))
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(b"\xde\xad\xbe\xef" * 8)
                    conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with NbdClient(sock_path) as dev:
        with pytest.raises(VdiskError) as info:
            dev.pread(512, 0)
        assert info.value.errno == errno.EPROTO and "bad magic" in str(info.value)
        with pytest.raises(VdiskError):
            dev.pread(512, 0)  # never reads the garbage's leftovers as a reply
    thread.join(10)
