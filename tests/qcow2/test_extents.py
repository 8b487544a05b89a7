"""The host-extent table (qcow2/extents.py) an exporter reads and overwrites through: which
clusters it offers, that every mapping change clears an entry before it happens, and that a
held ticket keeps freed host clusters from reuse. Oracles: the image's own L2 entries as
qemu-img map reports them, and qemu-img check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_img, qemu_io, qemu_map
from vdisk.errors import RequestError
from vdisk.qcow2 import Qcow2Image
from vdisk.qcow2.extents import FLAG_MASK, READABLE, WRITABLE, HostExtents

pytestmark = [needs_qemu, pytest.mark.timeout(120)]

KIB = 1024
MIB = 1 << 20
CS = 64 * KIB


def _image(tmp: Path, *qemu_io_cmds: str, backing: bool = False) -> Path:
    path = tmp / "img.qcow2"
    if backing:
        base = tmp / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
        qemu_io(base, "write -P 0x11 0 1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path))
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    if qemu_io_cmds:
        qemu_io(path, *qemu_io_cmds)
    return path


def _qemu_hosts(path: Path) -> dict[int, int]:
    """guest cluster -> host offset of the image's own data clusters, as qemu-img map says."""
    hosts = {}
    for ext in qemu_map(path):
        if ext["data"] and ext.get("depth", 0) == 0 and "offset" in ext:
            for i in range(ext["length"] // CS):
                hosts[ext["start"] // CS + i] = ext["offset"] + i * CS
    return hosts


def _open(path: Path) -> tuple[Qcow2Image, HostExtents]:
    img = vdisk.open(str(path))
    assert isinstance(img, Qcow2Image)
    ext = img.host_extents()
    assert ext is not None and img.host_extents() is ext  # one table per image
    return img, ext


def test_learned_entries_are_the_data_clusters_qemu_maps(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 0x22 0 256k", "write -z 1M 64k",
                  "write -c -P 0x33 2M 128k", backing=True)
    hosts = _qemu_hosts(path)
    with _open(path)[0] as img:
        ext = img.host_extents()
        assert ext is not None
        img.pread(4 * MIB, 0)  # loads the L2 table
        ext.learn(0, 4 * MIB)
        for gc in range(4 * MIB // CS):
            e = ext.table[gc]
            if gc in hosts:  # our own plain data: readable at qemu's host offset
                assert e & READABLE and e & ~FLAG_MASK == hosts[gc]
            else:  # zero, compressed, backing, unallocated: the image serves them
                assert e == 0
        # Not yet writable: the first write's work (dirty bit, bitmaps) is still to do.
        assert not any(ext.table[gc] & WRITABLE for gc in hosts)
        assert ext.lookup(5 * KIB, 4 * KIB, write=False) == hosts[0] + 5 * KIB
        assert ext.lookup(CS - 512, 1024, write=False) == -1  # two clusters: not here
        img.write(b"\x44" * 4096, 0)
        ext.learn(0, CS * 4)
        assert all(ext.table[gc] & WRITABLE for gc in range(4))
        assert ext.lookup(4096, 4096, write=True) == hosts[0] + 4096


def test_every_mapping_change_clears_the_entry_first(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 0x22 0 1M")
    img, ext = _open(path)
    with img:
        img.write(b"\x01" * 512, 0)  # first write done: entries may be writable
        ext.learn(0, MIB)
        assert all(ext.table[gc] & WRITABLE for gc in range(16))
        img.discard(0, CS)
        img.write_zeroes(CS, CS)
        img.write_zeroes(2 * CS, CS, may_unmap=True)
        assert [ext.table[gc] for gc in range(3)] == [0, 0, 0]
        assert ext.table[3] & WRITABLE  # untouched
        # Reallocating writes learn the new host; learning again agrees with the image.
        img.write(b"\x02" * CS, 0)
        ext.learn(0, 3 * CS)
        img.flush()
    hosts = _qemu_hosts(path)
    assert ext.table[0] & ~FLAG_MASK == hosts[0]
    assert_check_clean(path)


def test_rule_changes_clear_the_whole_table(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 0x22 0 1M")
    img, ext = _open(path)
    with img:
        img.write(b"\x01" * 512, 0)
        ext.learn(0, MIB)
        img.add_bitmap("b")  # writes must now mark the bitmap: none may skip the image
        assert not any(ext.table[gc] for gc in range(16))
        ext.learn(0, MIB)
        assert all(ext.table[gc] == ext.table[gc] | READABLE for gc in range(16))
        assert not any(ext.table[gc] & WRITABLE for gc in range(16))


def test_a_held_ticket_keeps_freed_clusters_from_reuse(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 0x22 0 1M")
    img, ext = _open(path)
    with img:
        img.write(b"\x01" * 512, 0)
        ext.learn(0, MIB)
        host = ext.lookup(0, CS, write=True)
        ticket = ext.hold()  # an exporter's I/O may run on `host` from here on
        img.discard(0, CS)
        assert ext.frees_waiting()
        img.flush()
        assert ext.frees_waiting()  # still pending: the ticket predates the free
        img.write(b"\x03" * CS, 2 * MIB)  # a new cluster must not land on `host`
        ext.learn(2 * MIB, CS)
        assert ext.lookup(2 * MIB, CS, write=False) not in (-1, host)
        ext.release(ticket)
        img.flush()
        assert not ext.frees_waiting()
        with pytest.raises(RequestError):  # a snapshot cannot drain an export's I/O
            held = ext.hold()
            try:
                img.create_snapshot("s")
            finally:
                ext.release(held)
    assert_check_clean(path)


def test_no_table_where_clusters_are_not_plain(tmp_path: Path) -> None:
    path = tmp_path / "enc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(path), "1M")
    with vdisk.open(str(path)) as img:
        assert isinstance(img, Qcow2Image) and img.host_extents() is None
    os.unlink(path)
