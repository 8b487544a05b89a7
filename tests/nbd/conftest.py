"""Fixtures for NBD tests: servers (in-process and via the CLI) on temp sockets and ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vdisk.nbd import Export, NbdServer

VDISK = [sys.executable, "-m", "vdisk"]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed on this host")
    return path


def run(*args: str, check: bool = True, timeout: float = 120, **kw: Any
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_socket(path: str | None = None, port: int | None = None, timeout: float = 20,
                    proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"server exited early ({proc.returncode}): {out}{err}")
        try:
            if path is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            else:
                socket.create_connection(("127.0.0.1", port or 0), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start listening")


def unix_uri(path: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={path}"


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes: keep them short.
    d = Path(f"/tmp/vnbd-{os.getpid()}-{time.monotonic_ns()}")
    d.mkdir()
    yield str(d / "s")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve_inproc(sock_path: str) -> Iterator[Callable[..., NbdServer]]:
    """Start an in-process server on ``sock_path`` (and optionally TCP) for the given exports."""
    servers: list[NbdServer] = []

    def start(*exports: Export, tcp: bool = False, **kw: Any) -> NbdServer:
        server = NbdServer(list(exports), **kw)
        server.listen_unix(sock_path)
        if tcp:
            server.tcp_address = server.listen_tcp("127.0.0.1", 0)  # type: ignore[attr-defined]
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def cli_server(sock_path: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Run `vdisk nbd ARGS -k SOCK` as a subprocess; killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, socket_arg: bool = True, wait: bool = True) -> subprocess.Popen[str]:
        cmd = [*VDISK, "nbd", *args]
        if socket_arg:
            cmd[len(VDISK) + 1 : len(VDISK) + 1] = ["-k", sock_path]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        if wait:
            wait_for_socket(sock_path if socket_arg else None, proc=proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
