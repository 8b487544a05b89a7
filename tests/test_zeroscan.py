"""The compiled zero scan and file mappings convert uses (vdisk.zeroscan), and the devices'
``file_range``: the scan finds the runs ``zero_runs`` finds, a mapped file that shrinks gives
an error and not a dead process, ranges come from where ``qemu-img map`` says the data is,
and a big convert through mappings writes what qemu-img's convert writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vdisk
from oracles import qemu_img, qemu_io, qemu_map
from vdisk import zeroscan
from vdisk.convert import zero_runs

SCAN = zeroscan.load()
needs_scan = pytest.mark.skipif(SCAN is None, reason="no C compiler: the zero scan is not built")


@needs_scan
@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(st.sampled_from([b"", b"\0", b"\1", b"\0" * 100 + b"\7"]), max_size=40),
    block=st.sampled_from([1, 512, 4096]),
    dst_offset=st.integers(0, 9000),
    cut=st.integers(0, 5000),
)
def test_scan_finds_the_runs_zero_runs_finds(
    blocks: list[bytes], block: int, dst_offset: int, cut: int
) -> None:
    assert SCAN is not None
    buf = bytearray()
    for piece in blocks:  # each piece at the start of a block-sized stretch of zeros
        buf += piece[:block] + bytes(block - len(piece[:block]))
    buf += bytes(cut % (block + 1))
    length = len(buf)
    if not length:
        return
    assert SCAN.runs(buf, dst_offset, block, length) == zero_runs(buf, dst_offset, block, length)


_SHRINK = """
import os, sys
from vdisk import zeroscan
scan = zeroscan.load()
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(os.urandom(4 << 20))
fd = os.open(path, os.O_RDONLY)
mapping = scan.map(fd, 2 << 20, 2 << 20)
print(scan.runs(mapping, 0, 4096, 2 << 20)[0][2])
os.truncate(path, 1 << 20)
try:
    scan.runs(mapping, 0, 4096, 2 << 20)
except zeroscan.SourceShrankError as exc:
    print("error:", exc)
mapping.unmap()
if sys.argv[2:] == ["touch"]:  # a fault outside the guard is not swallowed
    mapping = scan.map(fd, 0, 1 << 20)
    os.truncate(path, 0)
    print(bytes(mapping.view[:1]))
print("alive")
"""


@needs_scan
@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_mapped_file_that_shrinks_is_an_error_not_a_crash(
    tmp_path: Path, faulthandler: bool
) -> None:
    flags = ["-X", "faulthandler"] if faulthandler else []
    proc = subprocess.run(
        [sys.executable, *flags, "-c", _SHRINK, str(tmp_path / "f")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "True",
        "error: the source file shrank while it was being copied",
        "alive",
    ]


@needs_scan
def test_a_fault_outside_the_guard_still_kills(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SHRINK, str(tmp_path / "f"), "touch"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -7, (proc.returncode, proc.stderr)  # SIGBUS, as without the guard


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu_io(path, "write -P 1 0 128k", "write -z 128k 64k", "write -c -P 2 256k 64k",
            "write -P 3 1M 64k", "write -P 4 512k 64k")  # fmt: skip
    return path


def test_qcow2_file_range_is_where_qemu_img_map_puts_the_data(tmp_path: Path) -> None:
    path = _image(tmp_path)
    data = {e["start"]: e for e in qemu_map(path) if e["data"] and "offset" in e}
    with vdisk.open(str(path), readonly=True) as img:
        fd = img.fd  # type: ignore[attr-defined]
        assert img.file_range(4096, 100_000) == (fd, data[0]["offset"] + 4096)  # type: ignore[attr-defined]
        for offset, length in (
            (100_000, 60_000),  # data then zero cluster
            (128 << 10, 4096),  # zero cluster
            (256 << 10, 4096),  # compressed
            (768 << 10, 4096),  # unallocated
            (512 << 10, 600 << 10),  # data clusters that are not contiguous in the file
            (0, 5 << 20),  # past the end
        ):
            assert img.file_range(offset, length) is None, (offset, length)  # type: ignore[attr-defined]
    with vdisk.open(str(path), readonly=True, force_share=True) as img:
        assert img.file_range(0, 4096) is None  # type: ignore[attr-defined]
    with vdisk.open(str(path)) as img:  # writable: clusters may move
        assert img.file_range(0, 4096) is None  # type: ignore[attr-defined]


def test_raw_file_range_is_the_offset_itself(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(os.urandom(1 << 20))
    with vdisk.open(str(path), format="raw", readonly=True) as dev:
        assert dev.file_range(4096, 8192) == (dev.fd, 4096)  # type: ignore[attr-defined]
        assert dev.file_range(4096, 1 << 20) is None  # type: ignore[attr-defined]
    with vdisk.open(str(path), format="raw", readonly=True, force_share=True) as dev:
        assert dev.file_range(0, 4096) is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_a_big_convert_writes_what_qemu_img_writes(
    tmp_path: Path, native: str, out_fmt: str
) -> None:
    """64 MiB (past the size where the compiled scan and mappings start) of data, zeros
    written as data, zero clusters, holes, compressed clusters and a backing file's data."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 1 0 8M", "write -P 9 40M 3M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "64M")
    qemu_io(top, "write -P 2 1M 3M", "write -P 0 9M 2M", "write -z 12M 1M",
            "write -c -P 3 20M 1M", "write -P 4 30M 4100k", "write -P 5 41M 5k")  # fmt: skip
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"theirs.{out_fmt}"
    env = dict(os.environ, VDISK_NATIVE_ZEROSCAN=native)
    proc = subprocess.run(
        [sys.executable, "-m", "vdisk", "convert", "-O", out_fmt, str(top), str(ours)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    qemu_img("convert", "-O", out_fmt, str(top), str(theirs))
    qemu_img("compare", "-q", str(ours), str(theirs))
    assert qemu_map(ours) == qemu_map(theirs)
    if out_fmt == "qcow2":
        qemu_img("check", "-q", str(ours))


@needs_scan
def test_convert_maps_the_sources_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The big copy above goes through mappings where the source's data lies in one run of
    its file, and reads the rest (a backing file's data here)."""
    from vdisk.convert import convert

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 1 0 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "64M")
    qemu_io(top, "write -P 2 16M 8M")
    mapped: list[int] = []
    real_map = zeroscan.ZeroScan.map

    def spy(self: zeroscan.ZeroScan, fd: int, offset: int, length: int) -> zeroscan.Mapping | None:
        mapped.append(length)
        return real_map(self, fd, offset, length)

    monkeypatch.setattr(zeroscan.ZeroScan, "map", spy)
    out = tmp_path / "out.raw"
    vdisk.create(str(out), 64 << 20, format="raw")
    with vdisk.open(str(top), readonly=True) as src, vdisk.open(str(out), format="raw") as dst:
        convert([src], dst, target_is_zero=True)
    assert sum(mapped) == 8 << 20  # the top's own data; the backing file's is read
    qemu_img("compare", "-q", "-f", "raw", str(out), str(top))
