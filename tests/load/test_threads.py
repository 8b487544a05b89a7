"""32 threads of mixed I/O on one image, judged by a model and by QEMU.

Each thread owns one region of the guest and keeps its own model of it, so it can verify every
read it makes while the others write, zero, discard and flush around it. Afterwards
``qemu-img check`` must find the image clean and QEMU must read exactly the models' bytes.
A few seconds in CI; VDISK_SOAK=1 runs longer (VDISK_LOAD_SECONDS overrides both).
Snapshot create/delete and bitmap changes join when those features land.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from oracles import assert_check_clean, needs_qemu, qemu_to_raw
from vdisk.qcow2 import Qcow2Image, create

pytestmark = needs_qemu

THREADS = 32
REGION = 1 << 20
SECONDS = float(
    os.environ.get("VDISK_LOAD_SECONDS", "60" if os.environ.get("VDISK_SOAK") == "1" else "3")
)
FIGURES: list[str] = []


def _worker(
    img: Qcow2Image,
    index: int,
    model: bytearray,
    loose: bytearray,
    stop: float,
    ops: Counter[str],
) -> list[str]:
    rng = random.Random(index)
    base = index * REGION
    problems: list[str] = []  # loose[s] = 1: sector s was discarded, reads as before or zeros
    while time.monotonic() < stop and not problems:
        length = rng.choice((512, 4096, 8192, 65536, 200704))
        off = rng.randrange(0, (REGION - length) // 512 + 1) * 512
        roll = rng.random()
        if roll < 0.40:
            data = rng.randbytes(length)
            img.write(data, base + off, fua=roll < 0.02)
            model[off : off + length] = data
            loose[off // 512 : (off + length) // 512] = bytes(length // 512)
            ops["write"] += 1
        elif roll < 0.75:
            got = img.pread(length, base + off)
            if not _matches(got, model, loose, off):
                problems.append(f"thread {index}: read at {base + off:#x}+{length} differs")
            ops["read"] += 1
        elif roll < 0.85:
            img.write_zeroes(base + off, length, may_unmap=rng.random() < 0.5)
            model[off : off + length] = bytes(length)
            loose[off // 512 : (off + length) // 512] = bytes(length // 512)
            ops["zero"] += 1
        elif roll < 0.95:
            img.discard(base + off, length)  # a hint: whole clusters may go, the rest stays
            loose[off // 512 : (off + length) // 512] = b"\1" * (length // 512)
            ops["discard"] += 1
        else:
            img.flush()
            ops["flush"] += 1
    return problems


def _matches(got: bytes, model: bytearray, loose: bytearray, off: int) -> bool:
    """Every sector reads as modelled, or (if discarded since) as zeros."""
    if got == model[off : off + len(got)]:
        return True
    for i in range(0, len(got), 512):
        sector = got[i : i + 512]
        if sector != model[off + i : off + i + 512]:
            if not (loose[(off + i) // 512] and sector == bytes(512)):
                return False
            model[off + i : off + i + 512] = sector  # what it reads now, it keeps
            loose[(off + i) // 512] = 0
    return True


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_32_threads_of_mixed_io(tmp_path: Path, cluster_size: int) -> None:
    path = tmp_path / "load.qcow2"
    create(str(path), THREADS * REGION, cluster_size=cluster_size)
    models = [bytearray(REGION) for _ in range(THREADS)]
    looses = [bytearray(REGION // 512) for _ in range(THREADS)]
    counters = [Counter[str]() for _ in range(THREADS)]
    results: list[list[str]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    # Small caches: L2 tables and refcount blocks are evicted and reloaded all the time.
    img = Qcow2Image.open(str(path), l2_cache_size=16 * 1024, refcount_cache_size=16 * 1024)
    stop = time.monotonic() + SECONDS

    def run(i: int) -> None:
        try:
            results[i] = _worker(img, i, models[i], looses[i], stop, counters[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    img.close()
    total = sum(counters, Counter[str]())
    FIGURES.append(
        f"cluster_size={cluster_size}: {sum(total.values())} ops in {SECONDS:g} s by {THREADS} "
        f"threads ({', '.join(f'{k} {v}' for k, v in sorted(total.items()))})"
    )
    assert not errors, errors
    problems = [p for r in results for p in r]
    assert not problems, problems[:5]
    assert_check_clean(path)
    raw = qemu_to_raw(path, tmp_path / "load.raw")
    for i, model in enumerate(models):
        got = raw[i * REGION : (i + 1) * REGION]
        assert _matches(got, model, looses[i], 0), f"QEMU reads region {i} differently"
