"""Hypothesis on the pure decoders of qcow2/format.py: any input decodes or raises VdiskError.

Header (with its extensions) from random bytes and from mutated real headers, then
``validate``; L1/L2/refcount-table words; refcount blocks of every width (and their round
trip); the snapshot table; the bitmap directory and extension; the crypto extension.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.errors import VdiskError
from vdisk.qcow2 import create
from vdisk.qcow2 import format as fmt

EXAMPLES = 2000 if os.environ.get("VDISK_SOAK") == "1" else 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
COUNTS: dict[str, int] = {}  # examples run per target, for the summary


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@cache
def real_headers() -> list[bytes]:
    """First clusters of images vdisk creates: v2, v3, extended L2, lazy, with a backing name."""
    out = []
    variants: list[dict[str, object]] = [
        {"compat": "0.10"},
        {"cluster_size": 4096},
        {"cluster_size": 16384, "extended_l2": True},
        {"lazy_refcounts": True, "refcount_bits": 64},
        {"cluster_size": 512, "refcount_bits": 1},
    ]
    with tempfile.TemporaryDirectory() as where:
        for i, options in enumerate(variants):
            path = os.path.join(where, f"{i}.qcow2")
            create(path, 1 << 30, **options)  # type: ignore[arg-type]
            with open(path, "rb") as f:
                out.append(f.read(4096))
    return out


def _decode_header(buf: bytes, file_size: int) -> None:
    try:
        header = fmt.Header.decode(buf)
        header.validate(file_size)
        _ = (header.backing_format, header.data_file, header.feature_names, header.compat)
        _ = (header.bitmaps, header.crypto, header.compression_name)
    except VdiskError:
        pass


@FUZZ
@given(st.binary(min_size=0, max_size=1024), st.integers(0, 1 << 48))
def test_header_from_random_bytes(buf: bytes, file_size: int) -> None:
    _count("header (random bytes)")
    _decode_header(fmt.MAGIC + buf, file_size)


@FUZZ
@given(
    st.integers(0, 4),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 1 << 34),
)
def test_header_mutated(which: int, edits: list[tuple[int, int]], file_size: int) -> None:
    _count("header (mutated real header)")
    buf = bytearray(real_headers()[which])
    for offset, value in edits:
        buf[offset] = value
    _decode_header(bytes(buf), file_size)


@FUZZ
@given(st.binary(min_size=0, max_size=512))
def test_extensions(data: bytes) -> None:
    _count("header extensions")
    for decode in (fmt.BitmapsExtension.decode, fmt.CryptoExtension.decode):
        try:
            decode(data)
        except VdiskError:
            pass
    try:
        fmt.decode_feature_table(data)
    except VdiskError:
        pass


@FUZZ
@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=64), st.integers(9, 21))
def test_table_entries(words: list[int], cluster_bits: int) -> None:
    _count("L1/L2 entries")
    raw = b"".join(w.to_bytes(8, "big") for w in words)
    table = fmt.decode_table(raw)
    assert fmt.encode_table(table) == raw
    for i, entry in enumerate(words):
        fmt.l2_entry_type(entry)
        fmt.l2_entry_type(entry, version=2)
        if entry & fmt.OFLAG_COMPRESSED:
            offset, length = fmt.decode_compressed(entry, cluster_bits)
            assert length > 0 and offset >= 0
            assert len(fmt.compressed_host_clusters(entry, cluster_bits)) >= 1
        try:
            fmt.subcluster_type(entry, words[(i + 1) % len(words)], i % 32)
        except VdiskError:
            pass


@FUZZ
@given(st.integers(0, 6), st.integers(9, 16), st.randoms(use_true_random=False))
def test_refcount_blocks(order: int, cluster_bits: int, rnd: object) -> None:
    _count("refcount blocks")
    import random

    assert isinstance(rnd, random.Random)
    raw = rnd.randbytes(1 << cluster_bits)
    entries = fmt.decode_refcount_block(raw, order)
    assert entries.size == (8 << cluster_bits) >> order
    assert fmt.encode_refcount_block(entries, order) == raw
    index = rnd.randrange(entries.size)
    assert fmt.refcount_get(raw, index, order) == int(entries[index])
    buf = bytearray(raw)
    value = rnd.randrange(1 << (1 << order))
    fmt.refcount_set(buf, index, order, value)
    assert fmt.refcount_get(buf, index, order) == value
    assert np.count_nonzero(fmt.decode_refcount_block(buf, order) != entries) <= 1


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 70000))
def test_snapshot_table(buf: bytes, count: int) -> None:
    _count("snapshot table")
    try:
        entries = fmt.decode_snapshot_table(buf, min(count, 200))
    except VdiskError:
        return
    assert len(entries) == min(count, 200)


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 200))
def test_bitmap_directory(buf: bytes, count: int) -> None:
    _count("bitmap directory")
    try:
        entries = fmt.decode_bitmap_directory(buf, count)
    except VdiskError:
        return
    assert len(entries) == count
