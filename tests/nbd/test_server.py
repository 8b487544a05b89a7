"""Server admission: the handshake deadline, -e slots counted after negotiation, and
multi-conn advertised only when a second connection would be served."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vdisk.backends.memory import MemoryDevice
from vdisk.backends.raw import create_raw
from vdisk.nbd import Export, NbdServer
from vdisk.nbd.client import NbdClient

from .conftest import need, run, unix_uri

MiB = 1 << 20


def _silent_sockets(path: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        socks.append(s)
    return socks


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True if the server closes ``sock`` within ``wait`` seconds (greeting bytes skipped)."""
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_silent_sockets_do_not_hold_slots(
    serve_inproc: Callable[..., NbdServer], sock_path: str
) -> None:
    need("nbdinfo")
    serve_inproc(Export(MemoryDevice(4 * MiB)), shared=4, handshake_limit=2.0)
    silent = _silent_sockets(sock_path, 100)
    try:
        # A real client is served while 100 silent sockets sit in negotiation.
        info = json.loads(run("nbdinfo", "--json", unix_uri(sock_path), timeout=60).stdout)
        assert info["exports"][0]["export-size"] == 4 * MiB
        with NbdClient(sock_path) as c:
            c.write(b"\x42" * 4096, 0)
            assert c.pread(4096, 0) == b"\x42" * 4096
        # Past the deadline every silent socket has been dropped by the server.
        assert all(_closed_by_server(s, 30) for s in silent)
    finally:
        for s in silent:
            s.close()


def test_slow_handshake_is_dropped_at_the_deadline(
    serve_inproc: Callable[..., NbdServer], sock_path: str
) -> None:
    serve_inproc(Export(MemoryDevice(MiB)), handshake_limit=1.0)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    try:
        assert len(s.recv(18)) == 18
        # Trickling bytes does not extend the deadline: it runs from accept.
        closed = False
        for _ in range(40):
            try:
                s.send(b"\0")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        assert closed or _closed_by_server(s, 30)
    finally:
        s.close()


def test_shared_slots_count_negotiated_clients(
    serve_inproc: Callable[..., NbdServer], sock_path: str
) -> None:
    serve_inproc(Export(MemoryDevice(MiB)), shared=2)
    first, second = NbdClient(sock_path), NbdClient(sock_path)
    third: list[NbdClient] = []
    waiter = threading.Thread(target=lambda: third.append(NbdClient(sock_path)), daemon=True)
    try:
        # Both slots are taken: the third client negotiates, then waits for a slot...
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not third
        # ...and gets one as soon as another client leaves.
        first.close()
        waiter.join(30)
        assert third and third[0].pread(512, 0) == bytes(512)
        assert second.pread(512, 0) == bytes(512)
    finally:
        for c in (first, second, *third):
            c.close()


def test_cli_multi_conn_follows_shared(
    cli_server: Callable[..., object], sock_path: str, tmp_path: Path
) -> None:
    need("nbdinfo")
    img = tmp_path / "d.raw"
    create_raw(str(img), 4 * MiB)
    proc = cli_server("-t", "-f", "raw", str(img))
    info = json.loads(run("nbdinfo", "--json", unix_uri(sock_path)).stdout)
    assert info["exports"][0]["can_multi_conn"] is False
    proc.terminate()  # type: ignore[attr-defined]
    proc.wait(10)  # type: ignore[attr-defined]
    cli_server("-t", "-e", "4", "-f", "raw", str(img))
    info = json.loads(run("nbdinfo", "--json", unix_uri(sock_path)).stdout)
    assert info["exports"][0]["can_multi_conn"] is True


def test_nbdcopy_against_default_server(
    cli_server: Callable[..., object], sock_path: str, tmp_path: Path
) -> None:
    need("nbdcopy")
    need("qemu-img")
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(8 * MiB) + bytes(16 * MiB) + os.urandom(8 * MiB))
    cli_server("-t", str(img))
    uri = unix_uri(sock_path)
    run("nbdcopy", str(src), uri, timeout=120)
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out), timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out))
