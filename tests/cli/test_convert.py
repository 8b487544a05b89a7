"""`vdisk convert` checked with QEMU's tools: `qemu-img compare` says the target holds the
source's contents, `qemu-img check` says a qcow2 target is clean, and the target's allocation
(`qemu-img map`) is the one `qemu-img convert` produces from the same source.

Sources come from qemu-img / qemu-io: data, zero clusters, holes, compressed clusters, a
backing chain, raw files; several sources are concatenated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io


def _ok(run: Run) -> Run:
    assert run.rc == 0, run
    return run


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "8M"], d))
    qemu_io(
        ["-c", "write -P 1 0 1M", "-c", "write -P 2 3M 64k", "-c", "write -z 4M 64k",
         "-c", "write -P 0 5M 64k", "base.qcow2"],
        d,
    )  # fmt: skip
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                  "top.qcow2", "12M"], d))  # fmt: skip
    qemu_io(
        ["-c", "write -P 3 64k 64k", "-c", "write -z 3M 64k", "-c", "write -c -P 4 9M 128k",
         "-c", "write -P 5 11M 4k", "-c", "write -P 6 6M 3k", "top.qcow2"],
        d,
    )  # fmt: skip
    _ok(qemu_img(["create", "-q", "-f", "raw", "disk.img", "3M"], d))
    qemu_io(["-f", "raw", "-c", "write -P 7 1M 8k", "disk.img"], d)
    with (d / "odd.img").open("wb") as f:  # ends mid-sector: QEMU rounds its size up
        f.truncate(70000)
        f.seek(69000)
        f.write(b"odd")
    return d


def _map(path: Path, fmt: str) -> list[dict[str, object]]:
    out = _ok(qemu_img(["map", "-f", fmt, "--output=json", path.name], path.parent)).out
    result: list[dict[str, object]] = json.loads(out)
    return result


def _same_as_qemu(
    d: Path, vdisk_cli: VdiskRunner, args: list[str], fmt: str, same_map: bool = True
) -> None:
    """Run ``convert ARGS ours.FMT`` and qemu-img's ``convert ARGS theirs.FMT``; compare."""
    ours = vdisk_cli(["convert", *args, f"ours.{fmt}"], d)
    assert (ours.rc, ours.out, ours.err) == (0, "", ""), ours
    _ok(qemu_img(["convert", *args, f"theirs.{fmt}"], d))
    _ok(qemu_img(["compare", "-f", fmt, "-F", fmt, f"ours.{fmt}", f"theirs.{fmt}"], d))
    if fmt == "qcow2":
        check = _ok(qemu_img(["check", f"ours.{fmt}"], d))
        assert check.out.startswith("No errors were found on the image.")
    # Same allocation: sparse where qemu-img's output is sparse, and (written in order) the
    # same host layout in a qcow2 target.
    if same_map:
        assert _map(d / f"ours.{fmt}", fmt) == _map(d / f"theirs.{fmt}", fmt)
    for name in (f"ours.{fmt}", f"theirs.{fmt}"):
        (d / name).unlink()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_like_qemu(src: Path, vdisk_cli: VdiskRunner, fmt: str) -> None:
    for args in (
        ["-O", fmt, "top.qcow2"],
        ["-O", fmt, "base.qcow2"],
        ["-f", "raw", "-O", fmt, "disk.img"],
        ["-f", "raw", "-O", fmt, "odd.img", "disk.img"],
        ["-O", fmt, "top.qcow2", "disk.img", "base.qcow2"],  # concatenated
        ["-O", fmt, "-S", "64k", "top.qcow2"],
        ["-O", fmt, "-S", "0", "top.qcow2"],  # fully allocated
        ["-f", "raw", "-O", fmt, "-S", "0", "odd.img", "disk.img"],  # raw -> raw: offloaded
        ["-O", fmt, "-m", "1", "top.qcow2"],
        ["-O", fmt, "-m", "16", "-t", "writeback", "top.qcow2"],
    ):
        _same_as_qemu(src, vdisk_cli, args, fmt)


@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none", "writethrough", "directsync"])
def test_convert_cache_modes(src: Path, vdisk_cli: VdiskRunner, cache: str) -> None:
    """Every cache mode gives qemu-img's output; unsafe (the default) skips the syncs only."""
    for fmt in ("raw", "qcow2"):
        _same_as_qemu(src, vdisk_cli, ["-t", cache, "-T", "writeback", "-O", fmt, "top.qcow2"], fmt)


def test_convert_backing(src: Path, vdisk_cli: VdiskRunner) -> None:
    """-B / -o backing_file: the target names the backing file and holds only the source's
    own layer (zero clusters where it reads zeros), as qemu-img's does; also past the end
    of a backing file shorter than the source, and from a raw source."""
    _ok(qemu_img(["convert", "-O", "raw", "top.qcow2", "top.raw"], src))
    for args in (
        ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2"],
        ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "-S", "0", "top.qcow2"],
        ["-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.raw"],
    ):
        ours = vdisk_cli(["convert", *args, "ours.qcow2"], src)
        assert ours.rc == 0, (args, ours)
        info = json.loads(_ok(qemu_img(["info", "--output=json", "ours.qcow2"], src)).out)
        assert (info["backing-filename"], info["backing-filename-format"]) == (
            "base.qcow2",
            "qcow2",
        )
        _same_as_qemu(src, vdisk_cli, args, "qcow2")
    # -n -B: the existing target's header stays; only the source's own layer is written.
    # (Contents only: a zero write on a cluster of a target without a backing file leaves
    # it unallocated in QEMU, a zero cluster in vdisk.)
    for name in ("ours.qcow2", "theirs.qcow2"):
        _ok(qemu_img(["create", "-q", "-f", "qcow2", name, "12M"], src))
    args = ["-n", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"]
    assert vdisk_cli(["convert", *args, "ours.qcow2"], src).rc == 0
    _ok(qemu_img(["convert", *args, "theirs.qcow2"], src))
    _ok(qemu_img(["compare", "ours.qcow2", "theirs.qcow2"], src))
    assert "backing" not in _ok(qemu_img(["info", "ours.qcow2"], src)).out


def test_convert_backing_errors(src: Path, vdisk_cli: VdiskRunner) -> None:
    for args, message in (
        (["-O", "qcow2", "-B", "base.qcow2"], "Use of backing file requires explicit backing"),
        (["-O", "raw", "-B", "base.qcow2", "-F", "qcow2"], "not supported for file format 'raw'"),
        (["-O", "qcow2", "-F", "qcow2"], "Backing format cannot be used without backing file"),
        (["-O", "qcow2", "-B", "missing.qcow2", "-F", "qcow2"], "No such file or directory"),
    ):
        ours = vdisk_cli(["convert", *args, "top.qcow2", "x.qcow2"], src)
        assert ours.rc == 1 and message in ours.err and ours.err.count("\n") == 1, (args, ours)
        assert not (src / "x.qcow2").exists(), args
        assert qemu_img(["convert", *args, "top.qcow2", "x.qcow2"], src).rc == 1, args
        (src / "x.qcow2").unlink(missing_ok=True)


def test_convert_qcow2_options(src: Path, vdisk_cli: VdiskRunner) -> None:
    for opts in ("cluster_size=4k", "compat=0.10"):
        _same_as_qemu(src, vdisk_cli, ["-O", "qcow2", "-o", opts, "top.qcow2"], "qcow2")
    # The library allocates every subcluster of a cluster it writes to (qemu only those
    # written), so only the contents are compared here.
    args = ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "top.qcow2"]
    _same_as_qemu(src, vdisk_cli, args, "qcow2", same_map=False)


def _mixed_raw(path: Path, size: int) -> None:
    """Per 64 KiB: text, zeros, random bytes (they do not shrink), small-alphabet noise."""
    import random

    rng = random.Random(4)
    words = [rng.randbytes(4).hex().encode() for _ in range(50)]
    out = bytearray()
    for i in range(size // 65536 + 1):
        kind = i % 4
        if kind == 0:
            out += b" ".join(rng.choices(words, k=8000))[:65536]
        elif kind == 1:
            out += bytes(65536)
        elif kind == 2:
            out += rng.randbytes(65536)
        else:
            out += bytes(rng.randrange(3) for _ in range(65536))
    path.write_bytes(bytes(out[:size]))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed_like_qemu(src: Path, vdisk_cli: VdiskRunner, ctype: str) -> None:
    _mixed_raw(src / "mixed.img", 2 * 1024 * 1024 + 3 * 512)  # ends in a short cluster
    opt = f"compression_type={ctype}"
    for args in (
        ["-c", "-O", "qcow2", "-o", opt, "top.qcow2"],
        ["-c", "-f", "raw", "-O", "qcow2", "-o", opt, "mixed.img"],
        ["-c", "-f", "raw", "-O", "qcow2", "-o", f"{opt},cluster_size=4k", "mixed.img"],
        ["-c", "-O", "qcow2", "-o", f"{opt},cluster_size=2M", "top.qcow2"],
        ["-c", "-O", "qcow2", "-o", opt, "top.qcow2", "disk.img", "base.qcow2"],
        ["-c", "-O", "qcow2", "-o", opt, "-S", "0", "top.qcow2"],  # zero clusters compressed
        ["-c", "-O", "qcow2", "-o", opt, "-m", "1", "top.qcow2"],
    ):
        _same_as_qemu(src, vdisk_cli, args, "qcow2")
    # 512-byte clusters: qemu-img's parallel compressed writes allocate L2 tables in an
    # order of their own, so only the contents (and check) are compared.
    args = ["-c", "-f", "raw", "-O", "qcow2", "-o", f"{opt},cluster_size=512", "mixed.img"]
    _same_as_qemu(src, vdisk_cli, args, "qcow2", same_map=False)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_decompress_to_raw_like_qemu(src: Path, vdisk_cli: VdiskRunner, ctype: str) -> None:
    """qemu-img's compressed image to raw (clusters decoded in place, many per read): the same
    bytes and the same holes as qemu-img's own output, zero 4 KiB blocks inside decoded
    clusters included."""
    _mixed_raw(src / "mixed.img", 3 * 1024 * 1024 + 3 * 512)
    with open(src / "mixed.img", "r+b") as f:
        for at in (0, 70 * 1024, 1024 * 1024 + 8 * 1024):  # zero blocks in compressed clusters
            f.seek(at)
            f.write(bytes(8192))
    _ok(qemu_img(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                  f"compression_type={ctype}", "mixed.img", "c.qcow2"], src))  # fmt: skip
    for args in (["-O", "raw", "c.qcow2"], ["-O", "raw", "-S", "0", "c.qcow2"]):
        _same_as_qemu(src, vdisk_cli, args, "raw")


def test_convert_compressed_clusters_match_qemu(src: Path, vdisk_cli: VdiskRunner) -> None:
    """The same guest clusters end up compressed (and the random ones plain) as qemu-img's."""
    from vdisk.qcow2 import Qcow2Image
    from vdisk.qcow2 import format as fmt

    _mixed_raw(src / "mixed.img", 1024 * 1024)
    args = ["convert", "-c", "-f", "raw", "-O", "qcow2", "mixed.img"]
    assert vdisk_cli([*args, "ours.qcow2"], src).rc == 0
    _ok(qemu_img([*args, "theirs.qcow2"], src))
    kinds = []
    for name in ("ours.qcow2", "theirs.qcow2"):
        with Qcow2Image.open(str(src / name), readonly=True) as img:
            entries = [img.map.entry(gc)[0] for gc in range(16)]
        kinds.append(["c" if e & fmt.OFLAG_COMPRESSED else "d" if e else "-" for e in entries])
    assert kinds[0] == kinds[1] == ["c", "-", "d", "c"] * 4


def test_convert_compressed_into_existing(src: Path, vdisk_cli: VdiskRunner) -> None:
    """-n -c: zero clusters of the source overwrite the target's old data with zeros."""
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "old.qcow2", "12M"], src))
    qemu_io(["-c", "write -P 0xee 0 12M", "old.qcow2"], src)
    run = vdisk_cli(["convert", "-n", "-c", "-O", "qcow2", "top.qcow2", "old.qcow2"], src)
    assert run.rc == 0, run
    _ok(qemu_img(["compare", "top.qcow2", "old.qcow2"], src))
    check = _ok(qemu_img(["check", "old.qcow2"], src))
    assert check.out.startswith("No errors were found on the image.")


def test_convert_out_of_order(src: Path, vdisk_cli: VdiskRunner) -> None:
    for fmt in ("raw", "qcow2"):
        run = vdisk_cli(["convert", "-W", "-m", "4", "-O", fmt, "top.qcow2", f"w.{fmt}"], src)
        assert run.rc == 0, run
        _ok(qemu_img(["compare", "-F", fmt, "top.qcow2", f"w.{fmt}"], src))
    _ok(qemu_img(["check", "w.qcow2"], src))


def test_convert_into_existing(src: Path, vdisk_cli: VdiskRunner) -> None:
    """-n writes zeros where the source reads as zeros: old target data must go."""
    for fmt in ("raw", "qcow2"):
        _ok(qemu_img(["create", "-q", "-f", fmt, f"old.{fmt}", "12M"], src))
        qemu_io(["-f", fmt, "-c", "write -P 0xee 0 12M", f"old.{fmt}"], src)
        run = vdisk_cli(["convert", "-n", "-O", fmt, "top.qcow2", f"old.{fmt}"], src)
        assert run.rc == 0, run
        _ok(qemu_img(["compare", "-F", fmt, "top.qcow2", f"old.{fmt}"], src))


def test_convert_progress(src: Path, vdisk_cli: VdiskRunner) -> None:
    run = vdisk_cli(["convert", "-p", "-O", "raw", "top.qcow2", "p.raw"], src)
    assert run.rc == 0
    assert run.out.startswith("    (0.00/100%)\r") and run.out.endswith("    (100.00/100%)\r\n")


def test_convert_errors(src: Path, vdisk_cli: VdiskRunner) -> None:
    cases = [
        ["-c", "top.qcow2", "x.raw"],  # raw cannot hold compressed clusters
        ["-m", "17", "top.qcow2", "x.raw"],
        ["-m", "0", "top.qcow2", "x.raw"],
        ["-S", "1000", "top.qcow2", "x.raw"],
        ["-t", "bogus", "top.qcow2", "x.raw"],
        ["-T", "bogus", "top.qcow2", "x.raw"],
        ["top.qcow2"],
        ["missing.qcow2", "x.raw"],
        ["-n", "top.qcow2", "missing.raw"],
        ["-n", "top.qcow2", "disk.img"],  # smaller than the source
        ["-n", "-o", "cluster_size=4k", "top.qcow2", "disk.img"],
        ["-O", "vmdk2", "top.qcow2", "x.raw"],
        ["-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2", "x.raw"],
        ["-c", "-O", "qcow2", "-o", "preallocation=full", "top.qcow2", "x.raw"],
    ]
    for args in cases:
        ours = vdisk_cli(["convert", *args], src)
        assert ours.rc == 1 and ours.out == "" and ours.err.count("\n") == 1, (args, ours)
        assert not (src / "x.raw").exists(), args
        if "backing_file=base.qcow2" not in args:
            assert qemu_img(["convert", *args], src).rc == 1, args
            (src / "x.raw").unlink(missing_ok=True)  # qemu-img creates it before some checks


def _sparse_written_raw(path: Path, size: int, every: int, piece: int) -> None:
    """A raw file of ``size`` bytes with ``piece`` bytes of varied data every ``every`` bytes."""
    import os

    with path.open("wb") as f:
        f.truncate(size)
        block = os.urandom(piece)
        for i, off in enumerate(range(0, size, every)):
            f.seek(off)
            f.write(i.to_bytes(8, "big") + block[8:])


def _interrupt_when_written(
    cmd: list[str], dst: Path, written: int, signum: int
) -> tuple[int, str]:
    """Run cmd, send it signum once dst holds ``written`` bytes; its exit status and stderr."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if dst.exists() and dst.stat().st_size > written:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"{cmd[0]} convert ended before it could be interrupted"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_mid_convert_keeps_what_was_copied(tmp_path: Path, signame: str) -> None:
    """SIGTERM or SIGINT during a long `convert -O qcow2` kills vdisk by that signal, as it
    kills qemu-img (checked here too); but vdisk first flushes and closes the target: a valid
    image (qemu-img check: clean or leaks only) whose mapped data is the source's prefix
    (in-order writes: everything before the last mapped byte was copied)."""
    import os
    import signal
    import sys

    signum = getattr(signal, signame)
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    size = 4 << 30
    _sparse_written_raw(src, size, every=4 << 20, piece=1 << 20)  # 1 GiB of data
    theirs = tmp_path / "qemu.qcow2"
    qemu_cmd = ["qemu-img", "convert", "-t", "writethrough", "-O", "qcow2", str(src), str(theirs)]
    rc, err = _interrupt_when_written(qemu_cmd, theirs, 1 << 20, signum)
    assert rc == -signum, (rc, err)
    cmd = [sys.executable, "-m", "vdisk", "convert", "-m", "2", "-O", "qcow2", str(src), str(dst)]
    rc, err = _interrupt_when_written(cmd, dst, 48 << 20, signum)
    assert rc == -signum, (rc, err)
    assert err == ""
    check = qemu_img(["check", "-f", "qcow2", dst.name], tmp_path)
    assert check.rc in (0, 3), check  # clean, or leaked clusters only
    data = [e for e in _map(dst, "qcow2") if e["data"]]
    assert data, "the target maps none of what was copied"
    copied = max(int(str(e["start"])) + int(str(e["length"])) for e in data)
    assert 32 << 20 <= copied < size
    prefix = tmp_path / "prefix.raw"
    with src.open("rb") as f, prefix.open("wb") as out:
        out.write(f.read(copied))
    os.truncate(prefix, copied)
    same = qemu_img(["compare", "-f", "raw", "-F", "qcow2", prefix.name, dst.name], tmp_path)
    assert same.rc == 0, same


def test_convert_rate_limit(src: Path, vdisk_cli: VdiskRunner) -> None:
    """-r slows the copy (not timed here) and keeps qemu-img's output; bad rates refused."""
    _same_as_qemu(src, vdisk_cli, ["-r", "64M", "-O", "raw", "top.qcow2"], "raw")
    bad = vdisk_cli(["convert", "-r", "abc", "top.qcow2", "x.raw"], src)
    assert bad.rc == 1 and "Invalid rate limit specified" in bad.err and not bad.out
    assert qemu_img(["convert", "-r", "abc", "top.qcow2", "x.raw"], src).rc == 1


def test_convert_salvage(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """A compressed cluster that does not inflate: refused without --salvage; with it, one
    warning per unreadable sector and zeros in its place, as qemu-img --salvage."""
    import struct

    d = tmp_path
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "c.qcow2", "1M"], d))
    qemu_io(["-c", "write -c -P 9 0 64k", "-c", "write -P 8 64k 64k", "c.qcow2"], d)
    with (d / "c.qcow2").open("r+b") as f:
        f.seek(40)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(entry & ((1 << 54) - 1))  # the compressed data's host offset (64 KiB clusters)
        f.write(b"\xff" * 64)
    plain = vdisk_cli(["convert", "-O", "raw", "c.qcow2", "x.raw"], d)
    assert plain.rc == 1 and plain.err.count("\n") == 1
    ours = vdisk_cli(["convert", "--salvage", "-O", "raw", "c.qcow2", "ours.raw"], d)
    theirs = qemu_img(["convert", "--salvage", "-O", "raw", "c.qcow2", "theirs.raw"], d)
    assert (ours.rc, theirs.rc) == (0, 0)
    assert ours.err.count("warning: error while reading offset") == 128
    assert theirs.err.count("warning: error while reading offset") == 128
    assert (d / "ours.raw").read_bytes() == (d / "theirs.raw").read_bytes()


def _zero_block_raw(path: Path) -> None:
    """Data with zeros inside: whole 4 KiB blocks, runs not block aligned, a zero 512-byte
    sector, alternating blocks, 64 KiB of zeros mid-chunk, blocks whose first and last bytes
    are 0 around data, and a size that ends mid-block."""
    import random

    rng = random.Random(7)
    out = bytearray(rng.randbytes(3 << 20))
    zeros = ((4096, 4096), (20480, 12288), (1000, 7000), (70000, 512), (1 << 20, 65536),
             ((2 << 20) - 4096, 8192), (300000, 4095))  # fmt: skip
    for start, length in zeros:
        out[start : start + length] = bytes(length)
    for block in range(160, 200, 2):  # alternating zero and data blocks
        out[block * 4096 : (block + 1) * 4096] = bytes(4096)
    for block in range(210, 220):  # data between a zero first and last byte of each block
        out[block * 4096] = out[block * 4096 + 4095] = 0
        out[block * 4096 + 2000 : block * 4096 + 2095] = bytes(95)
    out[-3000:] = bytes(3000)  # a zero tail in the last, partial block
    path.write_bytes(bytes(out[:-1000]))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_zero_blocks_inside_data(tmp_path: Path, vdisk_cli: VdiskRunner, fmt: str) -> None:
    """-S: zero blocks inside data stay holes exactly where qemu-img leaves them (raw and
    qcow2 sources, several sparse sizes)."""
    _zero_block_raw(tmp_path / "data.img")
    _ok(qemu_img(["convert", "-f", "raw", "-O", "qcow2", "data.img", "data.qcow2"], tmp_path))
    for sparse in ("4k", "512", "8k", "64k"):
        for src_args in (["-f", "raw", "data.img"], ["data.qcow2"]):
            _same_as_qemu(tmp_path, vdisk_cli, ["-O", fmt, "-S", sparse, *src_args], fmt)
