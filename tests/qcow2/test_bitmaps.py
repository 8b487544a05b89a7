"""Persistent dirty bitmaps: qemu-img makes them and vdisk reads them identically; vdisk
changes them and maintains them on write, judged by qemu-img info/check and by qemu-nbd's
``qemu:dirty-bitmap:NAME`` context read with nbdinfo."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oracles import assert_check_clean, needs_qemu, qemu_img, qemu_io, run
from vdisk.errors import VdiskError
from vdisk.qcow2 import Qcow2Image, create
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.bitmap import BitmapError, _set_bit_range
from vdisk.qcow2.resize import resize

MiB = 1 << 20
KiB = 1024

needs_nbd = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("nbdinfo") is None,
    reason="qemu-nbd/nbdinfo are not installed",
)


# -- oracles -------------------------------------------------------------------------------
def qemu_bitmaps(path: Path) -> list[dict[str, object]]:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    data = info["format-specific"]["data"]
    bitmaps: list[dict[str, object]] = data.get("bitmaps", [])
    return bitmaps


@contextmanager
def qemu_nbd(path: Path, names: list[str]) -> Iterator[str]:
    """qemu-nbd serving ``path`` read-only with ``-B`` for each name; yields the URI."""
    sock = str(path) + ".sock"
    args = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", sock]
    for name in names:
        args += ["-B", name]
    proc = subprocess.Popen([*args, str(path)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"qemu-nbd exited: {proc.stderr.read() if proc.stderr else ''}"
                )
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def nbd_dirty(uri: str, name: str) -> list[tuple[int, int]]:
    """Dirty runs of qemu:dirty-bitmap:NAME as nbdinfo reads them (adjacent runs merged)."""
    out = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", uri))
    runs: list[tuple[int, int]] = []
    for e in out:
        if e["type"] & 1:
            if runs and runs[-1][0] + runs[-1][1] == e["offset"]:
                runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
            else:
                runs.append((e["offset"], e["length"]))
    return runs


def expected_runs(
    ranges: list[tuple[int, int]], granularity: int, size: int
) -> list[tuple[int, int]]:
    """Guest ranges rounded out to the granularity, merged, clipped to the disk."""
    marks: set[int] = set()
    for off, n in ranges:
        marks.update(range(off // granularity, (off + n - 1) // granularity + 1))
    runs: list[tuple[int, int]] = []
    for g in sorted(marks):
        start = g * granularity
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + granularity)
        else:
            runs.append((start, granularity))
    return [(o, min(n, size - o)) for o, n in runs]


def ours(path: Path, name: str) -> list[tuple[int, int]]:
    with Qcow2Image.open(str(path), readonly=True) as img:
        return img.bitmap(name).dirty_ranges()


def entry_flags(path: Path) -> dict[str, list[str]]:
    with Qcow2Image.open(str(path), readonly=True) as img:
        return {b.name: b.flags for b in img.bitmaps()}


# -- qemu-img makes, vdisk reads -------------------------------------------------------------
@needs_qemu
@needs_nbd
def test_qemu_bitmaps_read_identically(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 1M 64k", "write 10M 3M", "write 63M 4k")
    qemu_img("bitmap", "--add", "-g", "512k", str(img), "coarse")
    qemu_io(img, "write -z 20M 1M", "discard 40M 128k")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(img), "off")
    qemu_img("bitmap", "--merge", "b0", str(img), "off")
    with Qcow2Image.open(str(img), readonly=True) as q:
        listed = [(b.name, b.flags, b.granularity) for b in q.bitmaps()]
    theirs = [(b["name"], b["flags"], b["granularity"]) for b in qemu_bitmaps(img)]
    assert listed == theirs
    with qemu_nbd(img, ["b0", "coarse", "off"]) as uri:
        for name in ("b0", "coarse", "off"):
            assert ours(img, name) == nbd_dirty(uri, name), name
    assert ours(img, "b0")  # something was written


# -- vdisk changes, qemu-img agrees ---------------------------------------------------------
@needs_qemu
@needs_nbd
def test_vdisk_add_merge_clear_remove_agree_with_qemu(tmp_path: Path) -> None:
    img = tmp_path / "v.qcow2"
    create(str(img), 32 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("a")
        q.add_bitmap("fine", granularity=4 * KiB, enabled=False)
        q.add_bitmap("gone", granularity=1 * MiB)
        q.write(b"x" * 5000, 3 * MiB + 100)
        q.write_zeroes(8 * MiB, 2 * MiB)
        q.merge_bitmap("fine", "a")
        q.remove_bitmap("gone")
        q.add_bitmap("cleared")
        q.write(b"y" * 512, 20 * MiB)
        q.clear_bitmap("cleared")
    assert_check_clean(img)
    assert [(b["name"], b["flags"], b["granularity"]) for b in qemu_bitmaps(img)] == [
        ("a", ["auto"], 65536),
        ("fine", [], 4096),
        ("cleared", ["auto"], 65536),
    ]
    with qemu_nbd(img, ["a", "fine", "cleared"]) as uri:
        assert nbd_dirty(uri, "a") == [
            (3 * MiB, 64 * KiB),
            (8 * MiB, 2 * MiB),
            (20 * MiB, 64 * KiB),
        ]
        # "fine" got a's bits at a's granularity (a was merged before the third write).
        assert nbd_dirty(uri, "fine") == [(3 * MiB, 64 * KiB), (8 * MiB, 2 * MiB)]
        assert nbd_dirty(uri, "cleared") == []
    # QEMU takes the image back: its own writes keep maintaining what we stored.
    qemu_io(img, "write 30M 4k")
    with qemu_nbd(img, ["a"]) as uri:
        assert (30 * MiB, 64 * KiB) in nbd_dirty(uri, "a")
    assert_check_clean(img)


@needs_qemu
def test_remove_last_bitmap_drops_extension(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_img("bitmap", "--add", str(img), "only")
    with Qcow2Image.open(str(img)) as q:
        q.remove_bitmap("only")
        assert q.header.bitmaps is None
        assert not q.header.autoclear_features & fmt.AUTOCLEAR_BITMAPS
    assert qemu_bitmaps(img) == []
    assert_check_clean(img)


def test_refusals_are_one_line_errors(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    create(str(img), 8 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("b")
        with pytest.raises(BitmapError, match="Bitmap already exists: b"):
            q.add_bitmap("b")
        with pytest.raises(BitmapError, match="power of 2"):
            q.add_bitmap("c", granularity=1000)
        with pytest.raises(BitmapError, match="power of 2"):
            q.add_bitmap("c", granularity=1 << 32)
        with pytest.raises(BitmapError, match="exceeds maximum"):
            q.add_bitmap("n" * 1024)
        with pytest.raises(BitmapError, match="'nope' not found"):
            q.clear_bitmap("nope")
    v2 = tmp_path / "v2.qcow2"
    create(str(v2), MiB, compat="0.10")
    with Qcow2Image.open(str(v2)) as q, pytest.raises(BitmapError, match="v2 files"):
        q.add_bitmap("b")
    with Qcow2Image.open(str(img), readonly=True) as q, pytest.raises(VdiskError):
        q.add_bitmap("x")


# -- maintained on write --------------------------------------------------------------------
@needs_qemu
@needs_nbd
@pytest.mark.parametrize("granularity", [512, 64 * KiB, 512 * KiB])
def test_writes_are_tracked_exactly(tmp_path: Path, granularity: int) -> None:
    size = 48 * MiB
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(size))
    qemu_img("bitmap", "--add", "-g", str(granularity), str(img), "track")
    qemu_img("bitmap", "--add", "--disable", str(img), "frozen")
    rng = random.Random(granularity)
    done: list[tuple[int, int]] = []
    with Qcow2Image.open(str(img)) as q:
        for i in range(60):
            kind = rng.choice(["cluster", "small", "big", "zero", "discard", "compressed"])
            n = {
                "cluster": 64 * KiB,
                "compressed": 128 * KiB,
                "small": rng.randrange(1, 9000),
                "big": rng.randrange(64 * KiB, 3 * MiB),
                "zero": rng.randrange(512, 2 * MiB),
                "discard": rng.randrange(64 * KiB, 2 * MiB),
            }[kind]
            align = 64 * KiB if kind in ("cluster", "compressed") else 1
            off = rng.randrange(0, (size - n) // align + 1) * align
            if kind == "zero":
                q.write_zeroes(off, n, may_unmap=bool(i & 1))
            elif kind == "discard":
                q.discard(off, n)
            elif kind == "compressed":
                q.write_compressed(bytes([i]) * n, off)
            else:
                q.write(rng.randbytes(n), off)  # repeated clusters take the in-place fast path
            done.append((off, n))
        q.write(b"z" * 4096, size - 4096)  # the last granule, clipped at the disk's end
        done.append((size - 4096, 4096))
        q.flush()
        # While open, the stored bitmap says in-use: a crash now leaves it inconsistent.
        assert "in-use" in qemu_bitmaps_shared(img)["track"]
        assert "in-use" not in qemu_bitmaps_shared(img)["frozen"]
    assert_check_clean(img)
    want = expected_runs(done, granularity, size)
    assert ours(img, "track") == want
    with qemu_nbd(img, ["track", "frozen"]) as uri:
        assert nbd_dirty(uri, "track") == want
        assert nbd_dirty(uri, "frozen") == []
    assert entry_flags(img) == {"track": ["auto"], "frozen": []}
    with Qcow2Image.open(str(img), readonly=True) as q:
        assert q.header.autoclear_features & fmt.AUTOCLEAR_BITMAPS


def qemu_bitmaps_shared(path: Path) -> dict[str, object]:
    """Flags as qemu-img info -U sees them beside our open image."""
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


@needs_qemu
def test_crash_leaves_bitmap_in_use_never_stale(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    qemu_img("bitmap", "--add", str(img), "b")
    code = (
        "import os, sys\n"
        "from vdisk.qcow2 import Qcow2Image\n"
        "img = Qcow2Image.open(sys.argv[1])\n"
        "img.write(b'x' * 4096, 1 << 20)\n"
        "img.flush()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(img)], check=True)
    assert qemu_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]
    assert_check_clean(img)
    # Inconsistent stays inconsistent: a later session neither uses nor clears it.
    with Qcow2Image.open(str(img)) as q:
        with pytest.raises(BitmapError, match="inconsistent"):
            q.bitmap("b")
        with pytest.raises(BitmapError, match="inconsistent"):
            q.clear_bitmap("b")
        q.write(b"y" * 512, 0)
    assert entry_flags(img) == {"b": ["in-use", "auto"]}
    with Qcow2Image.open(str(img)) as q:
        q.remove_bitmap("b")  # removing is the way out, as in QEMU
    assert qemu_bitmaps(img) == []
    assert_check_clean(img)


def test_damaged_bitmaps(tmp_path: Path) -> None:
    """A directory counting more entries than it holds: refused at open in one line, the file
    untouched. A table too small for the disk: the image opens and takes writes, and that
    bitmap, which cannot be kept consistent, is stored IN_USE and stays so."""
    img = tmp_path / "d.qcow2"
    create(str(img), 8 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("b")
    with Qcow2Image.open(str(img), readonly=True) as q:
        ext = q.header.bitmaps  # where close stored the directory
        assert ext is not None
    good = img.read_bytes()
    data = bytearray(good)
    pos = data.find(struct.pack(">I", fmt.EXT_BITMAPS), 104)
    struct.pack_into(">I", data, pos + 8, 2)  # nb_bitmaps: 2, one entry stored
    img.write_bytes(bytes(data))
    with pytest.raises(VdiskError, match="bitmap directory") as err:
        Qcow2Image.open(str(img))
    assert "\n" not in str(err.value)
    assert img.read_bytes() == bytes(data)
    data = bytearray(good)
    struct.pack_into(">I", data, ext.directory_offset + 8, 0)  # bitmap_table_size: 0
    img.write_bytes(bytes(data))
    with Qcow2Image.open(str(img)) as q:
        assert q.bitmaps()[0].in_use
        q.write(b"x" * 512, 0)
    assert entry_flags(img) == {"b": ["in-use", "auto"]}


# -- resize, merge across images --------------------------------------------------------------
@needs_qemu
@needs_nbd
def test_resize_keeps_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "10M")
    qemu_img("bitmap", "--add", str(img), "b")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(img), "d")
    qemu_io(img, "write 1M 64k", "write 9M 64k")
    qemu_img("bitmap", "--merge", "b", str(img), "d")
    with Qcow2Image.open(str(img)) as q:
        resize(q, 100 * MiB)
        q.write(b"n" * 512, 80 * MiB)
    assert_check_clean(img)
    with qemu_nbd(img, ["b", "d"]) as uri:
        assert nbd_dirty(uri, "b") == [(MiB, 64 * KiB), (9 * MiB, 64 * KiB), (80 * MiB, 64 * KiB)]
        assert nbd_dirty(uri, "d") == [(MiB, 64 * KiB), (9 * MiB, 64 * KiB)]
    with Qcow2Image.open(str(img)) as q:
        resize(q, 5 * MiB)
    assert_check_clean(img)
    with qemu_nbd(img, ["b", "d"]) as uri:
        assert nbd_dirty(uri, "b") == [(MiB, 64 * KiB)]
        assert nbd_dirty(uri, "d") == [(MiB, 64 * KiB)]


@needs_qemu
def test_resize_refuses_inconsistent_bitmap(tmp_path: Path) -> None:
    img = tmp_path / "i.qcow2"
    create(str(img), 8 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("b")
    data = bytearray(img.read_bytes())
    with Qcow2Image.open(str(img), readonly=True) as q:
        ext = q.header.bitmaps
        assert ext is not None
    flags_at = ext.directory_offset + 12
    struct.pack_into(">I", data, flags_at, fmt.BME_FLAG_IN_USE | fmt.BME_FLAG_AUTO)
    img.write_bytes(bytes(data))
    with Qcow2Image.open(str(img)) as q, pytest.raises(BitmapError, match="inconsistent"):
        resize(q, 16 * MiB)
    with Qcow2Image.open(str(img), readonly=True) as q:
        assert q.size == 8 * MiB
    assert_check_clean(img)


def test_merge_from_another_image_and_granularity(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(str(a), 16 * MiB)
    create(str(b), 16 * MiB)
    with Qcow2Image.open(str(a)) as qa:
        qa.add_bitmap("src", granularity=4 * KiB)
        qa.write(b"x" * 100, 5 * MiB + 10)
    with Qcow2Image.open(str(b)) as qb, Qcow2Image.open(str(a), readonly=True) as qa:
        qb.add_bitmap("dst", granularity=1 * MiB, enabled=False)
        qb.merge_bitmap("dst", "src", source_image=qa)
        assert qb.bitmap("dst").dirty_ranges() == [(5 * MiB, MiB)]
    other = tmp_path / "other.qcow2"
    create(str(other), 8 * MiB)
    with Qcow2Image.open(str(other)) as qo, Qcow2Image.open(str(a), readonly=True) as qa:
        qo.add_bitmap("x")
        with pytest.raises(BitmapError, match="different sizes"):
            qo.merge_bitmap("x", "src", source_image=qa)


# -- the bit setter the write paths use ------------------------------------------------------
@given(st.integers(0, 200), st.integers(0, 200))
def test_set_bit_range_matches_bit_by_bit(a: int, b: int) -> None:
    first, last = min(a, b), max(a, b)
    fast = bytearray(32)
    _set_bit_range(fast, first, last)
    slow = bytearray(32)
    for i in range(first, last + 1):
        slow[i >> 3] |= 1 << (i & 7)
    assert fast == slow


def test_readonly_open_reads_nothing_until_asked(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    create(str(img), 4 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("b")
        q.write(b"1" * 512, 0)
    with Qcow2Image.open(str(img), readonly=True) as q:
        assert not q._bitmaps.items and not q._tracked
        (bm,) = q.bitmaps()
        assert not bm.loaded
        assert bm.dirty_ranges() == [(0, 64 * KiB)]
    assert os.path.getsize(img) > 0


@needs_qemu
def test_store_bitmaps_mid_session_and_tracking_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_img("bitmap", "--add", str(img), "b")
    with Qcow2Image.open(str(img)) as q:
        q.write(b"1" * 512, 0)
        assert qemu_bitmaps_shared(img)["b"] == ["in-use", "auto"]
        q.store_bitmaps()
        assert qemu_bitmaps_shared(img)["b"] == ["auto"]
        q.write(b"2" * 512, 2 * MiB)  # marked in use again before it lands
        assert qemu_bitmaps_shared(img)["b"] == ["in-use", "auto"]
    assert ours(img, "b") == [(0, 64 * KiB), (2 * MiB, 64 * KiB)]
    assert_check_clean(img)
    # Bits past the tracking budget are not loaded: that bitmap cannot follow the writes,
    # so it is stored in use and stays so.
    monkeypatch.setattr("vdisk.qcow2.bitmap.MAX_TRACKED_BYTES", 8)
    with Qcow2Image.open(str(img)) as q:
        q.write(b"3" * 512, 4 * MiB)
    assert entry_flags(img) == {"b": ["in-use", "auto"]}
    assert_check_clean(img)


@needs_qemu
def test_bitmap_added_after_first_write_is_stored_in_use(tmp_path: Path) -> None:
    """Added or enabled while the image is being written: stored IN_USE until close, so a
    crash right after leaves it inconsistent, not stale."""
    img = tmp_path / "late.qcow2"
    create(str(img), 8 * MiB)
    with Qcow2Image.open(str(img)) as q:
        q.add_bitmap("off", enabled=False)
        q.write(b"1" * 512, 0)
        q.add_bitmap("late")
        q.enable_bitmap("off")
        assert qemu_bitmaps_shared(img) == {"off": ["in-use", "auto"], "late": ["in-use", "auto"]}
        q.write(b"2" * 512, 3 * MiB)
    assert entry_flags(img) == {"off": ["auto"], "late": ["auto"]}
    assert ours(img, "late") == [(3 * MiB, 64 * KiB)]
    assert_check_clean(img)


@needs_qemu
def test_snapshot_apply_marks_tracked_bitmaps_dirty(tmp_path: Path) -> None:
    """A revert changes data no write reported: every tracked bitmap covers the whole disk
    after it, so an incremental backup copies what the revert changed."""
    size = 4 * MiB
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(size))
    qemu_img("snapshot", "-c", "before", str(img))
    qemu_img("bitmap", "--add", str(img), "track")
    with Qcow2Image.open(str(img)) as q:
        q.write(b"x" * 4096, 0)
        q.apply_snapshot("before")
        assert q.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
    assert_check_clean(img)
    assert ours(img, "track") == [(0, size)]
    assert "in-use" not in entry_flags(img)["track"]
