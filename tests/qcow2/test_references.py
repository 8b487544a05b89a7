"""The reference walk on images QEMU made: its counts are QEMU's refcounts, and the metadata set
it gives the allocator holds every structure and no guest data.

The images carry compressed clusters (``qemu-img convert -c``), internal snapshots
(``qemu-img snapshot -c``) and persistent bitmaps (``qemu-img bitmap --add``, with data written
by qemu-io so that bitmap tables and data clusters exist).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import vdisk
from oracles import needs_qemu, qemu_check, qemu_map
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.references import ReferenceWalk, StoredRefcounts, metadata_clusters

pytestmark = needs_qemu


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def qemu_made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("refs")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 4096 + os.urandom(4096) * (i % 2) + bytes(4096 * (1 - i % 2)))
    image = d / "img.qcow2"
    _run(
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw,
        image,
    )
    _run("qemu-img", "snapshot", "-c", "s1", image)
    _run("qemu-img", "bitmap", "--add", image, "b0")
    _run("qemu-img", "bitmap", "--add", "-g", "64k", image, "b1")
    _run("qemu-io", "-c", "write -P 7 0 64k", "-c", "write -P 8 300k 100k", image)
    _run("qemu-img", "snapshot", "-c", "s2", image)
    _run("qemu-io", "-c", "write -P 9 64k 64k", image)
    report = qemu_check(image)
    assert report["rc"] == 0, report
    return image


def _header(fd: int) -> fmt.Header:
    head = bytearray(1 << 16)
    os.preadv(fd, [head], 0)
    return fmt.Header.decode(head)


def test_expected_refcounts_are_qemus(qemu_made: Path) -> None:
    fd = os.open(qemu_made, os.O_RDONLY)
    try:
        header = _header(fd)
        size = os.fstat(fd).st_size
        walk = ReferenceWalk(fd, header, size, str(qemu_made))
        counts = walk.expected_refcounts()
        stored, unreadable = StoredRefcounts(fd, header).range_values(counts.size)
    finally:
        os.close(fd)
    assert walk.found.messages == []
    assert (walk.found.corruptions, walk.found.check_errors) == (0, 0)
    assert not unreadable.any()
    assert np.array_equal(counts, stored)
    assert walk.found.compressed_clusters > 0  # the walk saw compressed clusters
    assert int(counts.max()) >= 2  # and clusters shared with the snapshots


def test_metadata_set_holds_structures_not_data(qemu_made: Path) -> None:
    fd = os.open(qemu_made, os.O_RDONLY)
    try:
        header = _header(fd)
        size = os.fstat(fd).st_size
        meta = metadata_clusters(fd, header, size, str(qemu_made)).all
        counts = ReferenceWalk(fd, header, size, str(qemu_made)).expected_refcounts()
    finally:
        os.close(fd)
    cb = header.cluster_bits
    data = set()
    for extent in qemu_map(qemu_made):
        if extent.get("data") and "offset" in extent:
            first = extent["offset"] >> cb
            data.update(range(first, first + (extent["length"] >> cb)))
    assert data, "qemu-img map found no data at a host offset"
    assert not meta & data
    bitmaps = header.bitmaps
    assert bitmaps is not None and header.nb_snapshots == 2
    structures = {
        0,
        header.l1_table_offset >> cb,
        header.refcount_table_offset >> cb,
        header.snapshots_offset >> cb,
        bitmaps.directory_offset >> cb,
    }
    assert structures <= meta
    # Everything in the set carries a reference (no stray cluster is fenced off).
    assert all(counts[c] > 0 for c in meta)
    with vdisk.open(str(qemu_made), readonly=True) as dev:
        assert dev.metadata == meta  # type: ignore[attr-defined]
