"""Internal snapshots, judged by QEMU: qemu-img makes snapshots and vdisk reads them; vdisk
creates, applies and deletes them and qemu-img check, snapshot -l and convert -l agree.

Also: the snapshot table round-trips byte for byte, IDs follow QEMU's rule, unknown extra data
survives, and a hypothesis mix of writes and snapshot operations is judged by a model.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_img, qemu_io
from vdisk.errors import ReadOnlyError, RequestError, VdiskError
from vdisk.qcow2 import Qcow2Image, create
from vdisk.qcow2 import format as fmt
from vdisk.qcow2 import snapshot as snap
from vdisk.qcow2.cluster import read_snapshots

pytestmark = [needs_qemu, pytest.mark.timeout(300)]

MIB = 1 << 20
KIB = 1024
CONFIGS = [
    "cluster_size=65536",
    "cluster_size=4096",
    "cluster_size=16384,extended_l2=on",
    "cluster_size=4096,refcount_bits=4",
    "compat=0.10,cluster_size=4096",
]


def _qemu_snapshots(path: Path) -> list[dict[str, object]]:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    found: list[dict[str, object]] = info.get("snapshots", [])
    return found


def _qemu_snapshot_raw(path: Path, key: str, where: Path) -> bytes:
    out = where / f"sn-{abs(hash((str(path), key)))}.raw"
    qemu_img("convert", "-l", key, "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _read_all(dev: vdisk.BlockDevice) -> bytes:
    return dev.pread(dev.size, 0)


def _same_list(path: Path) -> None:
    """vdisk's snapshot list is qemu-img's (info --output=json, every field)."""
    from vdisk.info import _snapshot_info

    with Qcow2Image.open(str(path), readonly=True) as img:
        mine = [_snapshot_info(sn) for sn in img.snapshots]
    assert mine == _qemu_snapshots(path)


def _pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- QEMU makes, vdisk reads ------------------------------------------------------------------
@pytest.mark.parametrize("opts", CONFIGS)
def test_qemu_snapshots_read_by_vdisk(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), "2M")
    qemu_io(path, "write -P 1 0 96k", "write -P 2 1M 8k")
    qemu_img("snapshot", "-c", "first", str(path))
    qemu_io(path, "write -P 3 4k 8k", "discard 1M 64k", "write -z 64k 32k")
    qemu_img("snapshot", "-c", "second é", str(path))
    qemu_io(path, "write -P 4 0 4k")
    qemu_img("resize", "-q", str(path), "3M") if "compat=0.10" not in opts else None
    qemu_img("snapshot", "-c", "first", str(path))  # a repeated name
    _same_list(path)
    for sn in _qemu_snapshots(path):
        key = str(sn["id"])
        want = _qemu_snapshot_raw(path, f"snapshot.id={key}", tmp_path)
        with vdisk.open(str(path), snapshot={"id": key}, snapshot_keep_size=True) as view:
            assert _read_all(view) == want
        with vdisk.open(str(path), snapshot=key) as view:
            assert view.readonly
            data = _read_all(view)
        # The view has the snapshot's own size; qemu-img convert -l the image's.
        n = min(len(data), len(want))
        assert data[:n] == want[:n]
        assert not any(data[n:]) and not any(want[n:])
    assert_check_clean(path)


def test_view_has_the_snapshot_size_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "1M")
    qemu_io(path, "write -P 5 0 64k")
    qemu_img("snapshot", "-c", "small", str(path))
    qemu_img("resize", "-q", str(path), "4M")
    with vdisk.open(str(path), snapshot="small") as view:
        assert view.size == MIB
        assert view.pread(4, 0) == b"\5" * 4
        with pytest.raises(ReadOnlyError):
            view.write(b"x" * 512, 0)
    with pytest.raises(snap.SnapshotNotFoundError):
        vdisk.open(str(path), snapshot="nosuch")
    with vdisk.open(str(path), readonly=True) as img:
        assert img.size == 4 * MIB  # the image itself is untouched


def test_qemu_table_round_trips_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M")
    for i, name in enumerate(["a", "ünïcode", "", "x" * 200, "a"]):
        qemu_io(path, f"write -P {i + 1} {i * 8}k 4k")
        qemu_img("snapshot", "-c", name, str(path))
    header = fmt.Header.decode(path.read_bytes()[:4096])
    with Qcow2Image.open(str(path), readonly=True) as img:
        entries = img.snapshots
    size = fmt.snapshot_table_size(entries)
    stored = path.read_bytes()[header.snapshots_offset : header.snapshots_offset + size]
    assert len(stored) == size  # QEMU's table ends unpadded, here at the end of the file
    assert fmt.encode_snapshot_table(entries)[:size] == stored
    assert [e.name for e in entries] == ["a", "ünïcode", "", "x" * 200, "a"]


def test_non_utf8_name_round_trips() -> None:
    raw = fmt.SnapshotEntry(
        65536, 1, "1", "?", 1, 2, 3, 4, bytes(24), 5, 6, raw_name=b"\xff\xfeab"
    ).encode()
    entry, end = fmt.SnapshotEntry.decode(raw, 0)
    assert end == len(raw) and entry.raw_name == b"\xff\xfeab"
    assert entry.encode() == raw


# -- vdisk writes, QEMU judges ----------------------------------------------------------------
def _fresh(tmp_path: Path, opts: str, size: str = "2M") -> Path:
    path = tmp_path / "v.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), size)
    return path


@pytest.mark.parametrize("opts", CONFIGS)
def test_vdisk_create_apply_delete_judged_by_qemu(tmp_path: Path, opts: str) -> None:
    path = _fresh(tmp_path, opts)
    states: dict[str, bytes] = {}
    with Qcow2Image.open(str(path)) as img:
        img.write(_pattern(1, 160 * KIB), 0)
        img.write(_pattern(2, 8 * KIB), MIB + 512)
        states["one"] = _read_all(img)
        img.create_snapshot("one")
        img.write(_pattern(3, 12 * KIB), 4 * KIB)
        img.discard(MIB, 64 * KIB)
        img.write_zeroes(64 * KIB, 64 * KIB)
        states["two"] = _read_all(img)
        img.create_snapshot("two")
        img.write(_pattern(4, 4 * KIB), 0)
        current = _read_all(img)
    assert_check_clean(path)
    _same_list(path)
    for name, want in states.items():
        got = _qemu_snapshot_raw(path, f"snapshot.name={name}", tmp_path)
        assert got == want
    assert qemu_io(path, "read -P 0 1M 64k").count("read") == 1
    with Qcow2Image.open(str(path), readonly=True) as img:
        assert _read_all(img) == current
    # Apply the first, then delete both: each step clean, reads as QEMU reads.
    with Qcow2Image.open(str(path)) as img:
        img.apply_snapshot("one")
        assert _read_all(img) == states["one"]
        img.write(_pattern(5, 8 * KIB), 32 * KIB)
        after_apply = _read_all(img)
    assert_check_clean(path)
    assert _qemu_snapshot_raw(path, "two", tmp_path) == states["two"]
    with Qcow2Image.open(str(path)) as img:
        img.delete_snapshot("2")  # by ID
    assert_check_clean(path)
    assert [s["name"] for s in _qemu_snapshots(path)] == ["one"]
    with Qcow2Image.open(str(path)) as img:
        img.delete_snapshot("one")
        assert img.snapshots == []
    assert_check_clean(path)
    raw = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", str(path), str(raw))
    assert raw.read_bytes() == after_apply


def test_qemu_and_vdisk_take_turns(tmp_path: Path) -> None:
    path = _fresh(tmp_path, "cluster_size=4096")
    qemu_io(path, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "q1", str(path))
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\2" * 8192, 0)
        img.create_snapshot("v1")
        img.write(b"\3" * 8192, 4096)
    assert_check_clean(path)
    qemu_img("snapshot", "-a", "v1", str(path))
    qemu_io(path, "read -P 2 0 8k", "read -P 1 8k 56k")
    qemu_img("snapshot", "-d", "q1", str(path))
    assert_check_clean(path)
    with Qcow2Image.open(str(path)) as img:
        img.apply_snapshot("v1")
        img.delete_snapshot("v1")
    assert_check_clean(path)
    qemu_io(path, "read -P 2 0 8k", "read -P 1 8k 56k")


def test_apply_takes_the_snapshot_disk_size(tmp_path: Path) -> None:
    path = _fresh(tmp_path, "cluster_size=4096", "1M")
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\7" * 4096, MIB - 4096)
        img.create_snapshot("1m")
    qemu_img("resize", "-q", str(path), "3M")
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\x08" * 4096, 2 * MIB)
        img.create_snapshot("3m")
        img.apply_snapshot("1m")
        assert img.size == MIB
        assert img.pread(4096, MIB - 4096) == b"\7" * 4096
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == MIB
    assert_check_clean(path)
    with Qcow2Image.open(str(path)) as img:
        img.apply_snapshot("3m")
        assert img.size == 3 * MIB
        assert img.pread(4096, 2 * MIB) == b"\x08" * 4096
    assert_check_clean(path)


def test_ids_follow_qemu(tmp_path: Path) -> None:
    """The same create/delete sequence by qemu-img and by vdisk gives the same IDs."""
    mine, theirs = _fresh(tmp_path, "cluster_size=4096"), tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(theirs), "2M")
    steps = [("c", "a"), ("c", "b"), ("c", "c"), ("d", "b"), ("c", "d"), ("d", "d"), ("c", "e")]
    for op, name in steps:
        qemu_img("snapshot", f"-{op}", name, str(theirs))
        with Qcow2Image.open(str(mine)) as img:
            if op == "c":
                img.create_snapshot(name)
            else:
                img.delete_snapshot(name, by_id=False)
    ids = [(s["id"], s["name"]) for s in _qemu_snapshots(theirs)]
    assert [(s["id"], s["name"]) for s in _qemu_snapshots(mine)] == ids
    assert snap.next_id([]) == "1"


def test_unknown_extra_data_survives(tmp_path: Path) -> None:
    path = _fresh(tmp_path, "cluster_size=4096")
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\1" * 4096, 0)
        img.create_snapshot("x")
    # Give the entry 16 bytes of extra data QEMU does not know, through the table switch.
    tail = b"unknown-extra-16"
    with Qcow2Image.open(str(path)) as img, img._lock:
        entries = read_snapshots(img.fd, img.header)
        entries[0].extra_data += tail
        set_dirty = snap._begin(img)
        snap._switch_table(img, entries)
        snap._end(img, set_dirty)
    assert_check_clean(path)
    qemu_img("snapshot", "-c", "by-qemu", str(path))  # QEMU rewrites the table
    with Qcow2Image.open(str(path)) as img:
        img.create_snapshot("by-vdisk")
        entries = img.snapshots
    assert entries[0].extra_data[24:] == tail
    assert entries[0].disk_size == 2 * MIB
    assert_check_clean(path)


def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fresh(tmp_path, "cluster_size=4096")
    with Qcow2Image.open(str(path)) as img:
        with pytest.raises(RequestError, match="65535"):
            img.create_snapshot("n" * 65536)
        with pytest.raises(snap.SnapshotNotFoundError):
            img.apply_snapshot("nothing")
        with pytest.raises(snap.SnapshotNotFoundError):
            img.delete_snapshot("nothing")
        monkeypatch.setattr(fmt, "MAX_SNAPSHOTS", 2)
        img.create_snapshot("1")
        img.create_snapshot("2")
        with pytest.raises(VdiskError, match="Too many snapshots") as err:
            img.create_snapshot("3")
        assert err.value.errno == 27  # EFBIG, as QEMU
    with Qcow2Image.open(str(path), readonly=True) as img, pytest.raises(ReadOnlyError):
        img.create_snapshot("ro")
    assert_check_clean(path)


def test_refcount_width_refused_before_any_change(tmp_path: Path) -> None:
    """refcount_bits=1 cannot count a second reference: refused (EINVAL, as QEMU) and,
    unlike QEMU, without leaking the L1 copy."""
    path = _fresh(tmp_path, "cluster_size=4096,refcount_bits=1")
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\1" * 4096, 0)
        with pytest.raises(VdiskError, match="refcount_bits=1") as err:
            img.create_snapshot("x")
        assert err.value.errno == 22
    assert_check_clean(path)
    assert _qemu_snapshots(path) == []


def test_data_file_bit_refused(tmp_path: Path) -> None:
    """Snapshots are refused with QEMU's words on images with an external data file."""
    path = _fresh(tmp_path, "cluster_size=4096")
    with Qcow2Image.open(str(path)) as img:
        img.header.incompatible_features |= fmt.INCOMPAT_DATA_FILE  # as a data-file image
        with pytest.raises(VdiskError, match="Operation not supported") as err:
            img.create_snapshot("x")
        assert err.value.errno == 95
        img.header.incompatible_features &= ~fmt.INCOMPAT_DATA_FILE
    assert_check_clean(path)


def test_crash_leaves_the_dirty_bit_and_a_repairable_image(tmp_path: Path) -> None:
    """Stop a create between its refcount increases and the table switch: the dirty bit is
    set, and opening read-write repairs the image to clean, without the snapshot."""
    path = _fresh(tmp_path, "cluster_size=4096")
    with Qcow2Image.open(str(path)) as img:
        img.write(_pattern(9, 64 * KIB), 0)
    real_switch = snap._switch_table

    def crash(img: Qcow2Image, entries: list[fmt.SnapshotEntry]) -> None:
        raise OSError(5, "simulated power cut")

    snap._switch_table = crash  # type: ignore[assignment]
    try:
        img = Qcow2Image.open(str(path))
        with pytest.raises(VdiskError):
            img.create_snapshot("lost")
        os.close(img.fd)  # the process dies here: no close, no flush
        img.fd = -1
    finally:
        snap._switch_table = real_switch
    header = fmt.Header.decode(path.read_bytes()[:4096])
    assert header.dirty and header.nb_snapshots == 0
    with Qcow2Image.open(str(path)) as img:
        assert img.pread(64 * KIB, 0) == _pattern(9, 64 * KIB)
    assert_check_clean(path)


# -- a model: writes mixed with snapshot operations -------------------------------------------
SIZE = 512 * KIB
UNIT = 16 * KIB  # zero and discard in whole clusters of every configuration
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 64)),
        st.tuples(st.just("zero"), st.integers(0, SIZE // UNIT - 1), st.integers(1, 4)),
        st.tuples(st.just("discard"), st.integers(0, SIZE // UNIT - 1), st.integers(1, 4)),
        st.tuples(st.just("create"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("apply"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=24,
)


@settings(
    max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=_ops,
    opts=st.sampled_from(["cluster_size=4096", "cluster_size=16384,extended_l2=on"]),
)
def test_model_with_snapshots(ops: list[tuple[str, int, int]], opts: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.qcow2"
        create(str(path), SIZE, **dict(kv.split("=") for kv in opts.split(",")))  # type: ignore[arg-type]
        model = bytearray(SIZE)
        snaps: dict[str, list[bytes]] = {}  # name -> contents, oldest first (as the table)
        img = Qcow2Image.open(str(path))
        try:
            for i, (op, a, b) in enumerate(ops):
                name = f"s{a}"
                if op == "write":
                    n = min(b * 512, SIZE - a * 512)
                    data = bytes([i % 250 + 1]) * n
                    img.write(data, a * 512)
                    model[a * 512 : a * 512 + n] = data
                elif op in ("zero", "discard"):
                    n = min(b * UNIT, SIZE - a * UNIT)
                    if op == "zero":
                        img.write_zeroes(a * UNIT, n)
                    else:
                        img.discard(a * UNIT, n)
                    model[a * UNIT : a * UNIT + n] = bytes(n)  # no backing: discard reads 0
                elif op == "create":
                    img.create_snapshot(name)
                    snaps.setdefault(name, []).append(bytes(model))
                elif op == "apply" and snaps.get(name):
                    img.apply_snapshot(name)  # the first of that name
                    model[:] = snaps[name][0]
                elif op == "delete" and snaps.get(name):
                    img.delete_snapshot(name, by_id=False)
                    snaps[name].pop(0)
                elif op == "reopen":
                    img.close()
                    img = Qcow2Image.open(str(path))
                assert img.pread(SIZE, 0) == bytes(model), (i, op)
        finally:
            img.close()
        assert_check_clean(path)
        for name, contents in snaps.items():
            if contents:
                with vdisk.open(str(path), snapshot={"name": name}) as view:
                    assert view.pread(SIZE, 0) == contents[0]


def test_entry_encode_limits() -> None:
    entry = fmt.SnapshotEntry(0, 0, "1", "n", 0, 0, 0, 0, bytes(1025))
    with pytest.raises(VdiskError, match="1024"):
        entry.encode()
    big = fmt.SnapshotEntry(0, 0, "1", "n", 0, 0, 0, 1 << 33, bytes(24)).encode()
    assert struct.unpack_from(">I", big, 32)[0] == 0  # the 32-bit field, as QEMU truncates it
    assert struct.unpack_from(">Q", big, 40)[0] == 1 << 33  # vm_state_size_large


def test_compressed_clusters_are_shared_and_freed(tmp_path: Path) -> None:
    """Compressed clusters (several per host cluster) gain and lose one reference per entry."""
    raw = tmp_path / "src.raw"
    raw.write_bytes((b"compressible " * 90_000)[:MIB])
    path = tmp_path / "c.qcow2"
    qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(path)
    )
    with Qcow2Image.open(str(path)) as img:
        img.create_snapshot("packed")
        img.write(b"\1" * 8192, 4096)  # rewrites compressed clusters as plain ones
    assert_check_clean(path)
    assert _qemu_snapshot_raw(path, "packed", tmp_path) == raw.read_bytes()
    with Qcow2Image.open(str(path)) as img:
        img.apply_snapshot("packed")
        assert img.pread(MIB, 0) == raw.read_bytes()
        img.delete_snapshot("packed")
    assert_check_clean(path)


def test_resize_with_vdisk_snapshots(tmp_path: Path) -> None:
    """Shrink and grow keep the snapshot whole, as in qemu-img 7.2 (v3)."""
    from vdisk.qcow2.resize import resize

    path = _fresh(tmp_path, "cluster_size=4096")
    data = _pattern(7, 2 * MIB)
    with Qcow2Image.open(str(path)) as img:
        img.write(data, 0)
        img.create_snapshot("full")
        resize(img, 512 * KIB)
    assert_check_clean(path)
    with Qcow2Image.open(str(path)) as img:
        resize(img, 3 * MIB)
        assert img.pread(MIB, 512 * KIB) == bytes(MIB)
    assert_check_clean(path)
    assert _qemu_snapshot_raw(path, "full", tmp_path)[: 2 * MIB] == data
    with Qcow2Image.open(str(path)) as img:
        img.apply_snapshot("full")
        assert img.size == 2 * MIB and img.pread(2 * MIB, 0) == data
    assert_check_clean(path)


def test_snapshot_drain_holds_new_requests(tmp_path: Path) -> None:
    """While create_snapshot waits for a request in flight, a new request waits too, until
    the snapshot is taken: otherwise a stream of requests could starve the drain."""
    import threading

    path = _fresh(tmp_path, "cluster_size=4096")
    with Qcow2Image.open(str(path)) as img:
        img.write(b"\x01" * 4096, 0)
        img._active.add(-1)  # a request in flight, as a reader holds its ticket
        snapper = threading.Thread(target=img.create_snapshot, args=("s",))
        snapper.start()
        while not img._quiescing:
            snapper.join(0.001)
        done = threading.Event()

        def writer() -> None:
            img.write(b"\x02" * 4096, 0)
            done.set()

        late = threading.Thread(target=writer)
        late.start()
        assert not done.wait(0.2), "a new write ran while the snapshot drained"
        img._active.discard(-1)
        snapper.join()
        late.join()
        assert [s.name for s in img.snapshots] == ["s"]
    with vdisk.open(str(path), snapshot="s") as view:
        assert view.pread(4096, 0) == b"\x01" * 4096  # the late write went after it
    assert_check_clean(path)


def test_snapshots_beside_concurrent_writers(tmp_path: Path) -> None:
    """Snapshots taken while threads write (each drains the I/O in flight first): the image
    checks clean and every 4 KiB block of every snapshot holds one whole write."""
    import threading

    path = _fresh(tmp_path, "cluster_size=4096")
    stop = threading.Event()
    with Qcow2Image.open(str(path)) as img:

        def writer(base: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                img.write(bytes([n % 255 + 1]) * 4096, base + (n % 64) * 4096)

        threads = [threading.Thread(target=writer, args=(k * 512 * KIB,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            for i in range(4):
                img.create_snapshot(f"s{i}")
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert_check_clean(path)
    for i in range(4):
        with vdisk.open(str(path), snapshot=f"s{i}") as view:
            data = np.frombuffer(view.pread(view.size, 0), dtype=np.uint8).reshape(-1, 4096)
        assert (data == data[:, :1]).all()  # no block mixes two writes
