"""Concurrency stress: 16 threads write and read one image at once.

Each thread owns a private region and checks every read there against its own model (byte
ranges at any offset and length, so writes share clusters and L2 tables with neighbours; some
requests zero, with and without unmap, or discard, freeing clusters while others allocate). All
threads also write whole 4 KiB blocks of one shared region, each block a self-describing stamp
(thread, sequence number, checksum-like fill). Afterwards:
- `qemu-img check` is clean (no leaked or doubly used clusters, no corruption);
- private regions equal their models exactly, read by vdisk and by `qemu-img convert`;
- every shared block ever written holds one complete stamp (not torn, not lost to zeros).
"""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import pytest

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_to_raw

pytestmark = [needs_qemu, pytest.mark.timeout(300)]

THREADS = 16
BLOCK = 4096
OPS_PER_THREAD = 250


def _stamp(tid: int, seq: int) -> bytes:
    head = struct.pack(">IIQ", 0x5354414D, tid, seq)  # "STAM"
    fill = bytes(((tid * 31 + seq * 17 + i) & 0xFF) for i in range(256))
    body = (fill * (BLOCK // 256))[: BLOCK - len(head)]
    return head + body


def _stamp_ok(block: bytes) -> bool:
    magic, tid, seq = struct.unpack_from(">IIQ", block)
    return magic == 0x5354414D and tid < THREADS and block == _stamp(tid, seq)


@pytest.mark.parametrize(
    ("cluster_size", "refcount_bits", "compat"),
    [(65536, 16, "1.1"), (4096, 16, "1.1"), (512, 64, "1.1"), (4096, 16, "0.10")],
    ids=["c64k", "c4k", "c512-r64", "c4k-v2"],
)
def test_sixteen_threads(
    tmp_path: Path, cluster_size: int, refcount_bits: int, compat: str
) -> None:
    private = 1 << 20  # per thread
    shared_blocks = 512
    shared_start = THREADS * private
    size = shared_start + shared_blocks * BLOCK
    image = str(tmp_path / "stress.qcow2")
    vdisk.create(
        image,
        size,
        format="qcow2",
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        compat=compat,
    )
    models = [bytearray(private) for _ in range(THREADS)]
    written: set[int] = set()
    written_lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    with vdisk.open(image) as dev:

        def worker(tid: int) -> None:
            rng = random.Random(tid)
            base = tid * private
            model = models[tid]
            try:
                start.wait()
                for seq in range(OPS_PER_THREAD):
                    choice = rng.random()
                    if choice < 0.08:
                        # Zeroing (with and without unmap) and discard free clusters that other
                        # threads may be allocating at the same moment.
                        offset = rng.randrange(private)
                        length = rng.randint(1, min(private - offset, 3 * cluster_size))
                        if rng.random() < 0.6:
                            dev.write_zeroes(base + offset, length, may_unmap=rng.random() < 0.5)
                            model[offset : offset + length] = bytes(length)
                        else:
                            dev.discard(base + offset, length)
                            after = bytearray(length)  # discard may leave old data or zeros
                            dev.readinto(after, base + offset)
                            old = model[offset : offset + length]
                            if any(a != o and a != 0 for a, o in zip(after, old)):
                                raise AssertionError(f"thread {tid}: discard left foreign data")
                            model[offset : offset + length] = after
                    elif choice < 0.45:
                        offset = rng.randrange(private)
                        length = rng.randint(1, min(private - offset, 3 * cluster_size + 100))
                        data = rng.randbytes(length)
                        dev.write(data, base + offset)
                        model[offset : offset + length] = data
                    elif choice < 0.75:
                        offset = rng.randrange(private)
                        length = rng.randint(1, min(private - offset, 200_000))
                        buf = bytearray(length)
                        dev.readinto(buf, base + offset)
                        if buf != model[offset : offset + length]:
                            raise AssertionError(f"thread {tid}: read mismatch at +{offset}")
                    elif choice < 0.95:
                        block = rng.randrange(shared_blocks)
                        dev.write(_stamp(tid, seq), shared_start + block * BLOCK)
                        with written_lock:
                            written.add(block)
                    else:
                        block = rng.randrange(shared_blocks)
                        # Snapshot before the read: a write still in flight may read as zeros.
                        with written_lock:
                            was_written = block in written
                        buf = bytearray(BLOCK)
                        dev.readinto(buf, shared_start + block * BLOCK)
                        # A block written before this read started cannot read as zeros.
                        if was_written and not _stamp_ok(bytes(buf)):
                            raise AssertionError(f"thread {tid}: shared block {block} torn")
                    if seq % 64 == 63:
                        dev.flush()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]

    assert_check_clean(image)
    raw = qemu_to_raw(image, tmp_path / "stress.raw")
    with vdisk.open(image, readonly=True) as dev:
        ours = dev.pread(size, 0)  # type: ignore[attr-defined]
    assert ours == raw, "vdisk and qemu-img read different contents"
    for tid in range(THREADS):
        assert raw[tid * private : (tid + 1) * private] == models[tid], f"thread {tid} region"
    for block in range(shared_blocks):
        data = raw[shared_start + block * BLOCK : shared_start + (block + 1) * BLOCK]
        if block in written:
            assert _stamp_ok(data), f"shared block {block} torn or lost"
        else:
            assert data == bytes(BLOCK), f"shared block {block} never written but not zero"
