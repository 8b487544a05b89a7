"""Basic concurrency: threads write and read one image at once."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from oracles import assert_check_clean, assert_compare_equal, needs_qemu
from vdisk.qcow2 import Qcow2Image, create

pytestmark = needs_qemu


def test_threads_write_disjoint_and_shared_ranges(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    size = 16 << 20
    create(str(img), size, cluster_size=4096)
    n_threads = 8
    slot = size // n_threads
    errors: list[BaseException] = []
    with Qcow2Image.open(str(img), l2_cache_size=8192) as dev:  # tiny cache: evictions too

        def worker(k: int) -> None:
            try:
                rng = random.Random(k)
                base = k * slot
                for i in range(150):
                    off = base + rng.randrange(0, slot - 20000)
                    n = rng.randrange(1, 20000)
                    # Each thread owns its slot; partial-cluster writes at slot edges share
                    # clusters with neighbours only through COW of unallocated clusters.
                    dev.write(bytes([k + 1]) * n, off)
                    got = dev.pread(n, off)
                    assert got == bytes([k + 1]) * n, (k, i)
                    if i % 40 == 0:
                        dev.discard(base, 8192)
                        dev.flush()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        final = dev.pread(size, 0)
    raw = tmp_path / "t.raw"
    raw.write_bytes(final)
    assert_check_clean(img)
    assert_compare_equal(img, raw)


def test_threads_share_clusters(tmp_path: Path) -> None:
    # Many threads write different bytes of the same unallocated clusters: no lost updates.
    img = tmp_path / "s.qcow2"
    create(str(img), 1 << 20)
    with Qcow2Image.open(str(img)) as dev:

        def worker(k: int) -> None:
            for c in range(16):
                dev.write(bytes([k + 1]), c * 65536 + k * 7)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in range(16):
            for k in range(16):
                assert dev.pread(1, c * 65536 + k * 7) == bytes([k + 1])
    assert_check_clean(img)


@pytest.mark.parametrize(
    ("cluster_size", "extra"),
    [
        (4096, {}),
        (512, {"refcount_bits": 64}),
        (65536, {"compat": "0.10"}),
        (16384, {"extended_l2": True}),
    ],
    ids=["c4k", "c512-r64", "v2", "extl2"],
)
def test_threads_overlapping_write_zero_discard(
    tmp_path: Path, cluster_size: int, extra: dict[str, object]
) -> None:
    """Overlapping writes, zeroes, discards and flushes from 12 threads with a tiny cache:
    the image stays structurally clean and QEMU reads what we read."""
    img = tmp_path / "o.qcow2"
    size = 8 << 20
    create(str(img), size, cluster_size=cluster_size, **extra)  # type: ignore[arg-type]
    errors: list[BaseException] = []
    dev = Qcow2Image.open(
        str(img), l2_cache_size=2 * cluster_size, refcount_cache_size=2 * cluster_size
    )

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for _ in range(150):
                off = rng.randrange(0, size - 200000)
                n = rng.randrange(1, 200000)
                r = rng.random()
                if r < 0.5:
                    dev.write(os.urandom(n), off)
                elif r < 0.65:
                    dev.discard(off, n)
                elif r < 0.8:
                    dev.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
                elif r < 0.85:
                    dev.flush()
                else:
                    dev.pread(n, off)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = dev.pread(size, 0)
    dev.close()
    assert not errors, errors
    raw = tmp_path / "o.raw"
    raw.write_bytes(final)
    assert_check_clean(img)
    assert_compare_equal(img, raw)
