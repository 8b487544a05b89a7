"""Build qcow2 files byte by byte with struct, valid by default, with any field overridden.

The default layout (v3, 64 KiB clusters) is the smallest valid image: cluster 0 holds the header,
its extensions and the backing file name; cluster 1 the refcount table; cluster 2 the one
refcount block; cluster 3 on the L1 table. Hostile tests override single fields to break one
rule at a time. Nothing here reads the file back: the library and qemu-img are the readers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = 0x514649FB
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112  # 104 plus the compression type byte padded to 8


@dataclass
class Craft:
    """Every header field; None means "what a valid image would have"."""

    version: int = 3
    cluster_bits: int = 16
    size: int = 1 << 20
    crypt_method: int = 0
    l1_size: int | None = None
    l1_table_offset: int | None = None
    refcount_table_offset: int | None = None
    refcount_table_clusters: int = 1
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int | None = None
    compression_type: int = 0
    backing_file: bytes | None = None
    backing_file_offset: int | None = None
    backing_file_size: int | None = None
    backing_format: bytes | None = None
    feature_names: list[tuple[int, int, bytes]] = field(default_factory=list)
    extra_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    #: Raw (type, length, data) extensions written as is, lengths not checked (for lies).
    raw_extensions: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: L1 entries to write (index -> raw 64-bit entry), for hostile L2 pointers.
    l1_entries: dict[int, int] = field(default_factory=dict)
    truncate_to: int | None = None


def required_l1_size(size: int, cluster_bits: int) -> int:
    per_l2 = 1 << (cluster_bits - 3)
    cluster_size = 1 << cluster_bits
    return -(-size // (cluster_size * per_l2))


def _extension(ext_type: int, data: bytes) -> bytes:
    pad = -len(data) % 8
    return struct.pack(">II", ext_type, len(data)) + data + bytes(pad)


def _refcount_block(cluster_size: int, refcount_order: int, used_clusters: int) -> bytes:
    """A refcount block where the first ``used_clusters`` clusters have refcount 1."""
    bits = 1 << refcount_order
    block = bytearray(cluster_size)
    for i in range(used_clusters):
        if bits >= 8:
            width = bits // 8
            block[i * width : (i + 1) * width] = (1).to_bytes(width, "big")
        else:
            bit = i * bits
            block[bit // 8] |= 1 << (bit % 8)
    return bytes(block)


def build(c: Craft) -> bytes:
    """The image's bytes."""
    cluster_bits = c.cluster_bits if 9 <= c.cluster_bits <= 21 else 16
    cs = 1 << cluster_bits
    l1_size = c.l1_size if c.l1_size is not None else required_l1_size(c.size, cluster_bits)
    l1_size = min(l1_size, 0xFFFF_FFFF)
    l1_clusters = max(1, -(-min(l1_size, 1 << 16) * 8 // cs))
    rt_offset = c.refcount_table_offset if c.refcount_table_offset is not None else cs
    rb_offset = 2 * cs
    l1_offset = c.l1_table_offset if c.l1_table_offset is not None else 3 * cs
    used_clusters = 3 + l1_clusters
    header_length = c.header_length
    if header_length is None:
        header_length = V2_HEADER_LENGTH if c.version == 2 else V3_HEADER_LENGTH

    head = struct.pack(
        ">IIQIIQIIQQIIQ",
        MAGIC,
        c.version,
        0,  # backing_file_offset, patched below
        0,  # backing_file_size, patched below
        c.cluster_bits,
        c.size,
        c.crypt_method,
        l1_size,
        l1_offset,
        rt_offset,
        c.refcount_table_clusters,
        c.nb_snapshots,
        c.snapshots_offset,
    )
    if c.version >= 3:
        head += struct.pack(
            ">QQQII",
            c.incompatible_features,
            c.compatible_features,
            c.autoclear_features,
            c.refcount_order,
            header_length,
        )
        head += bytes([c.compression_type]) + bytes(7)
    extensions = b""
    if c.backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, c.backing_format)
    if c.feature_names:
        table = b"".join(
            struct.pack(">BB46s", kind, bit, name) for kind, bit, name in c.feature_names
        )
        extensions += _extension(EXT_FEATURE_NAMES, table)
    for ext_type, data in c.extra_extensions:
        extensions += _extension(ext_type, data)
    for ext_type, length, data in c.raw_extensions:
        extensions += struct.pack(">II", ext_type, length) + data
    # Extensions start right after the header (header_length for v3; 72 for v2).
    ext_start = len(head) if c.version >= 3 else V2_HEADER_LENGTH
    body = bytearray(head[:ext_start].ljust(ext_start, b"\0"))
    if c.version >= 3 and header_length > len(body) and header_length < cs:
        body = body.ljust(header_length, b"\0")
    if c.version >= 2:
        body += extensions + _extension(EXT_END, b"")[:8]
    backing_offset = c.backing_file_offset
    backing_size = c.backing_file_size
    if c.backing_file is not None:
        if backing_offset is None:
            backing_offset = len(body)
        if backing_size is None:
            backing_size = len(c.backing_file)
        if backing_offset + len(c.backing_file) <= cs:
            body[backing_offset : backing_offset + len(c.backing_file)] = c.backing_file
    struct.pack_into(">QI", body, 8, backing_offset or 0, backing_size or 0)
    if len(body) > cs:
        raise ValueError("header cluster overflow")

    image = bytearray(cs * used_clusters)
    image[: len(body)] = body
    if c.refcount_table_offset is None:
        struct.pack_into(">Q", image, cs, rb_offset)
    image[rb_offset : rb_offset + cs] = _refcount_block(cs, min(c.refcount_order, 6), used_clusters)
    if c.l1_table_offset is None:
        for index, entry in c.l1_entries.items():
            struct.pack_into(">Q", image, 3 * cs + 8 * index, entry)
    if c.truncate_to is not None:
        del image[c.truncate_to :]
    return bytes(image)


def write(path: str, c: Craft) -> str:
    with open(path, "wb") as f:
        f.write(build(c))
    return path
