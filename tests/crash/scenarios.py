"""Crash scenarios: each is a small image recipe and a short run of guest operations.

A scenario is ``Scenario(name, make, run)``: ``make(dir)`` creates the image (and its backing
file) and returns its path; ``run(session)`` does the operations under the recorder. The crash,
fault and fuzz suites all walk ``SCENARIOS``.

Joins when the feature lands: compressed writes, snapshot create/apply/delete, bitmap updates,
encryption, ``amend refcount_bits``: one function each, appended to SCENARIOS. External data
files (``data_file``) have joined. An encrypted scenario names its ``passphrase``; every open
(and qemu-img check) of its states then passes it.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vdisk
from vdisk.qcow2 import Qcow2Image, create
from vdisk.qcow2.check import FIX_ERRORS, FIX_LEAKS, check_and_repair
from vdisk.qcow2.resize import resize, trim_file
from vdisk.testing.recorder import Recorder

from .model import SECTOR, Guest

KIB = 1024
MIB = 1 << 20


@dataclass
class Session:
    """One run of a scenario: the image, its recorder and the guest model."""

    path: Path
    rec: Recorder
    rng: random.Random
    passphrase: str | None = None
    guest: Guest = field(init=False)
    # Per bitmap, the guest sectors when it started tracking (bitmap scenario's judge).
    bitmap_starts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        with vdisk.open(str(self.path), readonly=True, **self.key()) as img:
            initial = img.pread(img.size, 0)
            underneath = _underneath(img)
        self.guest = Guest(None, self.rec, _sectors(underneath))
        self.guest.current = _sectors(initial)
        self.guest.acks[0].snapshot = self.guest.current.copy()
        self.guest.acks[0].size = len(initial)
        self.guest.sizes[0] = len(initial)

    def open(self, **options: object) -> Guest:
        """Open the image read-write (under the recorder) for the guest model."""
        options = {**self.key(), **options}
        self.guest.img = Qcow2Image.open(str(self.path), **options)  # type: ignore[arg-type]
        return self.guest

    def key(self) -> dict[str, str]:
        return {"passphrase": self.passphrase} if self.passphrase else {}

    def data(self, length: int) -> bytes:
        return self.rng.randbytes(length)

    def offset(self, span: int, length: int, align: int = SECTOR) -> int:
        return self.rng.randrange(0, (span - length) // align + 1) * align


def _sectors(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, SECTOR).copy()


def _underneath(img: vdisk.BlockDevice) -> bytes:
    backing = getattr(img, "backing", None)
    if backing is None:
        return bytes(img.size)
    data = backing.pread(min(backing.size, img.size), 0)
    return data + bytes(img.size - len(data))


@dataclass(frozen=True)
class Scenario:
    name: str
    make: Callable[[Path], Path]
    run: Callable[[Session], None]
    known_bug: str = ""  # one line: what fails today (the suite marks it xfail, strict)
    # Extra judgement of a crash state file (before vdisk opens it): problems found.
    check: Callable[[Session, Path], list[str]] | None = None
    passphrase: str | None = None  # an encrypted image's


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _vdisk_image(size: int, **options: object) -> Callable[[Path], Path]:
    def make(where: Path) -> Path:
        path = where / "image.qcow2"
        create(str(path), size, **options)  # type: ignore[arg-type]
        return path

    return make


def _random_io(s: Session, g: Guest, span: int, count: int, sizes: tuple[int, ...]) -> None:
    """Random writes with a flush, a zero or a discard now and then."""
    for _ in range(count):
        length = s.rng.choice(sizes)
        off = s.offset(span, length)
        roll = s.rng.random()
        if roll < 0.65:
            g.write(off, s.data(length), fua=roll < 0.08)
        elif roll < 0.75:
            g.write_zeroes(off, length)
        elif roll < 0.82:
            g.discard(off, length)
        else:
            g.flush()


# -- scenarios ------------------------------------------------------------------------------
def run_allocation(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 4 * MIB, 14, (512, 4 * KIB, 12 * KIB, 64 * KIB))
    g.close()


def make_l1_growth(where: Path) -> Path:
    return _vdisk_image(1 * MIB, cluster_size=512)(where)


def run_l1_growth(s: Session) -> None:
    g = s.open()
    g.write(0, s.data(4 * KIB))
    g.flush()
    # 512-byte clusters: one L2 table maps 32 KiB, so 8 MiB needs 256 L1 entries (2 KiB).
    g.resize(8 * MIB, lambda: resize(g.image, 8 * MIB))
    g.write(8 * MIB - 8 * KIB, s.data(8 * KIB))
    g.write(3 * MIB, s.data(2 * KIB))
    g.flush()
    g.write(5 * MIB + 512, s.data(1 * KIB))
    g.close()


def run_refcount_growth(s: Session) -> None:
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 32 KiB of file and the
    # first refcount table 2 MiB, so ~2.5 MiB of data moves the table.
    g = s.open()
    for i in range(20):
        g.write(i * 128 * KIB, s.data(128 * KIB))
        if i % 6 == 5:
            g.flush()
    g.close()


def make_backing(where: Path) -> Path:
    base = where / "base.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(base), "4M")
    pattern = np.random.default_rng(7).integers(0, 256, 4 * MIB, dtype=np.uint8).tobytes()
    with Qcow2Image.open(str(base)) as img:
        img.write(pattern, 0)
    path = where / "image.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
        "-o", "cluster_size=4096", str(path),
    )  # fmt: skip
    return path


def run_cow_backing(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 4 * MIB, 12, (512, 1536, 6 * KIB))
    g.close()


def make_subclusters(where: Path) -> Path:
    path = where / "image.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16384", str(path), "4M"
    )
    return path


def run_subclusters(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 2 * MIB, 14, (512, 1024, 3 * KIB, 20 * KIB))
    g.close()


def make_data_file(where: Path) -> Path:
    """An image whose guest data lives in an external data file. Only the qcow2 file's calls
    make crash states; the data file (written in place, guest offset == host offset) is kept
    as the run left it, so the states test the ordering of the metadata against it."""
    path = where / "image.qcow2"
    create(str(path), 4 * MIB, cluster_size=4096, data_file=str(where / "data.raw"))
    return path


def run_data_file(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 4 * MIB, 14, (512, 4 * KIB, 12 * KIB, 64 * KIB))
    g.close()


def run_lazy_refcounts(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 4 * MIB, 14, (512, 4 * KIB, 64 * KIB))
    g.close()


def run_resize_grow(s: Session) -> None:
    g = s.open()
    g.write(1 * MIB - 4 * KIB, s.data(8 * KIB)[: 4 * KIB])
    g.flush()
    g.resize(6 * MIB, lambda: resize(g.image, 6 * MIB))
    g.write(5 * MIB, s.data(8 * KIB))
    g.close()


def run_resize_shrink(s: Session) -> None:
    g = s.open()
    for off in (0, 1 * MIB, 2 * MIB + 4 * KIB, 3 * MIB + 512):
        g.write(off, s.data(8 * KIB))
    g.flush()
    g.resize(2 * MIB, lambda: resize(g.image, 2 * MIB))
    g.close()
    trim_file(str(s.path))  # as `vdisk resize --shrink` ends


def make_dirty(where: Path) -> Path:
    """A lazy-refcounts image that QEMU left dirty: written, then killed before closing."""
    path = where / "image.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", str(path), "4M"
    )  # fmt: skip
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 200k", "-c", "write -P 0xa5 1M 64k",
         "-c", "write -P 0x33 3M 12k", "-c", "sigraise 9", str(path)],
        capture_output=True, check=False,
    )  # fmt: skip
    return path


def run_repair_check(s: Session) -> None:
    check_and_repair(str(s.path), FIX_LEAKS | FIX_ERRORS)
    s.guest.ack("repaired")


def run_repair_open(s: Session) -> None:
    g = s.open()  # a read-write open of a dirty image rebuilds its refcounts
    g.write(64 * KIB, s.data(4 * KIB))
    g.close()


def _with_snapshots(names: tuple[str, ...]) -> Callable[[Path], Path]:
    """A 2 MiB image with data, and a snapshot per name with different data in each; the
    content of the first snapshot is kept next to the image (``first.bin``)."""

    def make(where: Path) -> Path:
        path = where / "image.qcow2"
        create(str(path), 2 * MIB, cluster_size=4096)
        rng = np.random.default_rng(11)
        with Qcow2Image.open(str(path)) as img:
            for i, name in enumerate(names):
                img.write(rng.integers(0, 256, 48 * KIB, dtype=np.uint8).tobytes(), i * 24 * KIB)
                if i == 0:
                    (where / "first.bin").write_bytes(img.pread(img.size, 0))
                img.create_snapshot(name)
        return path

    return make


def run_snapshot_create(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 2 * MIB, 5, (512, 4 * KIB, 12 * KIB))
    g.image.create_snapshot("crash")
    g.ack("snapshot created")
    _random_io(s, g, 2 * MIB, 5, (512, 4 * KIB, 12 * KIB))
    g.close()


def run_snapshot_apply(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 2 * MIB, 4, (512, 4 * KIB, 12 * KIB))
    first = (s.path.parent / "first.bin").read_bytes()
    g.replace(first, lambda: g.image.apply_snapshot("a"))
    g.ack("snapshot applied")
    _random_io(s, g, 2 * MIB, 4, (512, 4 * KIB))
    g.close()


def run_snapshot_delete(s: Session) -> None:
    g = s.open()
    _random_io(s, g, 2 * MIB, 3, (512, 4 * KIB))
    g.image.delete_snapshot("a")
    g.ack("snapshot deleted")
    g.write(0, s.data(8 * KIB))
    g.image.delete_snapshot("b")
    g.close()


def _compressible(s: Session, length: int) -> bytes:
    """Text-like data that deflate shrinks (so the writes really go compressed)."""
    words = [s.rng.randbytes(s.rng.randrange(2, 7)).hex().encode() for _ in range(24)]
    out = bytearray()
    while len(out) < length:
        out += s.rng.choice(words) + b" "
    return bytes(out[:length])


def run_compressed(s: Session) -> None:
    # Compressed writes pack several clusters into shared host clusters; then a partial
    # overwrite turns one back into a normal cluster and a discard frees another.
    g = s.open(compress=True)
    for i in range(6):
        g.write(i * 8 * KIB, _compressible(s, 8 * KIB))
        if i == 2:
            g.flush()
    g.close()
    g = s.open()
    g.write(4 * KIB + 512, s.data(1 * KIB))
    g.flush()
    g.discard(16 * KIB, 4 * KIB)
    g.write(40 * KIB, s.data(4 * KIB))
    g.close()


def make_amendable(where: Path) -> Path:
    """Data, zero clusters (plain and allocated) and holes, written by qemu-io."""
    path = where / "image.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "2M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 40k", "-c", "write -z 64k 8k",
         "-c", "write -P 0x11 1M 16k", "-c", "write -z 1M 4k", str(path)],
        capture_output=True, check=True,
    )  # fmt: skip
    return path


def run_amend_refcount_bits(s: Session) -> None:
    from vdisk.qcow2.amend import AmendOptions, amend

    amend(str(s.path), AmendOptions(refcount_bits=4))
    s.guest.ack("refcount_bits=4")


def run_amend_compat(s: Session) -> None:
    from vdisk.qcow2.amend import AmendOptions, amend

    amend(str(s.path), AmendOptions(compat="0.10"))
    s.guest.ack("compat=0.10")
    amend(str(s.path), AmendOptions(compat="1.1", lazy_refcounts=True))
    s.guest.ack("compat=1.1")


def make_raw_data_file(where: Path) -> Path:
    """A data_file_raw image with data, and a second name (a symlink) for its data file."""
    path = where / "image.qcow2"
    data = where / "data.raw"
    create(str(path), 1 * MIB, cluster_size=4096, data_file=str(data), data_file_raw=True)
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\x5a" * (40 * KIB), 8 * KIB)
    (where / "renamed.raw").symlink_to(data)
    return path


def run_amend_data_file(s: Session) -> None:
    from vdisk.qcow2.amend import AmendOptions, amend

    renamed = str(s.path.parent / "renamed.raw")
    amend(str(s.path), AmendOptions(data_file=renamed, data_file_raw=False))
    s.guest.ack("data_file=renamed.raw,data_file_raw=off")


def make_bitmaps(where: Path) -> Path:
    """An image with an enabled bitmap (16 KiB granules) and a disabled one, from qemu-img."""
    path = where / "image.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "4M")
    _qemu_img("bitmap", "--add", "-g", "16k", str(path), "track")
    _qemu_img("bitmap", "--add", "--disable", str(path), "frozen")
    return path


def run_bitmaps(s: Session) -> None:
    """Writes tracked across two sessions, with a bitmap added mid-session and a merge."""
    g = s.open()
    _random_io(s, g, 4 * MIB, 10, (512, 4 * KIB, 20 * KIB))
    g.image.add_bitmap("late", granularity=8 * KIB)
    # What the guest reads when 'late' starts: every later change must show in it.
    s.bitmap_starts = {
        "track": s.guest.acks[0].snapshot,
        "late": _sectors(g.image.pread(g.image.size, 0)),
    }
    _random_io(s, g, 4 * MIB, 5, (512, 4 * KIB))
    g.close()
    g = s.open()
    g.write(s.offset(4 * MIB, 4 * KIB), s.data(4 * KIB))
    g.image.merge_bitmap("frozen", "track")
    g.close()


def judge_bitmaps(s: Session, path: Path) -> list[str]:
    """'track' (from the start) and 'late' (from its creation) follow every write: in a crash
    state each is stored consistent and covers every sector whose data changed since it
    started, or it is IN_USE, or (autoclear bit 0 clear) dropped; never stale. qemu-img info
    must list the same flags."""
    # A copy of its own: qemu-img threads fork while holding inherited locks on what the
    # judge opened last, and the judge opens the state itself read-write next.
    copy = path.with_suffix(".bitmaps.qcow2")
    shutil.copyfile(path, copy)
    try:
        return _judge_bitmap_copy(s, copy)
    finally:
        copy.unlink()


def _judge_bitmap_copy(s: Session, path: Path) -> list[str]:
    starts = s.bitmap_starts
    dirty: dict[str, list[tuple[int, int]]] = {}
    with Qcow2Image.open(str(path), readonly=True, open_backing=False) as img:
        found = {b.name: b for b in img.bitmaps()}
        listed = {name: b.flags for name, b in found.items()}
        for name, bm in found.items():
            if name in starts and not bm.in_use:
                dirty[name] = bm.dirty_ranges()
        data = _sectors(img.pread(img.size, 0)) if dirty else None
    problems = []
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True
    )
    if info.returncode == 0:
        specific = json.loads(info.stdout)["format-specific"]["data"]
        theirs = {b["name"]: b["flags"] for b in specific.get("bitmaps", [])}
        if theirs != listed:
            problems.append(f"bitmap flags: qemu-img {theirs}, vdisk {listed}")
    for name, runs in dirty.items():
        assert data is not None
        start = starts[name]
        changed = np.flatnonzero((data[: len(start)] != start).any(axis=1))
        covered = np.zeros(len(data), dtype=bool)
        for off, n in runs:
            covered[off // SECTOR : (off + n) // SECTOR] = True
        stale = changed[~covered[changed]]
        if len(stale):
            problems.append(f"bitmap {name!r} is stale: sector {int(stale[0])} changed, bit clear")
    return problems


LUKS_PASSPHRASE = "crash-test"


def make_luks(where: Path) -> Path:
    return _vdisk_image(
        2 * MIB, cluster_size=4096, encrypt_format="luks", passphrase=LUKS_PASSPHRASE,
        iter_time=1,
    )(where)  # fmt: skip


def run_luks(s: Session) -> None:
    """Encrypted writes (copy-on-write re-encrypts at the new host offset), then a key slot
    added mid-run: every state must unlock with the first passphrase."""
    from vdisk.qcow2.encryption import amend_encryption

    g = s.open()
    _random_io(s, g, 2 * MIB, 8, (512, 1536, 6 * KIB))
    options = {"encrypt.state": "active", "encrypt.new-secret": "n", "encrypt.iter-time": 1}
    amend_encryption(g.image, options, {"n": b"second"})
    _random_io(s, g, 2 * MIB, 4, (512, 4 * KIB))
    g.close()


SCENARIOS: list[Scenario] = [
    Scenario("allocation", _vdisk_image(4 * MIB, cluster_size=4096), run_allocation),
    Scenario("l1_growth", make_l1_growth, run_l1_growth),
    Scenario(
        "refcount_table_growth",
        _vdisk_image(4 * MIB, cluster_size=512, refcount_bits=64),
        run_refcount_growth,
    ),
    Scenario("cow_backing", make_backing, run_cow_backing),
    Scenario("subclusters", make_subclusters, run_subclusters),
    Scenario(
        "lazy_refcounts",
        _vdisk_image(4 * MIB, cluster_size=4096, lazy_refcounts=True),
        run_lazy_refcounts,
    ),
    Scenario("resize_grow", _vdisk_image(1 * MIB, cluster_size=4096), run_resize_grow),
    Scenario("resize_shrink", _vdisk_image(4 * MIB, cluster_size=4096), run_resize_shrink),
    Scenario("repair_check_r_all", make_dirty, run_repair_check),
    Scenario("repair_lazy_open", make_dirty, run_repair_open),
    Scenario("snapshot_create", _with_snapshots(("a",)), run_snapshot_create),
    Scenario("snapshot_apply", _with_snapshots(("a", "b")), run_snapshot_apply),
    Scenario("snapshot_delete", _with_snapshots(("a", "b")), run_snapshot_delete),
    Scenario("data_file", make_data_file, run_data_file),
    Scenario("compressed", _vdisk_image(1 * MIB, cluster_size=4096), run_compressed),
    Scenario("amend_refcount_bits", make_amendable, run_amend_refcount_bits),
    Scenario("amend_compat", make_amendable, run_amend_compat),
    Scenario("amend_data_file", make_raw_data_file, run_amend_data_file),
    Scenario("bitmap_updates", make_bitmaps, run_bitmaps, check=judge_bitmaps),
    Scenario("luks", make_luks, run_luks, passphrase=LUKS_PASSPHRASE),
]
