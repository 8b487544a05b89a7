"""`vdisk check` against `qemu-img check` on copies of the same damaged images.

Images come from qemu-img / qemu-io (plain, compressed, snapshots, v2, extended L2,
refcount_bits=1, persistent bitmaps, a dirty lazy-refcounts image left by qemu-io's abort) and
are then damaged on purpose with byte pokes: refcounts too high (leaks), too low, zero (the
refcount structure must be rebuilt), a zeroed L2 entry (a leak), COPIED flags cleared, reserved
bits, a misaligned L2 entry, an entry pointing past the end of the file, broken refcount table
entries. For every image and every mode (human, json, -r leaks, -r all) stdout and the exit
status must match qemu-img's, and after our repair qemu-img check must find what it finds after
its own repair.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


class Image:
    """Byte-level access to a qcow2 file (16-bit refcounts unless said otherwise)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        head = path.read_bytes()[:104]
        self.cluster_bits: int = struct.unpack(">I", head[20:24])[0]
        self.l1_offset: int = struct.unpack(">Q", head[40:48])[0]
        self.rt_offset: int = struct.unpack(">Q", head[48:56])[0]

    def read_u64(self, offset: int) -> int:
        with self.path.open("rb") as f:
            f.seek(offset)
            value: int = struct.unpack(">Q", f.read(8))[0]
            return value

    def write(self, offset: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def write_u64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value))

    def l2_entry_offset(self, index: int) -> int:
        return (self.read_u64(self.l1_offset) & OFFSET_MASK) + 8 * index

    def host_cluster(self, index: int) -> int:
        return (self.read_u64(self.l2_entry_offset(index)) & OFFSET_MASK) >> self.cluster_bits

    def set_refcount(self, cluster: int, value: int) -> None:
        self.write(
            (self.read_u64(self.rt_offset) & OFFSET_MASK) + 2 * cluster, struct.pack(">H", value)
        )


def _create(d: Path, name: str, *opts: str) -> Path:
    assert qemu_img(["create", "-q", "-f", "qcow2", *opts, name, "16M"], d).rc == 0
    return d / name


def _io(path: Path, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    qemu_io([*args, path.name], path.parent)


def _plain(d: Path) -> Path:
    p = _create(d, "plain.qcow2")
    _io(p, "write -P 1 0 1M", "write -c -P 2 2M 256k", "write -P 3 8M 64k", "write -P 4 4M 64k")
    return p


def _snapshots(d: Path) -> Path:
    p = _create(d, "snap.qcow2")
    _io(p, "write -P 1 0 512k", "write -c -P 2 2M 128k")
    assert qemu_img(["snapshot", "-c", "s1", p.name], d).rc == 0
    _io(p, "write -P 3 0 64k")
    assert qemu_img(["snapshot", "-c", "s2", p.name], d).rc == 0
    _io(p, "write -P 4 64k 64k")
    return p


def _bitmaps(d: Path) -> Path:
    p = _create(d, "bitmaps.qcow2")
    assert qemu_img(["bitmap", "--add", p.name, "b0"], d).rc == 0
    assert qemu_img(["bitmap", "--add", "-g", "128k", p.name, "b1"], d).rc == 0
    _io(p, "write -P 1 0 1M")
    return p


def _lazy_dirty(d: Path) -> Path:
    p = _create(d, "lazy.qcow2", "-o", "lazy_refcounts=on")
    # qemu-io's abort leaves the image dirty with refcounts never written.
    subprocess.run(
        ["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 64k", "-c", "abort", p.name],
        cwd=d,
        capture_output=True,
        check=False,
    )
    return p


def _variant(*opts: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = _create(d, f"variant{abs(hash(opts))}.qcow2", "-o", ",".join(opts))
        _io(p, "write -P 1 0 4k", "write -P 2 1M 200k", "write -z 3M 128k", "write -P 3 5M 64k")
        return p

    return make


def _refcount1(d: Path) -> Path:
    p = _create(d, "rc1.qcow2", "-o", "refcount_bits=1")
    _io(p, "write -P 1 0 256k")
    qemu_img(["snapshot", "-c", "s1", p.name], d)  # fails half-way: refcounts overflow
    return p


def _damaged(
    make: Callable[[Path], Path], damage: Callable[[Image], None]
) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = make(d)
        damage(Image(p))
        return p

    return build


def _clear_copied(img: Image, offset: int) -> None:
    img.write_u64(offset, img.read_u64(offset) & ~COPIED)


def _or_bits(img: Image, offset: int, bits: int) -> None:
    img.write_u64(offset, img.read_u64(offset) | bits)


SCENARIOS: dict[str, Callable[[Path], Path]] = {
    "plain": _plain,
    "snapshots": _snapshots,
    "bitmaps": _bitmaps,
    "v2": _variant("compat=0.10"),
    "extended-l2": _variant("extended_l2=on", "cluster_size=128k"),
    "small-clusters": _variant("cluster_size=4k"),
    "refcount-bits-1": _refcount1,
    "refcount-bits-64": _variant("refcount_bits=64"),
    "zstd-refcount-bits-8": _variant("refcount_bits=8", "compression_type=zstd"),
    "corrupt-bit": _damaged(_plain, lambda i: i.write_u64(72, 2)),
    "snapshots-reftable-zeroed": _damaged(_snapshots, lambda i: i.write_u64(i.rt_offset, 0)),
    "lazy-dirty": _lazy_dirty,
    "leak-refcount": _damaged(_plain, lambda i: i.set_refcount(3, 2)),
    "leak-l2-zeroed": _damaged(_plain, lambda i: i.write_u64(i.l2_entry_offset(5), 0)),
    "refcount-zero": _damaged(_plain, lambda i: i.set_refcount(i.host_cluster(2), 0)),
    "refcount-low": _damaged(_snapshots, lambda i: i.set_refcount(6, 1)),
    "refcount-high-shared": _damaged(_snapshots, lambda i: i.set_refcount(6, 5)),
    "copied-l2": _damaged(_plain, lambda i: _clear_copied(i, i.l2_entry_offset(1))),
    "copied-l1": _damaged(_plain, lambda i: _clear_copied(i, i.l1_offset)),
    "past-eof": _damaged(
        _plain, lambda i: i.write_u64(i.l2_entry_offset(7), COPIED | (200 << i.cluster_bits))
    ),
    "l2-reserved": _damaged(_plain, lambda i: _or_bits(i, i.l2_entry_offset(3), 2)),
    "l1-reserved": _damaged(_plain, lambda i: _or_bits(i, i.l1_offset, 1)),
    "l2-misaligned": _damaged(
        _plain, lambda i: i.write_u64(i.l2_entry_offset(4), i.read_u64(i.l2_entry_offset(4)) + 512)
    ),
    "prealloc-misaligned": _damaged(
        _plain, lambda i: i.write_u64(i.l2_entry_offset(4), i.read_u64(i.l2_entry_offset(4)) + 513)
    ),
    "l2-table-in-header": _damaged(_plain, lambda i: i.write_u64(i.l1_offset, COPIED)),
    "compressed-copied": _damaged(_plain, lambda i: _or_bits(i, i.l2_entry_offset(32), COPIED)),
    "reftable-zeroed": _damaged(_plain, lambda i: i.write_u64(i.rt_offset, 0)),
    "refblock-twice": _damaged(
        _plain, lambda i: i.write_u64(i.rt_offset + 8, i.read_u64(i.rt_offset))
    ),
    "refblock-misaligned": _damaged(
        _plain, lambda i: i.write_u64(i.rt_offset, i.read_u64(i.rt_offset) + 512)
    ),
    "reftable-reserved": _damaged(_plain, lambda i: _or_bits(i, i.rt_offset, 1)),
    "refblock-past-eof": _damaged(_plain, lambda i: i.write_u64(i.rt_offset + 8, 200 << 16)),
    "only-refblock-past-eof": _damaged(_plain, lambda i: i.write_u64(i.rt_offset, 200 << 16)),
}

# qemu-img 7.2 gives up on these repairs (its overlap checks mark the image corrupt while it
# rebuilds); we rebuild the refcount structure, after which qemu-img check finds it clean.
QEMU_REPAIR_FAILS = {("refblock-misaligned", "all"), ("reftable-reserved", "all")}

MODES = [[], ["--output=json"], ["-r", "leaks"], ["-r", "all"]]


def _twins(base: Path, image: Path) -> tuple[Path, Path]:
    """Copies of ``image`` in q/ (for qemu-img) and v/ (for us), under the same name."""
    out = []
    for side in ("q", "v"):
        (base / side).mkdir(parents=True)
        out.append(base / side / "img.qcow2")
        shutil.copy(image, out[-1])
    return out[0], out[1]


def _same(ours: Run, theirs: Run, what: object) -> None:
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out), (what, ours, theirs)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_check_matches_qemu(tmp_path: Path, vdisk_cli: VdiskRunner, name: str) -> None:
    (tmp_path / "src").mkdir()
    image = SCENARIOS[name](tmp_path / "src")
    for n, mode in enumerate(MODES):
        q, v = _twins(tmp_path / str(n), image)
        args = ["check", *mode, "img.qcow2"]
        theirs = qemu_img(args, q.parent)
        ours = vdisk_cli(args, v.parent)
        repair = mode[1] if mode[:1] == ["-r"] else None
        if (name, repair) in QEMU_REPAIR_FAILS:
            assert theirs.rc == 1
            assert ours.rc == 0, ours
        else:
            _same(ours, theirs, mode)
        assert "Traceback" not in ours.err
        if repair is not None:
            # After the repair, qemu-img judges our image as it judges its own.
            after_theirs = qemu_img(["check", "--output=json", "img.qcow2"], q.parent)
            after_ours = qemu_img(["check", "--output=json", "img.qcow2"], v.parent)
            if (name, repair) in QEMU_REPAIR_FAILS:
                assert after_ours.rc == 0, after_ours
            else:
                # (The end offset may differ: opening a bitmaps image read-write, qemu-img
                # rewrites the bitmaps elsewhere.)
                mine, its = json.loads(after_ours.out), json.loads(after_theirs.out)
                mine.pop("image-end-offset")
                its.pop("image-end-offset")
                assert (after_ours.rc, mine) == (after_theirs.rc, its)
            if after_theirs.rc == 0:
                cmp = qemu_img(["compare", str(q), str(v)], tmp_path)
                assert cmp.rc == 0, cmp


def test_repaired_lazy_image_reads_back(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    import vdisk

    image = _lazy_dirty(tmp_path)
    assert vdisk_cli(["check", "-r", "all", image.name], tmp_path).rc == 0
    head = image.read_bytes()[72:80]
    assert struct.unpack(">Q", head)[0] & 1 == 0  # dirty bit cleared
    with vdisk.open(str(image), readonly=True) as disk:
        assert disk.pread(4096, 4 << 20) == b"\x02" * 4096  # type: ignore[attr-defined]


def test_repair_clears_corrupt_bit(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    image = _damaged(_plain, lambda i: i.write_u64(72, 2))(tmp_path)
    assert '"corrupt": true' in _ok_info(tmp_path, image)
    assert vdisk_cli(["check", "-r", "all", image.name], tmp_path).rc == 0
    assert '"corrupt": false' in _ok_info(tmp_path, image)


def _ok_info(d: Path, image: Path) -> str:
    run = qemu_img(["info", "--output=json", image.name], d)
    assert run.rc == 0, run
    return run.out


def test_check_errors(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    (tmp_path / "garbage.qcow2").write_bytes(b"QFI\xfb\0\0\0\3")
    (tmp_path / "raw.img").write_bytes(bytes(4096))
    _plain(tmp_path)
    cases = [
        (["check", "garbage.qcow2"], 1),
        (["check", "-f", "qcow2", "raw.img"], 1),
        (["check", "raw.img"], 63),
        (["check", "missing.qcow2"], 1),
        (["check", "-r", "some", "plain.qcow2"], 1),
        (["check", "--output=xml", "plain.qcow2"], 1),
    ]
    for args, rc in cases:
        theirs, ours = qemu_img(args, tmp_path), vdisk_cli(args, tmp_path)
        assert theirs.rc == rc and ours.rc == rc, (args, ours, theirs)
        assert ours.out == "" and ours.err.count("\n") == 1, (args, ours)


def test_quiet(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    p = _damaged(_plain, lambda i: i.set_refcount(3, 2))(tmp_path)
    ours, theirs = (
        vdisk_cli(["check", "-q", p.name], tmp_path),
        qemu_img(["check", "-q", p.name], tmp_path),
    )
    _same(ours, theirs, "-q")


@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_repair_zeroes_leaked_data(tmp_path: Path, vdisk_cli: VdiskRunner, repair: str) -> None:
    """A data cluster whose L2 entry is lost leaks; the repair frees it and, as QEMU (which
    discards it), leaves zeros where its data was."""
    (tmp_path / "src").mkdir()
    image = _plain(tmp_path / "src")
    img = Image(image)
    host = img.host_cluster(5) << img.cluster_bits
    img.write_u64(img.l2_entry_offset(5), 0)
    q, v = _twins(tmp_path, image)
    assert any(v.read_bytes()[host : host + (1 << img.cluster_bits)])
    assert vdisk_cli(["check", "-r", repair, "img.qcow2"], v.parent).rc == 0
    assert qemu_img(["check", "-r", repair, "img.qcow2"], q.parent).rc == 0
    size = 1 << img.cluster_bits
    ours, theirs = (p.read_bytes()[host : host + size] for p in (v, q))
    assert ours == theirs == bytes(size)


def test_check_source_cache_mode(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """-T: qemu-img's cache mode names are taken, others refused with its message."""
    image = _plain(tmp_path)
    for mode, rc in (("none", 0), ("writeback", 0), ("bogus", 1)):
        ours = vdisk_cli(["check", "-T", mode, image.name], tmp_path)
        theirs = qemu_img(["check", "-T", mode, image.name], tmp_path)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out) and ours.rc == rc, (mode, ours)
        assert ours.err == theirs.err.replace("qemu-img:", "vdisk:")
