"""READ paths of the server: data sent from the host file with sendfile(2), sparse reads that
remember known data (known_data.py), and what both must still get right: holes, data written
into a hole after it was read, discarded data, a device longer than its file, TLS-free TCP."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdisk.backends.memory import MemoryDevice
from vdisk.backends.raw import RawDevice
from vdisk.nbd import Export, NbdServer
from vdisk.nbd.client import NbdClient
from vdisk.nbd.known_data import MAX_RANGES, KnownData

from .conftest import need, run, unix_uri

MiB = 1 << 20


def test_known_data_merges_and_covers() -> None:
    known = KnownData()
    known.add([(0, 10), (20, 30)])
    known.add([(10, 15), (29, 40), (50, 50)])
    assert len(known) == 2
    assert known.covers(0, 15) and known.covers(20, 20) and known.covers(39, 1)
    assert not known.covers(14, 2) and not known.covers(15, 1) and not known.covers(40, 1)
    known.clear()
    assert not known.covers(0, 1)


def test_known_data_is_bounded_and_keeps_what_lies_ahead() -> None:
    known = KnownData()
    known.add(((2 * i, 2 * i + 1) for i in range(MAX_RANGES + 100)), keep_from=200)
    assert len(known) <= MAX_RANGES
    assert known.covers(200, 1) and known.covers(2 * (MAX_RANGES + 99), 1)
    assert not known.covers(0, 1)


@pytest.fixture(params=["disk", "tmpfs"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The work dir's file system, and tmpfs (whose SEEK_HOLE walks the page cache)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("this host has no writable /dev/shm")
    d = Path(f"/dev/shm/vnbd-read-{os.getpid()}-{os.urandom(4).hex()}")
    d.mkdir()
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _mixed_image(path: Path) -> bytes:
    """8 MiB: data, a 2 MiB hole, data, a 1 MiB hole, data (holes as real file holes)."""
    layout = [
        os.urandom(3 * MiB),
        bytes(2 * MiB),
        os.urandom(MiB + 4096),
        bytes(MiB),
        os.urandom(MiB - 4096),
    ]
    data = b"".join(layout)
    with open(path, "wb") as f:
        pos = 0
        for part in layout:
            if any(part):
                f.seek(pos)
                f.write(part)
            pos += len(part)
        f.truncate(pos)
    return data


def test_reads_match_the_file_on_unix_and_tcp(
    serve_inproc: Callable[..., NbdServer], sock_path: str, image_dir: Path
) -> None:
    img = image_dir / "d.raw"
    data = _mixed_image(img)
    device = RawDevice(str(img))
    try:
        server = serve_inproc(Export(device), tcp=True)
        host, port = server.tcp_address  # type: ignore[attr-defined]
        for address in (sock_path, (host, port)):
            for structured in (True, False):
                with NbdClient(address, structured=structured) as client:
                    # whole-MiB, odd and chunk-straddling reads, above and below SENDFILE_MIN
                    for offset, length in (
                        (0, MiB),
                        (2 * MiB, 2 * MiB),
                        (5 * MiB - 512, MiB + 1024),
                        (7 * MiB, MiB),
                        (4096, 64 << 10),
                        (0, 8 * MiB),
                    ):
                        assert client.pread(length, offset) == data[offset : offset + length]
    finally:
        device.close()


def test_nbdcopy_reads_what_qemu_img_compares_equal(
    cli_server: Callable[..., object], sock_path: str, image_dir: Path, tmp_path: Path
) -> None:
    need("nbdcopy")
    need("qemu-img")
    img = image_dir / "d.raw"
    _mixed_image(img)
    cli_server("-t", "-f", "raw", "-e", "4", str(img))
    out = tmp_path / "out.raw"
    run("nbdcopy", unix_uri(sock_path), str(out), timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(out))


def test_cached_data_never_hides_a_write_or_shows_a_stale_hole(
    serve_inproc: Callable[..., NbdServer], sock_path: str, image_dir: Path
) -> None:
    img = image_dir / "d.raw"
    data = bytearray(_mixed_image(img))
    device = RawDevice(str(img))
    try:
        serve_inproc(Export(device, discard="unmap"))
        with NbdClient(sock_path) as client:
            assert client.pread(8 * MiB, 0) == data  # fills the known-data cache
            new = os.urandom(MiB)
            client.write(new, 3 * MiB)  # into the first hole
            data[3 * MiB : 4 * MiB] = new
            assert client.pread(4 * MiB, 2 * MiB) == data[2 * MiB : 6 * MiB]
            client.discard(0, 2 * MiB)  # data that was cached becomes a hole
            data[: 2 * MiB] = bytes(2 * MiB)
            assert client.pread(4 * MiB, 0) == data[: 4 * MiB]
            holes = [(e.offset, e.length) for e in client.block_status(0, 8 * MiB) if not e.data]
            assert (0, 2 * MiB) in holes
    finally:
        device.close()


def test_device_longer_than_its_file_reads_zeros_past_the_end(
    serve_inproc: Callable[..., NbdServer], sock_path: str, tmp_path: Path
) -> None:
    img = tmp_path / "short.raw"
    head = os.urandom(MiB + 512)
    img.write_bytes(head)
    device = RawDevice(str(img), readonly=True, size=4 * MiB)
    try:
        serve_inproc(Export(device))
        for structured in (True, False):
            with NbdClient(sock_path, structured=structured) as client:
                assert client.pread(4 * MiB, 0) == head + bytes(4 * MiB - len(head))
    finally:
        device.close()


def test_devices_without_a_file_still_serve_large_reads(
    serve_inproc: Callable[..., NbdServer], sock_path: str
) -> None:
    device = MemoryDevice(4 * MiB)
    payload = os.urandom(2 * MiB)
    device.write(payload, MiB)
    serve_inproc(Export(device))
    with NbdClient(sock_path) as client:
        assert client.pread(4 * MiB, 0) == bytes(MiB) + payload + bytes(MiB)
