"""Basic concurrency: threads write and read one image at once."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from q2util import assert_clean, compare, needs_qemu

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
    assert_clean(img)
    compare(img, raw)


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
    assert_clean(img)
