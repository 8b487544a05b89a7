"""The server against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio.

Every answer is checked against the image file read directly (and qemu-img map for allocation).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vdisk.backends.memory import MemoryDevice
from vdisk.backends.raw import RawDevice, create_raw
from vdisk.nbd import Export, NbdServer
from vdisk.nbd.client import NbdClient

from .conftest import VDISK, free_port, need, run, unix_uri, wait_for_socket

MiB = 1 << 20


def make_raw(path: Path, size: int = 16 * MiB) -> str:
    create_raw(str(path), size)
    return str(path)


def qemu_io(uri: str, *cmds: str, check: bool = True) -> str:
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    proc = run(*args, uri, check=check)
    out = proc.stdout + proc.stderr
    if check:
        assert "failed" not in out and "Pattern verification failed" not in out, out
    return out


def nbd_map(uri: str, context: str = "base:allocation") -> list[dict[str, int]]:
    need("nbdinfo")
    out = run("nbdinfo", "--json", f"--map={context}", uri).stdout
    return [{k: e[k] for k in ("offset", "length", "type")} for e in json.loads(out)]


def test_qemu_io_read_write_zero_trim_unix(tmp_path: Path,
                                           serve_inproc: Callable[..., NbdServer],
                                           sock_path: str) -> None:
    path = make_raw(tmp_path / "d.raw")
    serve_inproc(Export(RawDevice(path), discard="unmap"))
    uri = unix_uri(sock_path)
    qemu_io(uri, "write -P 0x5a 0 2M", "write -P 0x11 3M 64k", "write -z 1M 512k",
            "discard 3M 64k", "flush")
    qemu_io(uri, "read -P 0x5a 0 1M", "read -P 0 1M 512k", "read -P 0x5a 1536k 512k",
            "read -P 0 2M 2M")
    data = Path(path).read_bytes()
    assert data[: MiB] == b"\x5a" * MiB
    assert data[MiB : MiB + 512 * 1024] == bytes(512 * 1024)
    assert data[3 * MiB : 3 * MiB + 65536] == bytes(65536)
    # Allocation as the client sees it equals what qemu-img map says about the file.
    need("qemu-img")
    ours = nbd_map(uri)
    qemu = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", path).stdout)
    as_map = [{"offset": e["start"], "length": e["length"],
               "type": (0 if e["data"] else 1) | (2 if e["zero"] else 0)} for e in qemu]
    assert ours == as_map


def test_qemu_io_tcp_and_qemu_img_convert(tmp_path: Path,
                                          serve_inproc: Callable[..., NbdServer]) -> None:
    need("qemu-img")
    path = make_raw(tmp_path / "d.raw")
    server = serve_inproc(Export(RawDevice(path)), tcp=True)
    host, port = server.tcp_address  # type: ignore[attr-defined]
    uri = f"nbd://{host}:{port}"
    qemu_io(uri, "write -P 0x33 5M 3M", "write -P 0x44 15M 1M")
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", path, str(out))
    assert out.read_bytes() == Path(path).read_bytes()
    # And back in: convert a local image onto the export.
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(16 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", str(src), "-O", "raw", uri)
    assert Path(path).read_bytes() == src.read_bytes()


def test_nbdinfo_list_json_and_descriptions(tmp_path: Path,
                                            serve_inproc: Callable[..., NbdServer],
                                            sock_path: str) -> None:
    need("nbdinfo")
    a = Export(RawDevice(make_raw(tmp_path / "a.raw", 4 * MiB)), name="a", description="disk A")
    b = Export(MemoryDevice(8 * MiB, readonly=True), name="b")
    serve_inproc(a, b)
    listing = json.loads(run("nbdinfo", "--list", "--json", unix_uri(sock_path)).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"a", "b"}
    assert exports["a"]["description"] == "disk A"
    assert exports["a"]["export-size"] == 4 * MiB and exports["b"]["export-size"] == 8 * MiB
    assert exports["b"]["is_read_only"] is True and exports["a"]["is_read_only"] is False
    info = json.loads(run("nbdinfo", "--json", unix_uri(sock_path, "a")).stdout)
    e = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed"
    assert e["can_multi_conn"] and e["can_flush"] and e["can_fua"] and e["can_zero"]
    assert e["block_size_maximum"] == 32 * MiB and e["block_size_preferred"] == 4096
    assert "base:allocation" in e["contexts"]


def test_allocation_depth_context(serve_inproc: Callable[..., NbdServer], sock_path: str) -> None:
    dev = MemoryDevice(4 * MiB)
    dev.write(b"x" * 65536, MiB)
    serve_inproc(Export(dev, allocation_depth=True))
    uri = unix_uri(sock_path)
    depth = nbd_map(uri, "qemu:allocation-depth")
    assert depth == [
        {"offset": 0, "length": MiB, "type": 0},
        {"offset": MiB, "length": 65536, "type": 1},
        {"offset": MiB + 65536, "length": 3 * MiB - 65536, "type": 0},
    ]
    assert nbd_map(uri) == [
        {"offset": 0, "length": MiB, "type": 3},
        {"offset": MiB, "length": 65536, "type": 0},
        {"offset": MiB + 65536, "length": 3 * MiB - 65536, "type": 3},
    ]


def test_nbdcopy_both_ways(tmp_path: Path, serve_inproc: Callable[..., NbdServer],
                           sock_path: str) -> None:
    need("nbdcopy")
    path = make_raw(tmp_path / "d.raw", 32 * MiB)
    serve_inproc(Export(RawDevice(path)))
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(7 * MiB)
        f.write(os.urandom(5 * MiB))
        f.seek(30 * MiB)
        f.write(os.urandom(MiB))
    run("nbdcopy", str(src), unix_uri(sock_path))
    assert Path(path).read_bytes() == src.read_bytes()
    back = tmp_path / "back.raw"
    run("nbdcopy", unix_uri(sock_path), str(back))
    assert back.read_bytes() == src.read_bytes()


def test_fio_nbd_engine_verify(tmp_path: Path, serve_inproc: Callable[..., NbdServer],
                               sock_path: str) -> None:
    need("fio")
    if "nbd" not in run("fio", "--enghelp").stdout.split():
        pytest.skip("this fio has no nbd engine")
    path = make_raw(tmp_path / "d.raw", 64 * MiB)
    serve_inproc(Export(RawDevice(path)))
    proc = run("fio", "--name=v", "--ioengine=nbd", f"--uri={unix_uri(sock_path)}",
               "--rw=randwrite", "--bs=4k", "--bsrange=512-64k", "--iodepth=16", "--size=64M",
               "--io_size=16M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
               "--output-format=json")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB and job["read"]["io_bytes"] > 0


def test_our_client_with_extended_headers(tmp_path: Path,
                                          serve_inproc: Callable[..., NbdServer],
                                          sock_path: str) -> None:
    """No client on the host speaks extended headers yet: our client checks the server."""
    path = make_raw(tmp_path / "d.raw", 8 * MiB)
    serve_inproc(Export(RawDevice(path), discard="unmap"))
    with NbdClient(sock_path, extended=True) as c:
        assert c.extended
        data = os.urandom(300000)
        c.write(data, 12345)
        buf = bytearray(len(data))
        c.readinto(buf, 12345)
        assert buf == data
        c.write_zeroes(MiB, 2 * MiB, may_unmap=True)
        extents = c.block_status(0, c.size)
        assert any(not e.data and e.zero for e in extents)
        assert sum(e.length for e in extents) == c.size
    assert Path(path).read_bytes()[12345 : 12345 + len(data)] == data


def test_cli_fork_pidfile_readonly_and_exit(tmp_path: Path, sock_path: str) -> None:
    """`vdisk nbd --fork --pid-file -r -x NAME` daemonizes; without -t it exits after a client."""
    path = make_raw(tmp_path / "d.raw", 4 * MiB)
    Path(path).write_bytes(b"\x77" * 4 * MiB)
    pid_file = tmp_path / "pid"
    run(*VDISK, "nbd", "--fork", "--pid-file", str(pid_file), "-r",
        "-x", "disk", "-D", "the disk", "-k", sock_path, "-f", "raw", path)
    pid = int(pid_file.read_text())
    try:
        uri = unix_uri(sock_path, "disk")
        # One client only: without -t the server leaves with it.
        # qemu refuses to open a read-only export for writing: that is the flag at work.
        out = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri, check=False)
        assert out.returncode != 0 and "Permission denied" in out.stderr, out.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # not persistent: gone after the clients
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("server without -t kept running after its clients left")
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert Path(path).read_bytes() == b"\x77" * 4 * MiB


def test_cli_tcp_persistent_multiple_exports(tmp_path: Path,
                                             cli_server: Callable[..., object]) -> None:
    a = make_raw(tmp_path / "a.raw", 2 * MiB)
    b = make_raw(tmp_path / "b.raw", 3 * MiB)
    port = free_port()
    cli_server("-t", "-e", "0", "-b", "127.0.0.1", "-p", str(port), "-f", "raw", a, b,
               socket_arg=False, wait=False)
    wait_for_socket(port=port)
    for _ in range(2):  # persistent: serves again after the first client left
        listing = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}").stdout)
        assert {e["export-name"] for e in listing["exports"]} == {"a.raw", "b.raw"}
    qemu_io(f"nbd://127.0.0.1:{port}/b.raw", "write -P 9 1M 1M")
    assert Path(b).read_bytes()[MiB : 2 * MiB] == b"\x09" * MiB


def test_cli_bad_flags_one_line(tmp_path: Path) -> None:
    proc = run(*VDISK, "nbd", "-x", "a", "-x", "b", str(tmp_path / "x"),
               check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    proc = run(*VDISK, "nbd", str(tmp_path / "missing.raw"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_cli_detect_zeroes_discard_and_cache(tmp_path: Path,
                                             cli_server: Callable[..., object],
                                             sock_path: str) -> None:
    """--detect-zeroes=unmap --discard=unmap turn zero writes into holes; writethrough works."""
    path = make_raw(tmp_path / "d.raw", 8 * MiB)
    Path(path).write_bytes(b"\x01" * 8 * MiB)
    cli_server("-t", "-f", "raw", "--detect-zeroes=unmap", "--discard=unmap",
               "--cache=writethrough", path)
    uri = unix_uri(sock_path)
    qemu_io(uri, "write -P 0 1M 2M", "write -P 3 4M 64k", "discard 6M 1M")
    data = Path(path).read_bytes()
    assert data[MiB : 3 * MiB] == bytes(2 * MiB) and data[6 * MiB : 7 * MiB] == bytes(MiB)
    assert data[4 * MiB : 4 * MiB + 65536] == b"\x03" * 65536
    holes = [(e["offset"], e["length"]) for e in nbd_map(uri) if e["type"] & 1]
    assert (MiB, 2 * MiB) in holes and (6 * MiB, MiB) in holes
    proc = run(*VDISK, "nbd", "--detect-zeroes=unmap", path, check=False)
    assert proc.returncode == 1 and "discard" in proc.stderr
