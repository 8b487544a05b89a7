"""Pure codec tests for vdisk.qcow2.format (no files)."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from vdisk.errors import CorruptImageError, FormatError, UnsupportedFeatureError
from vdisk.qcow2 import format as fmt


def v3_header(**kw: object) -> fmt.Header:
    h = fmt.Header(
        version=3,
        cluster_bits=16,
        size=1 << 30,
        l1_size=2,
        l1_table_offset=3 << 16,
        refcount_table_offset=1 << 16,
        refcount_table_clusters=1,
    )
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def test_header_roundtrip_v3_with_extensions() -> None:
    h = v3_header(backing_file="base.qcow2", compatible_features=1)
    h.set_extension(fmt.EXT_BACKING_FORMAT, b"qcow2")
    h.set_extension(fmt.EXT_FEATURE_TABLE, fmt.default_feature_table())
    h.set_extension(0x12345678, b"unknown extension payload")
    blob = h.encode()
    d = fmt.Header.decode(blob + bytes(65536 - len(blob)))
    assert d.backing_file == "base.qcow2"
    assert d.backing_format == "qcow2"
    assert d.feature_names[(0, 0)] == "dirty bit"
    assert d.extension(0x12345678) is not None
    assert d.extension(0x12345678).data == b"unknown extension payload"  # type: ignore[union-attr]
    assert d.lazy_refcounts
    assert d.encode() == blob


def test_header_roundtrip_v2() -> None:
    h = fmt.Header(
        version=2,
        cluster_bits=12,
        size=1 << 20,
        l1_size=1,
        header_length=72,
        l1_table_offset=4096 * 3,
        refcount_table_offset=4096,
        refcount_table_clusters=1,
        extra_fields=b"",
    )
    blob = h.encode()
    assert len(blob) == 72 + 8
    d = fmt.Header.decode(blob)
    assert (d.version, d.refcount_order, d.header_length) == (2, 4, 72)
    assert d.encode() == blob


def test_unknown_header_fields_are_kept() -> None:
    h = v3_header(header_length=128, extra_fields=b"\0" * 7 + b"futurefield12345")
    h.compression_type = 0
    blob = h.encode()
    d = fmt.Header.decode(blob)
    assert d.header_length == 128
    assert d.extra_fields.endswith(b"futurefield12345")
    assert d.encode() == blob


def test_compression_type_field() -> None:
    h = v3_header(compression_type=1, incompatible_features=fmt.INCOMPAT_COMPRESSION)
    d = fmt.Header.decode(h.encode())
    assert d.compression_type == 1 and d.compression_name == "zstd"
    d.validate(1 << 20)
    bad = v3_header(compression_type=1)
    with pytest.raises(FormatError, match="compression_type"):
        fmt.Header.decode(bad.encode()).validate(1 << 20)


@pytest.mark.parametrize(
    ("field", "value", "exc", "word"),
    [
        ("l1_table_offset", (3 << 16) + 512, CorruptImageError, "l1_table_offset"),
        ("l1_size", 5 << 20, FormatError, "l1_size"),
        ("refcount_table_clusters", 200, FormatError, "refcount_table_clusters"),
        ("refcount_table_offset", 1 << 40, CorruptImageError, "refcount_table_offset"),
        ("l1_size", 1, CorruptImageError, "l1_size"),
        ("snapshots_offset", 100, CorruptImageError, "snapshots_offset"),
    ],
)
def test_validation_names_the_field(field: str, value: int, exc: type, word: str) -> None:
    h = v3_header(**{field: value})
    with pytest.raises(exc, match=word):
        fmt.Header.decode(h.encode()).validate(1 << 20)


def test_decode_rejects_bad_values() -> None:
    with pytest.raises(FormatError, match="magic"):
        fmt.Header.decode(b"\0" * 512)
    for bits in (8, 22):
        blob = bytearray(v3_header().encode())
        struct.pack_into(">I", blob, 20, bits)
        with pytest.raises(FormatError, match="cluster_bits"):
            fmt.Header.decode(blob)
    blob = bytearray(v3_header().encode())
    struct.pack_into(">I", blob, 96, 7)
    with pytest.raises(FormatError, match="refcount_order"):
        fmt.Header.decode(blob)
    blob = bytearray(v3_header().encode())
    struct.pack_into(">I", blob, 4, 4)
    with pytest.raises(UnsupportedFeatureError, match="version"):
        fmt.Header.decode(blob)
    blob = bytearray(v3_header().encode())
    struct.pack_into(">I", blob, 100, 105)
    with pytest.raises(FormatError, match="header_length"):
        fmt.Header.decode(blob)


def test_feature_table_codec() -> None:
    names = {(0, 7): "future feature", (2, 3): "x" * 46}
    assert fmt.decode_feature_table(fmt.encode_feature_table(names)) == names


def test_l2_entry_types() -> None:
    assert fmt.l2_entry_type(0) == fmt.UNALLOCATED
    assert fmt.l2_entry_type(fmt.OFLAG_ZERO) == fmt.ZERO_PLAIN
    assert fmt.l2_entry_type(0x50000 | fmt.OFLAG_ZERO | fmt.OFLAG_COPIED) == fmt.ZERO_ALLOC
    assert fmt.l2_entry_type(0x50000 | fmt.OFLAG_COPIED) == fmt.NORMAL
    assert fmt.l2_entry_type(fmt.OFLAG_COMPRESSED | 5) == fmt.COMPRESSED
    assert fmt.encode_l2_entry(0x50000) == 0x50000 | fmt.OFLAG_COPIED


def test_subcluster_types() -> None:
    host = 0x40000 | fmt.OFLAG_COPIED
    bitmap = 0b01 | (0b10 << 32)
    assert fmt.subcluster_type(host, bitmap, 0) == fmt.NORMAL
    assert fmt.subcluster_type(host, bitmap, 1) == fmt.ZERO_ALLOC
    assert fmt.subcluster_type(host, bitmap, 2) == fmt.UNALLOCATED_ALLOC
    assert fmt.subcluster_type(0, 1 << 33, 1) == fmt.ZERO_PLAIN
    assert fmt.subcluster_type(0, 0, 5) == fmt.UNALLOCATED
    with pytest.raises(CorruptImageError):
        fmt.subcluster_type(host, 1 | (1 << 32), 0)


@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_compressed_descriptor_roundtrip(cluster_bits: int) -> None:
    for offset, length in [(0x12345, 700), (1 << 30 | 17, 1 << cluster_bits), (512, 1)]:
        if length > 1 << cluster_bits:
            continue
        e = fmt.encode_compressed(offset, length, cluster_bits)
        got_off, got_len = fmt.decode_compressed(e, cluster_bits)
        assert got_off == offset
        assert got_len >= length and got_len - length < 512
        clusters = fmt.compressed_host_clusters(e, cluster_bits)
        assert clusters.start == offset >> cluster_bits
        assert clusters.stop - 1 == (offset + got_len - 1) >> cluster_bits


@pytest.mark.parametrize("order", range(7))
def test_refcount_block_codec(order: int) -> None:
    rng = random.Random(order)
    bits = 1 << order
    cluster = 4096
    n = cluster * 8 // bits
    values = np.array([rng.randrange(0, 1 << bits) for _ in range(n)], dtype=np.uint64)
    blob = fmt.encode_refcount_block(values, order)
    assert len(blob) == cluster
    assert np.array_equal(fmt.decode_refcount_block(blob, order), values)
    buf = bytearray(blob)
    for i in rng.sample(range(n), 50):
        assert fmt.refcount_get(buf, i, order) == int(values[i])
        v = rng.randrange(0, 1 << bits)
        fmt.refcount_set(buf, i, order, v)
        values[i] = v
    assert np.array_equal(fmt.decode_refcount_block(bytes(buf), order), values)
    with pytest.raises(FormatError):
        fmt.refcount_set(buf, 0, order, 1 << bits)


def test_refcount_subbyte_bit_order() -> None:
    # Bit 0 is the least significant: with 1-bit refcounts, entry 0 is bit 0 of byte 0.
    assert fmt.decode_refcount_block(b"\x01" + bytes(7), 0)[:8].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert fmt.decode_refcount_block(b"\x0e" + bytes(7), 2)[:2].tolist() == [14, 0]


def test_table_codec() -> None:
    vals = np.array([0, 1 << 63 | 0x10000, 0x7FFF0000], dtype=np.uint64)
    assert np.array_equal(fmt.decode_table(fmt.encode_table(vals)), vals)


def test_snapshot_and_bitmap_codecs() -> None:
    extra = struct.pack(">QQq", 77, 1 << 30, -1)
    entry = struct.pack(">QIHHIIQII", 0x30000, 16, 1, 4, 100, 200, 300, 0, len(extra))
    entry += extra + b"1" + b"snap"
    entry += bytes(-len(entry) % 8)
    (snap,) = fmt.decode_snapshot_table(entry, 1)
    assert (snap.id_str, snap.name, snap.vm_state_size, snap.disk_size, snap.icount) == (
        "1",
        "snap",
        77,
        1 << 30,
        -1,
    )
    bm = struct.pack(">QIIBBHI", 0x50000, 2, 2, 1, 16, 3, 0) + b"bm0"
    bm += bytes(-len(bm) % 8)
    (d,) = fmt.decode_bitmap_directory(bm, 1)
    assert (d.name, d.granularity_bits, d.bitmap_table_size) == ("bm0", 16, 2)
    ext = fmt.BitmapsExtension(1, len(bm), 0x60000)
    assert fmt.BitmapsExtension.decode(ext.encode()) == ext
