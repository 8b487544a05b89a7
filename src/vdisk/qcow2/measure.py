"""How large a new image would be (``qemu-img measure``), with QEMU's arithmetic.

``fully_allocated`` is every data cluster plus the metadata for all of them: one header cluster,
every L2 table, the L1 table (whole clusters) and the refcount blocks and table covering all of
that. ``required`` counts the same metadata but only the data clusters the input really holds
(all of them without an input, the data clusters of its non-zero extents with one, or all of
them with falloc/full preallocation). ``bitmaps`` (qcow2 v3 target, qcow2 input) is the room
its persistent bitmaps would take: their data, their tables and the directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..block import BlockDevice
from ..errors import RequestError

L1E_SIZE = 8
L2E_SIZE = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8
BME_TABLE_ENTRY_SIZE = 8
MAX_L1_BYTES = 32 << 20  # QEMU's limit on the L1 table
BITMAP_DIR_ENTRY_SIZE = 24  # the fixed part of a bitmap directory entry


@dataclass(frozen=True)
class Measure:
    required: int
    fully_allocated: int
    bitmaps: int | None = None  # None: not reported (target or input without bitmap support)


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _div_up(a, b) * b


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table needed to count ``clusters`` plus themselves."""
    per_block = cluster_size * 8 >> refcount_order
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    blocks = table = 0
    n = -1
    while True:
        last = n
        blocks = _div_up(clusters + table + blocks, per_block)
        table = _div_up(blocks, per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """A fully allocated image's file size: data plus all of its metadata."""
    aligned = _round_up(total, cluster_size)
    l2e = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE
    meta = cluster_size  # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def data_required(dev: BlockDevice, size: int, cluster_size: int) -> int:
    """Bytes of target data clusters the non-zero extents of ``dev`` touch (QEMU's count)."""
    required = 0
    offset = 0
    while offset < size:
        extents = dev.block_status(offset, size - offset)
        if not extents:
            raise RequestError(f"no block status at offset {offset}")
        ext = extents[0]
        n = min(ext.length, size - offset)
        if n <= 0:
            raise RequestError(f"empty block status at offset {offset}")
        if not ext.zero and ext.data:
            # Whole target clusters; the rest of the last one is skipped.
            n = _round_up(offset + n, cluster_size) - offset
            required += offset % cluster_size + n
        offset += n
    return required


def bitmaps_size(bitmaps: list[tuple[str, int]], size: int, cluster_size: int) -> int:
    """Room for persistent bitmaps ``(name, granularity)`` of an image of ``size`` bytes."""
    total = 0
    directory = 0
    for name, granularity in bitmaps:
        nbytes = _div_up(_div_up(size, granularity), 8)
        nclusters = _div_up(nbytes, cluster_size)
        total += nclusters * cluster_size
        total += _round_up(nclusters * BME_TABLE_ENTRY_SIZE, cluster_size)
        directory += _round_up(BITMAP_DIR_ENTRY_SIZE + len(name.encode()), 8)
    return total + _round_up(directory, cluster_size)


def measure_qcow2(
    virtual_size: int,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    preallocation: str = "off",
    required_data: int | None = None,
    bitmaps: int | None = None,
) -> Measure:
    """``required_data``: data bytes the input needs (None: measuring a size, no data)."""
    aligned = _round_up(virtual_size, cluster_size)
    l2e = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE
    l2_tables = _div_up(virtual_size // cluster_size, cluster_size // l2e)
    if l2_tables * L1E_SIZE > MAX_L1_BYTES:
        raise RequestError("The image size is too large (try using a larger cluster size)")
    required = required_data or 0
    if preallocation in ("falloc", "full"):
        required = aligned
    full = prealloc_size(aligned, cluster_size, refcount_bits.bit_length() - 1, extended_l2)
    return Measure(full - aligned + required, full, bitmaps)


def measure_raw(size: int) -> Measure:
    size = _round_up(size, 512)
    return Measure(size, size)
