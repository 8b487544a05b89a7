"""The compiled per-connection loop (vdisk/nbd/fastloop.c) against the pure-Python one.

The same pipelined request script, sent to a raw export with the fast path on and off, must
give the same reply bytes and leave the same image; a write that fails in the writer thread, a
write cut off mid-payload and requests C hands back are checked the same way.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdisk.backends.raw import RawDevice
from vdisk.nbd import Export, NbdServer, fastpath
from vdisk.nbd import protocol as p

from .conftest import VDISK, wait_for_socket

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


@pytest.fixture(params=["fast", "python"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Serve with the compiled loop (counting its calls) or with the Python loop only."""
    if request.param == "python":
        monkeypatch.setattr(fastpath, "library", lambda: None)
    elif fastpath.library() is None:
        pytest.skip("the NBD fast path is off here (no C compiler, or VDISK_NBD_FASTPATH=0)")
    yield request.param


def compiled_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    serve = fastpath.FastConnection.serve

    def counting(self: fastpath.FastConnection) -> tuple[int, bytes]:
        calls.append(1)
        return serve(self)

    monkeypatch.setattr(fastpath.FastConnection, "serve", counting)
    return calls


def make_image(path: Path) -> bytes:
    data = bytearray(os.urandom(SIZE))
    data[2 * MiB : 3 * MiB] = bytes(MiB)  # a zero run, for the sparse structured reads
    path.write_bytes(data)
    return bytes(data)


def recv_exact(s: socket.socket, n: int) -> bytes:
    """``n`` bytes (MSG_WAITALL does not wait on a socket with a timeout)."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "the server hung up"
        data += chunk
    return data


def negotiate(path: str, structured: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    assert len(recv_exact(s, 18)) == 18
    s.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    if structured:
        s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_STRUCTURED_REPLY, 0))
        _, _, rtype, length = p.OPTION_REPLY.unpack(recv_exact(s, 20))
        assert rtype == p.NBD_REP_ACK and length == 0
    s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_EXPORT_NAME, 0))
    assert len(recv_exact(s, 10)) == 10
    return s


def request(
    cookie: int, rtype: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
) -> bytes:
    return p.REQUEST.pack(p.NBD_REQUEST_MAGIC, flags, rtype, cookie, offset, length) + payload


def script(structured: bool) -> list[bytes]:
    """Requests of every kind the compiled loop serves or hands back, in one pipeline."""
    reqs = []
    cookie = iter(range(1, 10_000))
    for i in range(40):  # plain 4K reads: the compiled loop's
        reqs.append(request(next(cookie), p.NBD_CMD_READ, (i * 7919 * 4096) % SIZE, 4096))
    reqs.append(request(next(cookie), p.NBD_CMD_READ, 12345, 777, p.NBD_CMD_FLAG_FUA))
    small = bytes(range(256)) * 16
    large = os.urandom(MiB)
    reqs += [
        request(next(cookie), p.NBD_CMD_WRITE, 4096, len(small), payload=small),
        request(next(cookie), p.NBD_CMD_WRITE, 3 * MiB, MiB, payload=large),  # writer thread
        request(next(cookie), p.NBD_CMD_WRITE, 5 * MiB, MiB, payload=large[::-1]),
        request(next(cookie), p.NBD_CMD_READ, 3 * MiB - 2048, 8192),  # after the writes
        request(next(cookie), p.NBD_CMD_WRITE, 6 * MiB, 300 * KiB, payload=large[: 300 * KiB]),
        request(next(cookie), p.NBD_CMD_WRITE, 7 * MiB, 4096, p.NBD_CMD_FLAG_FUA, small),
        request(next(cookie), p.NBD_CMD_FLUSH, 0, 0),
        request(next(cookie), p.NBD_CMD_READ, 2 * MiB - 4096, 96 * KiB),  # sparse when structured
        request(next(cookie), p.NBD_CMD_READ, 3 * MiB, 512 * KiB),  # sendfile
        request(next(cookie), p.NBD_CMD_READ, SIZE - 4096, 8192),  # past the end: EINVAL
        request(next(cookie), p.NBD_CMD_WRITE, SIZE - 4096, 8192, payload=bytes(8192)),  # ENOSPC
        request(next(cookie), p.NBD_CMD_WRITE, SIZE - MiB, 2 * MiB, payload=large * 2),  # ENOSPC
        request(next(cookie), p.NBD_CMD_BLOCK_STATUS, 0, 4096),  # no context: EINVAL
        request(next(cookie), 42, 0, 0),  # unknown command
        request(next(cookie), p.NBD_CMD_TRIM, 0, 4096),
        request(next(cookie), p.NBD_CMD_READ, 0, 0),
        request(next(cookie), p.NBD_CMD_WRITE, 0, 0),
    ]
    if structured:
        reqs.append(request(next(cookie), p.NBD_CMD_READ, 2 * MiB, 128 * KiB, p.NBD_CMD_FLAG_DF))
    for i in range(20):
        reqs.append(request(next(cookie), p.NBD_CMD_READ, i * 400 * KiB, 64 * KiB - 1))
    reqs.append(request(next(cookie), p.NBD_CMD_DISC, 0, 0))
    return reqs


def transcript(path: str, structured: bool, reqs: list[bytes]) -> bytes:
    """Every byte the server sends back to the pipelined requests, until it hangs up."""
    s = negotiate(path, structured)
    sender = threading.Thread(target=s.sendall, args=(b"".join(reqs),))
    sender.start()
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    sender.join()
    s.close()
    return b"".join(chunks)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_same_replies_and_image_as_the_python_loop(
    tmp_path: Path,
    sock_path: str,
    serve_inproc: Callable[..., NbdServer],
    monkeypatch: pytest.MonkeyPatch,
    structured: bool,
) -> None:
    """The script through the compiled loop gives the bytes the Python loop gives."""
    if fastpath.library() is None:
        pytest.skip("the NBD fast path is off here (no C compiler, or VDISK_NBD_FASTPATH=0)")
    original = make_image(tmp_path / "a.raw")
    shutil.copy(tmp_path / "a.raw", tmp_path / "b.raw")
    reqs = script(structured)
    calls = compiled_calls(monkeypatch)
    with RawDevice(str(tmp_path / "a.raw")) as dev:
        server = serve_inproc(Export(dev, name=""))
        fast = transcript(sock_path, structured, reqs)
        server.close()
    assert calls, "the compiled loop did not run"
    monkeypatch.setattr(fastpath, "library", lambda: None)
    with RawDevice(str(tmp_path / "b.raw")) as dev:
        server = NbdServer([Export(dev, name="")])
        server.listen_unix(sock_path)
        server.start()
        try:
            slow = transcript(sock_path, structured, reqs)
        finally:
            server.close()
    assert len(fast) == len(slow)
    assert fast == slow
    a, b = (tmp_path / "a.raw").read_bytes(), (tmp_path / "b.raw").read_bytes()
    assert a == b
    assert a != original  # the writes landed


def test_write_cut_off_mid_payload_writes_nothing(
    tmp_path: Path, sock_path: str, serve_inproc: Callable[..., NbdServer], mode: str
) -> None:
    """A client gone in the middle of a long WRITE's payload leaves the image as it was, and
    the server serves the next client."""
    original = make_image(tmp_path / "a.raw")
    with RawDevice(str(tmp_path / "a.raw")) as dev:
        serve_inproc(Export(dev))
        s = negotiate(sock_path, False)
        s.sendall(request(1, p.NBD_CMD_WRITE, MiB, MiB, payload=b"x" * MiB))
        assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (0, 1)
        s.sendall(request(2, p.NBD_CMD_WRITE, 4 * MiB, MiB, payload=b"y" * (MiB // 2)))
        s.close()
        s = negotiate(sock_path, False)
        s.sendall(request(3, p.NBD_CMD_READ, 4 * MiB, MiB))
        error, cookie = p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:]
        data = recv_exact(s, MiB)
        s.close()
    assert (error, cookie) == (0, 3)
    assert data == original[4 * MiB : 5 * MiB]
    image = (tmp_path / "a.raw").read_bytes()
    assert image[MiB : 2 * MiB] == b"x" * MiB
    assert image[4 * MiB :] == original[4 * MiB :]


def fsize_limited_server(image: Path, sock: str, limit: int, fast: bool) -> subprocess.Popen[str]:
    """`vdisk nbd` on ``image`` whose writes past ``limit`` fail (RLIMIT_FSIZE: EFBIG)."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, VDISK_NBD_FASTPATH="1" if fast else "0")
    proc = subprocess.Popen(
        [*VDISK, "nbd", "-f", "raw", "-k", sock, "-t", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limit_file_size,
    )
    wait_for_socket(sock, proc=proc)
    return proc


def test_failed_writes_answer_like_the_python_loop(tmp_path: Path, sock_path: str) -> None:
    """Writes failing in the writer thread (one cut short at the limit, one past it), in the
    compiled loop and in the Python loop: the same replies, the same image."""
    if fastpath.library() is None:
        pytest.skip("the NBD fast path is off here (no C compiler, or VDISK_NBD_FASTPATH=0)")
    limit = 4 * MiB + 512 * KiB
    large = os.urandom(MiB)
    reqs = [
        request(1, p.NBD_CMD_WRITE, 3 * MiB, MiB, payload=large),  # fits
        request(2, p.NBD_CMD_WRITE, 4 * MiB, MiB, payload=large),  # half fits, then EFBIG
        request(3, p.NBD_CMD_WRITE, 6 * MiB, MiB, payload=large),  # EFBIG
        request(4, p.NBD_CMD_WRITE, 2 * MiB, MiB, payload=large[::-1]),  # after a failure
        request(5, p.NBD_CMD_WRITE, 7 * MiB, 4096, payload=large[:4096]),  # EFBIG, small
        request(6, p.NBD_CMD_READ, 4 * MiB, 8192),
        request(7, p.NBD_CMD_DISC, 0, 0),
    ]
    outcomes = []
    make_image(tmp_path / "original.raw")
    for fast in (True, False):
        image = tmp_path / f"{fast}.raw"
        shutil.copy(tmp_path / "original.raw", image)
        proc = fsize_limited_server(image, sock_path, limit, fast)
        try:
            outcomes.append((transcript(sock_path, False, reqs), image.read_bytes()))
        finally:
            proc.terminate()
            proc.wait(20)
    (fast_replies, fast_image), (slow_replies, slow_image) = outcomes
    assert fast_replies == slow_replies
    assert fast_image == slow_image
    errors = [p.SIMPLE_REPLY.unpack_from(fast_replies, i * 16)[1:] for i in range(6)]
    assert errors == [
        (0, 1),
        (p.NBD_ENOSPC, 2),
        (p.NBD_ENOSPC, 3),
        (0, 4),
        (p.NBD_ENOSPC, 5),
        (0, 6),
    ]
    assert fast_image[3 * MiB : 4 * MiB] == large
    assert fast_image[2 * MiB : 3 * MiB] == large[::-1]
    assert fast_image[4 * MiB : limit] == large[: limit - 4 * MiB]


def test_off_switch(tmp_path: Path) -> None:
    """VDISK_NBD_FASTPATH=0 leaves the Python loop only."""
    code = "from vdisk.nbd import fastpath; print(fastpath.library() is None)"
    env = dict(os.environ, VDISK_NBD_FASTPATH="0")
    out = subprocess.run(
        [*VDISK[:1], "-c", code], capture_output=True, text=True, env=env, check=True, timeout=60
    ).stdout
    assert out.strip() == "True"


def test_poll_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """VDISK_NBD_POLL_NS sets how long the loop polls after a lone READ (0: never)."""
    monkeypatch.setenv("VDISK_NBD_POLL_NS", "0")
    assert fastpath.poll_ns() == 0
    monkeypatch.setenv("VDISK_NBD_POLL_NS", "not a number")
    assert fastpath.poll_ns() == fastpath.POLL_NS
    monkeypatch.delenv("VDISK_NBD_POLL_NS")
    assert fastpath.poll_ns() == fastpath.POLL_NS


def test_same_replies_without_polling(
    tmp_path: Path,
    sock_path: str,
    serve_inproc: Callable[..., NbdServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The script gives the same replies with polling off as with it on."""
    if fastpath.library() is None:
        pytest.skip("the NBD fast path is off here (no C compiler, or VDISK_NBD_FASTPATH=0)")
    make_image(tmp_path / "a.raw")
    shutil.copy(tmp_path / "a.raw", tmp_path / "b.raw")
    reqs = script(True)
    replies = []
    for name, poll in (("a.raw", "0"), ("b.raw", "50000")):
        monkeypatch.setenv("VDISK_NBD_POLL_NS", poll)
        with RawDevice(str(tmp_path / name)) as dev:
            server = NbdServer([Export(dev)])
            server.listen_unix(sock_path)
            server.start()
            try:
                replies.append(transcript(sock_path, True, reqs))
            finally:
                server.close()
    assert replies[0] == replies[1]
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()
