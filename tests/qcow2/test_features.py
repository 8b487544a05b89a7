"""Feature bits, backing chain rules, overlap checks and subclusters."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_io, qemu_to_raw, run
from vdisk.errors import BackingChainError, CorruptImageError, UnsupportedFeatureError
from vdisk.qcow2 import Qcow2Image, create
from vdisk.qcow2 import format as fmt

pytestmark = needs_qemu


def set_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def get_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def test_corrupt_bit_allows_read_only(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    create(str(img), 1 << 20)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"data", 0)
    set_u64(img, 72, fmt.INCOMPAT_CORRUPT)
    with Qcow2Image.open(str(img), readonly=True) as r:
        assert r.pread(4, 0) == b"data"
    with pytest.raises(CorruptImageError, match="corrupt"):
        Qcow2Image.open(str(img))


def test_unknown_incompatible_bit_is_named(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    create(str(img), 1 << 20)
    # Put a name for bit 9 in the feature table, then set the bit.
    with Qcow2Image.open(str(img), readonly=True) as r:
        h = r.header.copy()
    names = h.feature_names
    names[(0, 9)] = "teleportation"
    h.set_extension(fmt.EXT_FEATURE_TABLE, fmt.encode_feature_table(names))
    h.incompatible_features |= 1 << 9
    with open(img, "r+b") as f:
        f.write(h.encode())
    with pytest.raises(UnsupportedFeatureError, match="teleportation"):
        Qcow2Image.open(str(img), readonly=True)
    # Without a name: the bit number.
    h.set_extension(fmt.EXT_FEATURE_TABLE, None)
    with open(img, "r+b") as f:
        f.write(h.encode() + bytes(512))
    with pytest.raises(UnsupportedFeatureError, match="bit 9"):
        Qcow2Image.open(str(img), readonly=True)


def test_unknown_autoclear_bits_cleared_on_first_write(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(str(img), 1 << 20)
    set_u64(img, 88, 1 << 40)
    with Qcow2Image.open(str(img)) as w:
        w.pread(10, 0)
        assert get_u64(img, 88) == 1 << 40  # reads leave it alone
        w.write(b"x", 0)
        assert get_u64(img, 88) == 0
    assert_check_clean(img)


def test_lazy_refcounts_dirty_bit_lifecycle(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    create(str(img), 4 << 20, lazy_refcounts=True)
    w = Qcow2Image.open(str(img))
    assert not get_u64(img, 72) & fmt.INCOMPAT_DIRTY
    w.write(b"y" * 70000, 100)
    assert get_u64(img, 72) & fmt.INCOMPAT_DIRTY  # set on the first write
    w.flush()
    # A crash now (no close): QEMU sees a dirty image and can still read it.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", img))
    assert info["dirty-flag"] is True
    w.close()
    assert not get_u64(img, 72) & fmt.INCOMPAT_DIRTY
    assert_check_clean(img)


def test_rebuild_after_simulated_crash(tmp_path: Path) -> None:
    """Refcounts wrong on disk (dirty bit set): a read-write open repairs them."""
    img = tmp_path / "r.qcow2"
    create(str(img), 8 << 20, lazy_refcounts=True, cluster_size=4096)
    with Qcow2Image.open(str(img)) as w:
        w.write(os.urandom(1 << 20), 0)
    # Zero one refcount block on disk and set the dirty bit.
    with Qcow2Image.open(str(img), readonly=True) as r:
        block_off = r.refcounts.table[0]
    with open(img, "r+b") as f:
        f.seek(block_off)
        f.write(bytes(4096))
    set_u64(img, 72, fmt.INCOMPAT_DIRTY)
    expected = qemu_to_raw(img, tmp_path / "r.raw")
    with Qcow2Image.open(str(img)) as w:
        assert w.pread(1 << 20, 0) == expected[: 1 << 20]
        w.write(b"more", 5 << 20)
    assert_check_clean(img)


def test_backing_loop_and_depth(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    create(str(a), 1 << 20)
    create(str(b), 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2")
    # Point a at b: a loop.
    with Qcow2Image.open(str(a), readonly=True) as r:
        h = r.header.copy()
    h.backing_file = "b.qcow2"
    h.set_extension(fmt.EXT_BACKING_FORMAT, b"qcow2")
    with open(a, "r+b") as f:
        f.write(h.encode())
    with pytest.raises(BackingChainError, match="loop"):
        Qcow2Image.open(str(b), readonly=True)
    # A chain of 66 images is too deep.
    prev = "base.qcow2"
    create(str(tmp_path / prev), 1 << 20)
    for i in range(66):
        name = f"l{i}.qcow2"
        create(str(tmp_path / name), 1 << 20, backing_file=prev, backing_fmt="qcow2")
        prev = name
    with pytest.raises(BackingChainError, match="deeper"):
        Qcow2Image.open(str(tmp_path / prev), readonly=True)
    with Qcow2Image.open(str(tmp_path / "l60.qcow2"), readonly=True) as r:
        assert r.pread(4096, 0) == bytes(4096)


def test_missing_backing_file(tmp_path: Path) -> None:
    img = tmp_path / "m.qcow2"
    create(str(img), 1 << 20, backing_file="gone.qcow2", backing_fmt="qcow2")
    with pytest.raises(BackingChainError, match=r"gone\.qcow2"):
        Qcow2Image.open(str(img), readonly=True)
    with Qcow2Image.open(str(img), readonly=True, open_backing=False) as r:
        assert r.backing is None
        assert r.header.backing_file == "gone.qcow2"


def test_read_past_backing_end_is_zero(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x77" * 5000)  # not even a sector multiple
    top = tmp_path / "top.qcow2"
    create(str(top), 1 << 20, backing_file="base.raw", backing_fmt="raw")
    with Qcow2Image.open(str(top)) as t:
        got = t.pread(10000, 0)
        assert got == b"\x77" * 5000 + bytes(5000)
        t.write(b"\x01", 4000)  # COW across the parent's end
    expected = bytearray(b"\x77" * 5000 + bytes((1 << 20) - 5000))
    expected[4000] = 1
    assert qemu_to_raw(top, tmp_path / "t.raw") == expected
    assert_check_clean(top)


def test_overlap_check_refuses_write_onto_metadata(tmp_path: Path) -> None:
    img = tmp_path / "o.qcow2"
    create(str(img), 1 << 20)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"a", 0)
        l1_off = w.header.l1_table_offset
        l2_off = w.map.l1[0] & fmt.L1E_OFFSET_MASK
    # Guest cluster 0 now claims to live on the L1 table.
    set_u64(img, l2_off, l1_off | fmt.OFLAG_COPIED)
    with Qcow2Image.open(str(img)) as w:
        with pytest.raises(CorruptImageError, match="metadata"):
            w.write(b"evil" * 1024, 0)
        assert w.readonly
    assert get_u64(img, 72) & fmt.INCOMPAT_CORRUPT
    assert get_u64(img, l1_off) & fmt.L1E_OFFSET_MASK == l2_off  # L1 intact


def test_extended_l2_subclusters_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 0x11 0 2M")
    top = tmp_path / "top.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
        "2M",
    )
    # Subclusters of 2 KiB: allocate some, zero some, leave the rest to the backing file.
    qemu_io(top, "write -P 0x22 2048 2048", "write -z 8192 4096", "write -P 0x33 65536 1000")
    expected = bytearray(qemu_to_raw(top, tmp_path / "t.raw"))
    with Qcow2Image.open(str(top)) as t:
        assert t.pread(len(expected), 0) == expected
        # Partial write into a partly allocated cluster: the rest keeps its per-subcluster
        # content (backing, zero, allocated).
        t.write(b"\x44" * 100, 5000)
        expected[5000:5100] = b"\x44" * 100
        t.write_zeroes(30000, 5000)
        expected[30000:35000] = bytes(5000)
        assert t.pread(len(expected), 0) == expected
    assert qemu_to_raw(top, tmp_path / "t2.raw") == expected
    assert_check_clean(top)


def test_fua_and_flush(tmp_path: Path) -> None:
    img = tmp_path / "f.qcow2"
    create(str(img), 1 << 20)
    with vdisk.open(str(img)) as w:
        w.write(b"durable", 4096, fua=True)
        # Without close, QEMU (sharing the file, read-only beside our writer as -U allows)
        # already sees the data and the metadata.
        out = run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x64 4096 1", img)  # 'd'
        assert "read 1/1" in out


def test_write_with_internal_snapshot_cows(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x10 0 2M", "write -c -P 0x20 2M 128k")
    run("qemu-img", "snapshot", "-c", "snap1", img)
    snap_raw = qemu_to_raw(img, tmp_path / "before.raw")
    expected = bytearray(snap_raw)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"\x99" * 5000, 1000)  # shared L2 table and shared data cluster: both copied
        expected[1000:6000] = b"\x99" * 5000
        w.write_zeroes(1 << 20, 65536)
        expected[1 << 20 : (1 << 20) + 65536] = bytes(65536)
        w.discard(3 << 20, 1 << 20)  # nothing there: stays zero
        w.write(b"\x98" * 100, (2 << 20) + 10)  # compressed + shared
        expected[(2 << 20) + 10 : (2 << 20) + 110] = b"\x98" * 100
        assert w.pread(len(expected), 0) == expected
    assert_check_clean(img)
    assert qemu_to_raw(img, tmp_path / "active.raw") == expected
    run("qemu-img", "convert", "-l", "snap1", "-O", "raw", img, tmp_path / "snap.raw")
    assert (tmp_path / "snap.raw").read_bytes() == snap_raw


def test_hostile_l2_entries_give_clean_errors(tmp_path: Path) -> None:
    img = tmp_path / "h.qcow2"
    create(str(img), 1 << 20)
    with Qcow2Image.open(str(img)) as w:
        w.write(b"a" * 65536, 0)
        w.write(b"b" * 65536, 65536)
        l2_off = w.map.l1[0] & fmt.L1E_OFFSET_MASK
        host1 = get_u64(img, l2_off + 8) & fmt.L2E_OFFSET_MASK
    # Entry 0: a misaligned host offset; entry 1: a compressed descriptor over plain data.
    set_u64(img, l2_off, (5 << 16) + 4096 | fmt.OFLAG_COPIED)
    set_u64(img, l2_off + 8, fmt.encode_compressed(host1, 3000, 16))
    with Qcow2Image.open(str(img), readonly=True) as r:
        with pytest.raises(CorruptImageError, match="aligned"):
            r.pread(10, 0)
        with pytest.raises(CorruptImageError, match="compressed"):
            r.pread(10, 65536)
        assert r.pread(10, 2 * 65536) == bytes(10)  # the rest still reads


def test_l1_pointing_past_eof_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    create(str(img), 1 << 20)
    with Qcow2Image.open(str(img), readonly=True) as r:
        l1_off = r.header.l1_table_offset
    set_u64(img, l1_off, (1 << 40) | fmt.OFLAG_COPIED)
    with pytest.raises(CorruptImageError, match="L1 entry 0"):
        Qcow2Image.open(str(img), readonly=True)
