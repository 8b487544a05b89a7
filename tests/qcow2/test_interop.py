"""Interop with qemu-img/qemu-io 7.2 both ways."""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path

import pytest

import vdisk
from oracles import (
    assert_check_clean,
    assert_compare_equal,
    needs_qemu,
    qemu_io,
    qemu_map,
    qemu_to_raw,
    run,
)
from vdisk.qcow2 import Qcow2Image, create

pytestmark = needs_qemu


def read_all(path: Path, **kw: object) -> bytes:
    with Qcow2Image.open(str(path), readonly=True, **kw) as img:
        buf = bytearray(img.size)
        # Read in odd-sized pieces so requests straddle clusters and L2 tables.
        pos = 0
        step = 3 * 65536 + 4097
        while pos < img.size:
            n = min(step, img.size - pos)
            img.readinto(memoryview(buf)[pos : pos + n], pos)
            pos += n
        return bytes(buf)


def fill_with_qemu_io(path: Path, size: int, seed: int, count: int = 12) -> None:
    rng = random.Random(seed)
    cmds = []
    for _ in range(count):
        off = rng.randrange(0, size // 512) * 512
        n = min(rng.choice([512, 4096, 65536, 300 * 512, 1 << 20]), size - off)
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    off = rng.randrange(0, (size - 131072) // 65536) * 65536
    cmds.append(f"write -z {off} 131072")
    qemu_io(path, *cmds)


# -- images QEMU made, read by us --------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=16384,refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "compat=0.10",
        "compat=0.10,cluster_size=2M",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=32768",
    ],
)
def test_read_qemu_images(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "q.qcow2"
    size = 24 << 20
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, str(size))
    fill_with_qemu_io(img, size, seed=zlib.crc32(opts.encode()))
    expected = qemu_to_raw(img, tmp_path / "q.raw")
    assert read_all(img) == expected


def test_read_multi_l2_and_multi_cluster_l1(tmp_path: Path) -> None:
    # 512-byte clusters: one L2 table maps 32 KiB, the L1 spans many clusters.
    img = tmp_path / "q.qcow2"
    size = 64 << 20
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, str(size))
    qemu_io(img, "write -P 7 30000 70000", "write -P 9 63000000 1000000")
    assert read_all(img) == qemu_to_raw(img, tmp_path / "q.raw")


def test_read_backing_chains(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    size = 8 << 20
    base.write_bytes(os.urandom(6 << 20))  # shorter than the overlays: the rest reads as zeros
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, str(size))
    qemu_io(mid, "write -P 1 1000 70000", "write -z 2M 128k")
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top,
        str(size + (1 << 20)),
    )
    qemu_io(top, "write -P 2 4096 4096", "write -P 3 7M 1M", "discard 1M 64k")
    expected = qemu_to_raw(top, tmp_path / "top.raw")
    assert read_all(top) == expected
    with Qcow2Image.open(str(top), readonly=True) as t:
        assert t.backing is not None


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 1 0 1M", "write -z 2M 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
    qemu_io(top, "write -P 2 512k 1M", "write -z 3M 64k")
    expected = qemu_map(top)
    with vdisk.open(str(top), readonly=True) as t:
        got = t.block_status(0, t.size)
    ours = [
        {
            "start": e.offset,
            "length": e.length,
            "depth": e.depth,
            "present": e.present,
            "zero": e.zero,
            "data": e.data,
            **({"offset": e.host_offset} if e.host_offset is not None else {}),
        }
        for e in got
    ]
    theirs = [{k: v for k, v in m.items() if k != "compressed"} for m in expected]
    assert ours == theirs


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_read_compressed(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    data = bytearray()
    for _ in range(40):  # compressible text-like content, plus zeros and random bits
        data += bytes(rng.choice(b"abcdefgh") for _ in range(1)) * rng.randrange(1, 90000)
    data += os.urandom(100000) + bytes(200000)
    data += bytes(-len(data) % 512)
    src.write_bytes(data)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, img)
    assert read_all(img) == bytes(data)
    # Overwriting part of a compressed cluster moves it to a new plain cluster.
    with Qcow2Image.open(str(img)) as w:
        w.write(b"Z" * 1000, 70000)
        data[70000:71000] = b"Z" * 1000
    assert read_all(img) == bytes(data)
    assert_check_clean(img)


def test_lazy_refcounts_dirty_image(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    # Kill qemu-io after writing: the dirty bit stays set and refcounts are not written.
    os.system(
        f"qemu-io -f qcow2 -c 'write -P 5 0 3M' -c 'write -P 6 8M 64k' -c 'sigraise 9' {img} >/dev/null 2>&1"
    )
    info = json.loads(run("qemu-img", "info", "--output=json", img))
    assert info["dirty-flag"] is True
    expected = bytes([5]) * (3 << 20) + bytes(5 << 20) + bytes([6]) * 65536
    expected += bytes((16 << 20) - len(expected))
    assert read_all(img) == expected  # read-only: as is
    with Qcow2Image.open(str(img)) as w:  # read-write: refcounts rebuilt first
        assert not w.header.dirty
        w.write(b"after", 12 << 20)
    assert_check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img))
    assert info["dirty-flag"] is False


# -- images we made, checked by QEMU ------------------------------------------------------
CREATE_OPTS = [
    {},
    {"compat": "0.10"},
    {"cluster_size": 512},
    {"cluster_size": 2 << 20},
    {"refcount_bits": 1, "cluster_size": 4096},
    {"refcount_bits": 2},
    {"refcount_bits": 8},
    {"refcount_bits": 64},
    {"lazy_refcounts": True},
    {"extended_l2": True},
    {"compression_type": "zstd"},
]


@pytest.mark.parametrize(
    "opts", CREATE_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_write_then_qemu_check_and_compare(tmp_path: Path, opts: dict[str, object]) -> None:
    img = tmp_path / "w.qcow2"
    size = 12 << 20
    create(str(img), size, **opts)  # type: ignore[arg-type]
    assert_check_clean(img)
    rng = random.Random(str(opts))
    model = bytearray(size)
    cs = int(opts.get("cluster_size", 65536))  # type: ignore[call-overload]
    with Qcow2Image.open(str(img)) as w:
        for i in range(120):
            off = rng.randrange(0, size)
            n = min(rng.choice([1, 511, 4096, cs, 2 * cs + 100, 300000]), size - off)
            r = rng.random()
            if r < 0.6:
                data = os.urandom(n)
                w.write(data, off)
                model[off : off + n] = data
            elif r < 0.75:
                w.write_zeroes(off, n, may_unmap=bool(i % 2))
                model[off : off + n] = bytes(n)
            elif r < 0.85:
                w.discard(off, n)
                w.readinto(memoryview(model)[off : off + n], off)
            elif r < 0.9:
                w.flush()
            else:
                assert w.pread(n, off) == model[off : off + n]
        assert w.pread(size, 0) == model
    raw = tmp_path / "w.raw"
    raw.write_bytes(model)
    assert_check_clean(img)
    assert_compare_equal(img, raw)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_create_preallocation(tmp_path: Path, prealloc: str) -> None:
    img = tmp_path / "p.qcow2"
    create(str(img), 5 << 20, preallocation=prealloc)
    assert_check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img))
    assert info["virtual-size"] == 5 << 20
    m = qemu_map(img)
    assert all(e["data"] for e in m)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"q" * 5000, 1 << 20)
    assert_check_clean(img)


def test_create_huge_multi_cluster_tables(tmp_path: Path) -> None:
    img = tmp_path / "big.qcow2"
    create(str(img), 8 << 40, cluster_size=4096)  # L1 of many clusters
    assert_check_clean(img)
    with Qcow2Image.open(str(img)) as w:
        assert w.header.l1_size * 8 > 4096
        for off in (0, 3 << 40, (8 << 40) - 4096):
            w.write(b"edge" * 1024, off)
    assert_check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img))
    assert info["virtual-size"] == 8 << 40


def test_refcount_table_growth(tmp_path: Path) -> None:
    # 512-byte clusters and 64-bit refcounts: one refcount block covers 64 clusters, one
    # table cluster 64 blocks; writing 4 MiB needs new blocks and a larger table.
    img = tmp_path / "g.qcow2"
    create(str(img), 8 << 20, cluster_size=512, refcount_bits=64)
    data = os.urandom(4 << 20)
    with Qcow2Image.open(str(img)) as w:
        w.write(data, 1 << 20)
    assert_check_clean(img)
    with Qcow2Image.open(str(img), readonly=True) as r:
        assert r.pread(len(data), 1 << 20) == data
        assert r.header.refcount_table_clusters > 1


def test_backing_file_create_and_cow(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "3M")
    qemu_io(base, "write -P 0x11 0 3M")
    top = tmp_path / "sub" / "top.qcow2"
    top.parent.mkdir()
    create(str(top), None, backing_file="../base.qcow2", backing_fmt="qcow2")
    with Qcow2Image.open(str(top)) as t:
        assert t.size == 3 << 20
        t.write(b"\x22" * 100, 65536 + 1000)  # partial cluster: COW from the backing file
        t.write_zeroes(2 << 20, 65536)
    expected = bytearray(b"\x11" * (3 << 20))
    expected[65536 + 1000 : 65536 + 1100] = b"\x22" * 100
    expected[2 << 20 : (2 << 20) + 65536] = bytes(65536)
    assert qemu_to_raw(top, tmp_path / "t.raw") == expected
    assert_check_clean(top)
    info = json.loads(run("qemu-img", "info", "--output=json", top))
    assert info["backing-filename"] == "../base.qcow2"
    assert info["backing-filename-format"] == "qcow2"


def test_v2_zero_with_backing_writes_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x33" * (1 << 20))
    top = tmp_path / "top.qcow2"
    create(str(top), None, compat="0.10", backing_file="base.raw", backing_fmt="raw")
    with Qcow2Image.open(str(top)) as t:
        t.write_zeroes(0, 1 << 20, may_unmap=True)
        assert t.pread(1 << 20, 0) == bytes(1 << 20)
    assert qemu_to_raw(top, tmp_path / "t.raw") == bytes(1 << 20)
    assert_check_clean(top)


def test_discard_reuses_clusters(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    create(str(img), 64 << 20)
    with Qcow2Image.open(str(img)) as w:
        w.write(os.urandom(8 << 20), 0)
        w.flush()
        size_before = os.path.getsize(img)
        w.discard(0, 8 << 20)
        w.write(os.urandom(8 << 20), 32 << 20)
        w.flush()
        assert os.path.getsize(img) <= size_before
    assert_check_clean(img)


def test_qemu_writes_to_our_image(tmp_path: Path) -> None:
    img = tmp_path / "o.qcow2"
    create(str(img), 4 << 20, cluster_size=4096)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"\x44" * 10000, 5000)
    qemu_io(img, "write -P 0x55 8192 4096")
    expected = bytearray(4 << 20)
    expected[5000:15000] = b"\x44" * 10000
    expected[8192 : 8192 + 4096] = b"\x55" * 4096
    assert read_all(img) == expected
    assert_check_clean(img)


INFO_OPTS = [
    "compat=0.10",
    "compat=1.1,lazy_refcounts=on",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=2M,refcount_bits=64",
    "extended_l2=on",
    "compression_type=zstd",
    "preallocation=metadata",
    "preallocation=metadata,extended_l2=on",
    "preallocation=falloc,compat=0.10",
]


@pytest.mark.parametrize("opts", INFO_OPTS)
def test_create_matches_qemu_info(tmp_path: Path, opts: str) -> None:
    theirs = tmp_path / "theirs.qcow2"
    ours = tmp_path / "ours.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, theirs, "100M")
    kw = dict(kv.split("=") for kv in opts.split(","))
    create(str(ours), 100 << 20, **kw)
    assert_check_clean(ours)

    def info(p: Path) -> dict[str, object]:
        data = json.loads(run("qemu-img", "info", "--output=json", p))
        for k in ("filename", "actual-size"):
            data.pop(k, None)
        return data  # type: ignore[no-any-return]

    assert info(ours) == info(theirs)
    mine = [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(ours)]
    ref = [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(theirs)]
    assert mine == ref
