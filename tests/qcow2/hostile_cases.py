"""The hostile qcow2 headers: one broken rule each, built with qcow2_craft."""

from __future__ import annotations

from dataclasses import dataclass

from qcow2_craft import EXT_FEATURE_NAMES, Craft

from vdisk.errors import (
    CorruptImageError,
    FormatError,
    UnsupportedFeatureError,
    VdiskError,
)

CS = 1 << 16
TIB = 1 << 40


@dataclass(frozen=True)
class Case:
    name: str
    craft: Craft
    #: The error class opening must raise (the most specific we promise); None: the image may
    #: open (QEMU accepts it too), but anything raised must be a VdiskError.
    error: type[VdiskError] | None = FormatError
    #: Opening read-only is fine (only read-write must fail), e.g. the corrupt bit.
    readonly_ok: bool = False
    #: Words the message must contain (case-insensitive), e.g. the feature's name.
    mentions: tuple[str, ...] = ()


CASES: list[Case] = [
    Case("bad-version-1", Craft(version=1), FormatError),
    Case("bad-version-4", Craft(version=4), VdiskError),
    Case("cluster-bits-8", Craft(cluster_bits=8)),
    Case("cluster-bits-22", Craft(cluster_bits=22)),
    Case("cluster-bits-0", Craft(cluster_bits=0)),
    Case("cluster-bits-255", Craft(cluster_bits=255)),
    Case("cluster-bits-2^32-1", Craft(cluster_bits=0xFFFFFFFF)),
    Case("refcount-order-7", Craft(refcount_order=7), VdiskError),
    Case("refcount-order-huge", Craft(refcount_order=0xFFFFFFFF), VdiskError),
    Case("l1-huge", Craft(l1_size=0x1000_0000)),
    Case("l1-2^32-1", Craft(l1_size=0xFFFF_FFFF)),
    Case("l1-too-small-for-size", Craft(size=TIB, l1_size=1)),
    Case("size-2^63", Craft(size=1 << 63)),
    Case("l1-past-eof", Craft(l1_table_offset=TIB)),
    Case("l1-misaligned", Craft(l1_table_offset=3 * CS + 8)),
    Case("l1-offset-zero", Craft(l1_table_offset=0), None),
    Case("refcount-table-past-eof", Craft(refcount_table_offset=TIB)),
    Case("refcount-table-misaligned", Craft(refcount_table_offset=CS + 512)),
    Case("refcount-table-huge", Craft(refcount_table_clusters=0x1000_0000)),
    Case("refcount-table-zero-clusters", Craft(refcount_table_clusters=0)),
    Case("refcount-table-offset-zero", Craft(refcount_table_offset=0), None),
    Case("snapshots-past-eof", Craft(nb_snapshots=1, snapshots_offset=TIB)),
    Case("snapshots-misaligned", Craft(nb_snapshots=1, snapshots_offset=CS + 4)),
    Case("snapshots-too-many", Craft(nb_snapshots=0xFFFF_FFFF, snapshots_offset=4 * CS)),
    Case(
        "unknown-incompat-bit",
        Craft(incompatible_features=1 << 10),
        UnsupportedFeatureError,
    ),
    Case(
        "unknown-incompat-bit-named",
        Craft(incompatible_features=1 << 10, feature_names=[(0, 10, b"frobnicate")]),
        UnsupportedFeatureError,
        mentions=("frobnicate",),
    ),
    Case(
        "unknown-incompat-bit-63",
        Craft(incompatible_features=1 << 63, feature_names=[(0, 63, b"bit-sixty-three")]),
        UnsupportedFeatureError,
        mentions=("bit-sixty-three",),
    ),
    Case(
        "corrupt-bit-read-write",
        Craft(incompatible_features=1 << 1),
        CorruptImageError,
        readonly_ok=True,
    ),
    Case("header-length-0", Craft(header_length=0)),
    Case("header-length-50", Craft(header_length=50)),
    Case("header-length-odd", Craft(header_length=107), None),
    Case("header-length-past-cluster", Craft(header_length=CS + 8)),
    Case("header-length-2^32-1", Craft(header_length=0xFFFF_FFFF)),
    Case(
        "backing-name-huge",
        Craft(backing_file=b"base.qcow2", backing_file_size=0xFFFF_FFFF),
    ),
    Case(
        "backing-name-over-1023",
        Craft(backing_file=b"b" * 1100),
    ),
    Case(
        "backing-name-past-eof",
        Craft(backing_file=b"base.qcow2", backing_file_offset=TIB),
    ),
    Case(
        "backing-name-inside-header",
        Craft(backing_file=b"base.qcow2", backing_file_offset=8),
        None,
    ),
    Case(
        "extension-length-huge",
        Craft(raw_extensions=[(0x12345678, 0xFFFF_FFF0, b"")]),
    ),
    Case(
        "feature-table-length-huge",
        Craft(raw_extensions=[(EXT_FEATURE_NAMES, 0x7FFF_FFF8, b"")]),
    ),
    Case("crypt-method-3", Craft(crypt_method=3), VdiskError),
    Case("truncated-header", Craft(truncate_to=40)),
    Case("truncated-to-header-cluster", Craft(truncate_to=CS)),
]

#: Cases whose damage only shows on access (a read of the broken region must fail cleanly).
ACCESS_CASES: list[Case] = [
    Case("l2-past-eof", Craft(l1_entries={0: (1 << 63) | TIB}), None),
    Case("l2-misaligned", Craft(l1_entries={0: (1 << 63) | (3 * CS + 512)}), CorruptImageError),
    Case("l2-on-header", Craft(l1_entries={0: (1 << 63) | 0}), None),
]
