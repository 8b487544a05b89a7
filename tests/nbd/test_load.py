"""Load: many concurrent verifying clients, many idle connections, clients that vanish
mid-request. The server is the real CLI (`vdisk nbd`) on a qcow2 image; every test ends with
qemu-img check and the data read back through qemu-img, so a lost or misplaced write fails.

Short in CI (a few seconds of I/O); ``VDISK_SOAK=1`` runs the I/O for 120 s
(``VDISK_SOAK_SECONDS`` overrides). Figures measured are printed (visible with ``-s``).
"""

from __future__ import annotations

import os
import random
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vdisk.nbd import protocol as p
from vdisk.nbd.client import NbdClient

from .conftest import need, run

MiB = 1 << 20
CLIENTS = 64
REGION = MiB  # each client owns one region, so its model predicts every byte exactly


def soak_seconds(ci: float) -> float:
    if os.environ.get("VDISK_SOAK_SECONDS"):
        return float(os.environ["VDISK_SOAK_SECONDS"])
    return 120.0 if os.environ.get("VDISK_SOAK") else ci


def make_image(tmp_path: Path, size: int) -> Path:
    need("qemu-img")
    img = tmp_path / "load.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
    return img


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(60)
    assert proc.returncode in (0, -15), proc.stderr.read() if proc.stderr else ""


def image_bytes(img: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "read-back.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def _client_worker(
    sock_path: str,
    index: int,
    deadline: float,
    model: bytearray,
    stats: dict[str, int],
    errors: list[str],
    lock: threading.Lock,
) -> None:
    rng = random.Random(index)
    base = index * REGION
    ops = 0
    try:
        with NbdClient(sock_path) as c:
            while time.monotonic() < deadline:
                off = rng.randrange(REGION - 1)
                n = rng.randint(1, min(64 << 10, REGION - off))
                kind = rng.random()
                if kind < 0.45:
                    data = rng.randbytes(n)
                    c.write(data, base + off, fua=rng.random() < 0.05)
                    model[off : off + n] = data
                elif kind < 0.5:
                    c.write_zeroes(base + off, n, may_unmap=rng.random() < 0.5)
                    model[off : off + n] = bytes(n)
                elif kind < 0.52:
                    c.flush()
                else:
                    got = c.pread(n, base + off)
                    if got != model[off : off + n]:
                        errors.append(f"client {index}: read [{off}, +{n}) differs from model")
                        return
                ops += 1
            if c.pread(REGION, base) != model:
                errors.append(f"client {index}: region differs from model at the end")
    except Exception as exc:  # counted and reported: the test asserts there are none
        errors.append(f"client {index}: {type(exc).__name__}: {exc}")
    finally:
        with lock:
            stats["ops"] += ops


def test_64_clients_verified_random_io(
    tmp_path: Path, sock_path: str, cli_server: Callable[..., subprocess.Popen[str]]
) -> None:
    img = make_image(tmp_path, CLIENTS * REGION)
    proc = cli_server("-t", "-e", str(CLIENTS), str(img))
    seconds = soak_seconds(5.0)
    models = [bytearray(REGION) for _ in range(CLIENTS)]
    stats = {"ops": 0}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=_client_worker, args=(sock_path, i, deadline, models[i], stats, errors, lock)
        )
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    stop(proc)
    check = run("qemu-img", "check", str(img), check=False)
    data = image_bytes(img, tmp_path)
    mismatched = sum(data[i * REGION : (i + 1) * REGION] != models[i] for i in range(CLIENTS))
    print(
        f"nbd load: {CLIENTS} clients, {seconds:.0f} s, {stats['ops']} ops, "
        f"{len(errors)} errors, {mismatched} regions differing after restart, "
        f"qemu-img check rc {check.returncode}"
    )
    assert not errors, errors[:5]
    assert not any(t.is_alive() for t in threads)
    assert mismatched == 0
    assert check.returncode == 0, check.stdout + check.stderr
    assert stats["ops"] > CLIENTS


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {want} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def test_1000_idle_connections(
    tmp_path: Path, sock_path: str, cli_server: Callable[..., subprocess.Popen[str]]
) -> None:
    idle_count = 1000
    _raise_nofile(3 * idle_count + 256)  # inherited by the server subprocess too
    img = make_image(tmp_path, 16 * MiB)
    proc = cli_server("-t", "-e", str(idle_count + 10), str(img))
    idle: list[NbdClient] = []
    try:
        for _ in range(idle_count):
            idle.append(NbdClient(sock_path))
        # With every idle client negotiated, a new client does real I/O...
        with NbdClient(sock_path) as c:
            c.write(b"\x77" * 65536, MiB)
            c.flush()
            assert c.pread(65536, MiB) == b"\x77" * 65536
        # ...and every idle connection is still being served.
        answered = sum(c.pread(512, MiB) == b"\x77" * 512 for c in idle)
        rss = _rss_mib(proc.pid)
    finally:
        for c in idle:
            c.close()
    stop(proc)
    print(
        f"nbd idle: {idle_count} negotiated idle connections held, {answered} answered a read "
        f"afterwards, server RSS {rss} MiB"
    )
    assert answered == idle_count
    run("qemu-img", "check", str(img))


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return -1


def _negotiate_raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    p.parse_greeting(_recv_exact(s, p.HANDSHAKE.size))
    s.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    s.sendall(p.pack_option(p.NBD_OPT_EXPORT_NAME))
    _recv_exact(s, p.EXPORT_NAME_REPLY.size)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed")
        buf += chunk
    return buf


def test_clients_vanishing_mid_request(
    tmp_path: Path, sock_path: str, cli_server: Callable[..., subprocess.Popen[str]]
) -> None:
    img = make_image(tmp_path, 16 * MiB)
    proc = cli_server("-t", "-e", "8", str(img))
    with NbdClient(sock_path) as c:
        c.write(b"\x3c" * MiB, 0)
        c.flush()
    rounds = 50
    for i in range(rounds):
        s = _negotiate_raw(sock_path)
        if i % 3 == 0:  # a write header, then gone
            s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, i, 2 * MiB, MiB))
        elif i % 3 == 1:  # a write header and part of its payload
            s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, i, 2 * MiB, MiB))
            s.sendall(os.urandom(MiB // 3))
        else:  # a large read, closed before reading the reply
            s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, i, 0, 8 * MiB))
        s.close()
    with NbdClient(sock_path) as c:  # still serving, data intact, nothing half-written landed
        assert c.pread(MiB, 0) == b"\x3c" * MiB
        assert c.pread(MiB, 2 * MiB) == bytes(MiB)
    stop(proc)
    print(f"nbd vanishing: {rounds} clients vanished mid-request, server kept serving")
    run("qemu-img", "check", str(img))
