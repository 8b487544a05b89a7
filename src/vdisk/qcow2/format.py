"""QCOW2 on-disk structures as pure codecs (no I/O).

Everything here turns bytes into values and back, and validates values against the spec
(QEMU docs/interop/qcow2.rst) and QEMU's implementation limits. Callers do the I/O.
All numbers on disk are big-endian. numpy (for whole tables) is imported by the functions that
use it, so that probing and decoding a header stay cheap.
"""

from __future__ import annotations

import struct

from .. import QCOW2_MAGIC
from ..errors import CorruptImageError, FormatError, UnsupportedFeatureError
from ..record import field, record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import numpy as np

MAGIC = QCOW2_MAGIC  # defined by the package, which probes formats without this module
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # with compression_type and its padding, as QEMU writes it

# Byte offsets of fixed header fields that are rewritten in place.
HDR_SIZE = 24  # u64 size, then u32 crypt_method, u32 l1_size, u64 l1_table_offset
HDR_REFCOUNT_TABLE_OFFSET = 48  # u64 refcount_table_offset, then u32 refcount_table_clusters
HDR_INCOMPATIBLE_FEATURES = 72  # u64 (v3)
HDR_AUTOCLEAR_FEATURES = 88  # u64 (v3)

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_FILE_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024  # QEMU's limit on a snapshot's extra data

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}
FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

# L1/L2 entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Cluster types (of a whole standard cluster, or of one subcluster with extended L2).
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4
UNALLOCATED_ALLOC = 5  # extended L2 only: host cluster reserved, subcluster not allocated

SUBCLUSTERS = 32
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
SUBCLUSTER_ZERO_MASK = 0xFFFFFFFF << 32

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT_HEAD = struct.Struct(">II")
# Extensions that may appear once only.
_UNIQUE_EXTENSIONS = frozenset(
    (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE)
)


def _align8(n: int) -> int:
    return (n + 7) & ~7


@record
class HeaderExtension:
    """One header extension, kept as raw bytes (decoders below give meaning to known ones)."""

    type: int
    data: bytes


@record
class Header:
    """The QCOW2 header (v2 and v3) with its extensions and backing file name."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = 0
    # Header bytes after compression_type up to header_length (padding and unknown fields).
    extra_fields: bytes = b"\0" * 7
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None

    # -- derived values ------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def refblock_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES.get(self.compression_type, f"unknown ({self.compression_type})")

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or with None remove) an extension, keeping the order of the others."""
        for i, ext in enumerate(self.extensions):
            if ext.type == ext_type:
                if data is None:
                    del self.extensions[i]
                else:
                    self.extensions[i] = HeaderExtension(ext_type, data)
                return
        if data is not None:
            self.extensions.append(HeaderExtension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extension(EXT_DATA_FILE)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def feature_names(self) -> dict[tuple[int, int], str]:
        ext = self.extension(EXT_FEATURE_TABLE)
        return decode_feature_table(ext.data) if ext else {}

    @property
    def bitmaps(self) -> BitmapsExtension | None:
        ext = self.extension(EXT_BITMAPS)
        return BitmapsExtension.decode(ext.data) if ext else None

    @property
    def crypto(self) -> CryptoExtension | None:
        ext = self.extension(EXT_CRYPTO)
        return CryptoExtension.decode(ext.data) if ext else None

    def feature_name(self, kind: int, bit: int) -> str:
        """Name of a feature bit: from the image's table, else the spec's, else 'bit N'."""
        names = self.feature_names
        return names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) or f"bit {bit}"

    # -- codec ---------------------------------------------------------------------------
    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> Header:
        """Decode header, extensions and backing file name from the image's first bytes.

        ``buf`` should hold at least the first cluster (or the whole file if smaller).
        """
        data = bytes(buf)
        hdr = cls._decode_v2_fields(data)
        if hdr.version >= 3:
            hdr._decode_v3_fields(data)
        if hdr.refcount_order > MAX_REFCOUNT_ORDER:
            raise FormatError(f"refcount_order: {hdr.refcount_order} exceeds {MAX_REFCOUNT_ORDER}")
        hdr._decode_extensions(data)
        if hdr.backing_file_offset:
            hdr.backing_file = hdr._decode_backing_name(data)
        return hdr

    @classmethod
    def _decode_v2_fields(cls, data: bytes) -> Header:
        """The fields every version has (the first 72 bytes), checked for a usable header."""
        if len(data) < V2_HEADER_LENGTH and (data[:4] == MAGIC or not data):
            raise FormatError(f"header truncated: {len(data)} bytes, need {V2_HEADER_LENGTH}")
        if data[:4] != MAGIC:
            raise FormatError("bad magic: not a qcow2 image")
        (
            _magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _HEADER_V2.unpack_from(data, 0)
        if version < 2:
            raise FormatError(f"version: {version} is not a qcow2 version (2 or 3)")
        if version > 3:
            raise UnsupportedFeatureError(f"version: qcow2 version {version} is not supported")
        hdr = cls(
            version=version,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=crypt_method,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset,
            extra_fields=b"",
        )
        if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
            raise FormatError(
                f"cluster_bits: {hdr.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
            )
        if version == 2:
            hdr.refcount_order = 4
            hdr.header_length = V2_HEADER_LENGTH
        return hdr

    def _decode_v3_fields(self, data: bytes) -> None:
        """Feature bits, refcount_order, header_length and the optional compression type."""
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise FormatError(
                f"header truncated: {len(data)} bytes, need {V3_MIN_HEADER_LENGTH} for version 3"
            )
        (
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        ) = _HEADER_V3.unpack_from(data, V2_HEADER_LENGTH)
        if self.header_length < V3_MIN_HEADER_LENGTH or self.header_length % 8:
            raise FormatError(
                f"header_length: {self.header_length} is not a multiple of 8 >= "
                f"{V3_MIN_HEADER_LENGTH}"
            )
        if self.header_length > min(self.cluster_size, len(data)):
            raise FormatError(f"header_length: {self.header_length} exceeds the first cluster")
        if self.header_length > V3_MIN_HEADER_LENGTH:
            self.compression_type = data[V3_MIN_HEADER_LENGTH]
            self.extra_fields = data[V3_MIN_HEADER_LENGTH + 1 : self.header_length]

    def _decode_extensions(self, data: bytes) -> None:
        """Header extensions: after the header, up to the end marker, within the first cluster
        and before the backing file name."""
        pos = self.header_length
        limit = min(self.cluster_size, len(data))
        if self.backing_file_offset and self.backing_file_offset < limit:
            limit = max(min(limit, self.backing_file_offset), pos)
        seen: set[int] = set()
        # No end marker before the limit: QEMU accepts a header without extensions only when
        # there is no room; be lenient like it.
        while pos + _EXT_HEAD.size <= limit:
            ext_type, ext_len = _EXT_HEAD.unpack_from(data, pos)
            pos += _EXT_HEAD.size
            if ext_type == EXT_END:
                break
            if pos + ext_len > limit:
                raise FormatError(
                    f"header extension 0x{ext_type:08x}: length {ext_len} overruns the first cluster"
                )
            if ext_type in seen and ext_type in _UNIQUE_EXTENSIONS:
                raise FormatError(f"header extension 0x{ext_type:08x} appears twice")
            seen.add(ext_type)
            self.extensions.append(HeaderExtension(ext_type, data[pos : pos + ext_len]))
            pos += _align8(ext_len)

    def _decode_backing_name(self, data: bytes) -> str:
        if self.backing_file_size > MAX_BACKING_FILE_NAME:
            raise FormatError(
                f"backing_file_size: {self.backing_file_size} exceeds {MAX_BACKING_FILE_NAME}"
            )
        end = self.backing_file_offset + self.backing_file_size
        if end > self.cluster_size or end > len(data):
            raise FormatError(
                "backing_file_offset: backing file name lies outside the first cluster"
            )
        name = data[self.backing_file_offset : end]
        if b"\0" in name:
            raise FormatError("backing_file_offset: backing file name contains a NUL byte")
        return name.decode("utf-8", "replace")

    def encode(self) -> bytes:
        """Header, extensions, end marker and backing file name (at the recorded offset).

        Sets ``backing_file_offset``/``backing_file_size`` to where the name lands (right after
        the extension area, as QEMU places it).
        """
        ext_area = bytearray()
        for ext in self.extensions:
            ext_area += _EXT_HEAD.pack(ext.type, len(ext.data)) + ext.data
            ext_area += b"\0" * (_align8(len(ext.data)) - len(ext.data))
        ext_area += _EXT_HEAD.pack(EXT_END, 0)
        header_length = V2_HEADER_LENGTH if self.version == 2 else self.header_length
        if self.backing_file is not None:
            name = self.backing_file.encode()
            self.backing_file_offset = header_length + len(ext_area)
            self.backing_file_size = len(name)
        else:
            name = b""
            self.backing_file_offset = self.backing_file_size = 0
        out = bytearray(
            _HEADER_V2.pack(
                MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        )
        if self.version >= 3:
            out += _HEADER_V3.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > 104:
                tail = bytes([self.compression_type]) + self.extra_fields
                tail = tail[: self.header_length - 104]
                out += tail + b"\0" * (self.header_length - 104 - len(tail))
        out += ext_area + name
        if len(out) > self.cluster_size:
            raise FormatError("header, extensions and backing file name exceed the first cluster")
        return bytes(out)

    def copy(self) -> Header:
        return replace(self, extensions=[HeaderExtension(e.type, e.data) for e in self.extensions])

    # -- validation ----------------------------------------------------------------------
    def validate(self, file_size: int) -> None:
        """Check fields against the spec, QEMU's limits and the file size. Raises on error."""
        cs = self.cluster_size
        if self.version == 2 and self.refcount_order != 4:
            raise FormatError("refcount_order: version 2 images have 16-bit refcounts")
        if self.extended_l2 and self.cluster_bits < 14:
            raise FormatError("cluster_bits: extended L2 entries need clusters of 16 KiB or more")
        if self.version >= 3 and self.incompatible_features & INCOMPAT_COMPRESSION:
            if self.header_length <= 104 or self.compression_type == 0:
                raise FormatError(
                    "compression_type: the compression type bit is set but the field is zero"
                )
        elif self.compression_type != 0:
            raise FormatError("compression_type: non-zero but the compression type bit is not set")
        if self.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedFeatureError(
                f"compression_type: unknown compression type {self.compression_type}"
            )
        if self.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
            raise FormatError(f"crypt_method: unknown encryption method {self.crypt_method}")
        if self.size >= 1 << 63:
            raise FormatError(f"size: {self.size} is too large")
        # L1 table.
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(f"l1_size: {self.l1_size} entries exceed QEMU's 32 MiB L1 limit")
        need = l1_entries_for(self.size, self.cluster_bits, self.l2_bits)
        if self.l1_size < need:
            raise CorruptImageError(
                f"l1_size: {self.l1_size} entries cannot map the virtual size {self.size}"
            )
        _check_table("l1_table_offset", self.l1_table_offset, self.l1_size * 8, cs, file_size)
        # Refcount table.
        if self.refcount_table_clusters == 0:
            raise CorruptImageError("refcount_table_clusters: the refcount table is empty")
        if self.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError(
                f"refcount_table_clusters: {self.refcount_table_clusters} clusters exceed "
                "QEMU's 8 MiB refcount table limit"
            )
        _check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            self.refcount_table_clusters * cs,
            cs,
            file_size,
        )
        # Snapshot table.
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise FormatError(f"nb_snapshots: {self.nb_snapshots} exceeds {MAX_SNAPSHOTS}")
        if self.nb_snapshots:
            _check_table(
                "snapshots_offset", self.snapshots_offset, self.nb_snapshots * 40, cs, file_size
            )
        elif self.snapshots_offset % cs:
            raise CorruptImageError("snapshots_offset: not aligned to a cluster")
        # Without autoclear bit 0 the extension is ignored (QEMU's rule), so not checked.
        bitmaps = self.bitmaps if self.autoclear_features & AUTOCLEAR_BITMAPS else None
        if bitmaps is not None:
            _check_table(
                "bitmap_directory_offset",
                bitmaps.directory_offset,
                bitmaps.directory_size,
                cs,
                file_size,
            )
        crypto = self.crypto
        if crypto is not None:
            _check_table("crypto header offset", crypto.offset, crypto.length, cs, file_size)


def _check_table(name: str, offset: int, length: int, cluster_size: int, file_size: int) -> None:
    if offset % cluster_size:
        raise CorruptImageError(f"{name}: {offset:#x} is not aligned to a cluster")
    if length and offset == 0:
        raise CorruptImageError(f"{name}: the table overlaps the header")
    if offset + length > file_size:
        raise CorruptImageError(
            f"{name}: table [{offset:#x}, +{length}) lies past the end of the file ({file_size})"
        )


def l1_entries_for(size: int, cluster_bits: int, l2_bits: int) -> int:
    """Number of L1 entries needed to map ``size`` bytes."""
    span = 1 << (cluster_bits + l2_bits)
    return (size + span - 1) // span


# -- feature name table -------------------------------------------------------------------
_FEATURE_ENTRY = struct.Struct(">BB46s")


def decode_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    out: dict[tuple[int, int], str] = {}
    for pos in range(0, len(data) - len(data) % 48, 48):
        kind, bit, raw = _FEATURE_ENTRY.unpack_from(data, pos)
        out[(kind, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return out


def encode_feature_table(names: dict[tuple[int, int], str]) -> bytes:
    return b"".join(
        _FEATURE_ENTRY.pack(kind, bit, name.encode()[:46]) for (kind, bit), name in names.items()
    )


def default_feature_table() -> bytes:
    """The table QEMU writes into every v3 image it creates."""
    return encode_feature_table(FEATURE_NAMES)


# -- other extensions ---------------------------------------------------------------------
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")


@record(frozen=True)
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    @classmethod
    def decode(cls, data: bytes) -> BitmapsExtension:
        if len(data) < _BITMAPS_EXT.size:
            raise FormatError(f"bitmaps extension: {len(data)} bytes, need 24")
        nb, _reserved, dsize, doff = _BITMAPS_EXT.unpack_from(data)
        if nb < 1 or nb > 65535:
            raise FormatError(f"bitmaps extension: nb_bitmaps {nb} is outside 1..65535")
        if dsize > 64 << 20:
            raise FormatError(f"bitmaps extension: bitmap_directory_size {dsize} is too large")
        return cls(nb, dsize, doff)

    def encode(self) -> bytes:
        return _BITMAPS_EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@record(frozen=True)
class CryptoExtension:
    offset: int
    length: int

    @classmethod
    def decode(cls, data: bytes) -> CryptoExtension:
        if len(data) < _CRYPTO_EXT.size:
            raise FormatError(f"full disk encryption extension: {len(data)} bytes, need 16")
        return cls(*_CRYPTO_EXT.unpack_from(data))

    def encode(self) -> bytes:
        return _CRYPTO_EXT.pack(self.offset, self.length)


# -- snapshot table -----------------------------------------------------------------------
_SNAPSHOT_HEAD = struct.Struct(">QIHHIIQII")
SNAPSHOT_HEADER_SIZE = _SNAPSHOT_HEAD.size  # the fixed part of a snapshot table entry


@record
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data: bytes
    disk_size: int | None = None
    icount: int | None = None
    # The id and name bytes as stored, when they are not valid UTF-8 (kept for encode).
    raw_id: bytes | None = None
    raw_name: bytes | None = None

    @property
    def encoded_size(self) -> int:
        """Bytes this entry takes in the snapshot table (padded to 8)."""
        return _align8(
            _SNAPSHOT_HEAD.size + len(self.extra_data) + len(self.id_bytes) + len(self.name_bytes)
        )

    @property
    def id_bytes(self) -> bytes:
        return self.raw_id if self.raw_id is not None else self.id_str.encode()

    @property
    def name_bytes(self) -> bytes:
        return self.raw_name if self.raw_name is not None else self.name.encode()

    def encode(self) -> bytes:
        """The table entry, padded to 8 bytes. The first 24 bytes of extra data carry
        vm_state_size, disk_size and icount (where the stored extra data is that long);
        extra data past them is kept as it was."""
        extra = bytearray(self.extra_data)
        if len(extra) > MAX_SNAPSHOT_EXTRA:
            raise FormatError(
                f"snapshot extra data: {len(extra)} bytes exceeds {MAX_SNAPSHOT_EXTRA}"
            )
        if len(extra) >= 8:
            struct.pack_into(">Q", extra, 0, self.vm_state_size)
        if len(extra) >= 16 and self.disk_size is not None:
            struct.pack_into(">Q", extra, 8, self.disk_size)
        if len(extra) >= 24 and self.icount is not None:
            struct.pack_into(">q", extra, 16, self.icount)
        id_b, name_b = self.id_bytes, self.name_bytes
        if len(id_b) > 0xFFFF or len(name_b) > 0xFFFF:
            raise FormatError("snapshot id or name longer than 65535 bytes")
        head = _SNAPSHOT_HEAD.pack(
            self.l1_table_offset,
            self.l1_size,
            len(id_b),
            len(name_b),
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            self.vm_state_size & 0xFFFFFFFF,
            len(extra),
        )
        out = head + bytes(extra) + id_b + name_b
        return out + bytes(_align8(len(out)) - len(out))

    @classmethod
    def decode(cls, buf: bytes, pos: int) -> tuple[SnapshotEntry, int]:
        """Decode one entry at ``pos``; returns it and the position of the next."""
        if pos + _SNAPSHOT_HEAD.size > len(buf):
            raise CorruptImageError("snapshot table: entry truncated")
        (l1_off, l1_size, id_len, name_len, sec, nsec, vmclock, vmsize, extra_len) = (
            _SNAPSHOT_HEAD.unpack_from(buf, pos)
        )
        p = pos + _SNAPSHOT_HEAD.size
        if extra_len > MAX_SNAPSHOT_EXTRA or p + extra_len + id_len + name_len > len(buf):
            raise CorruptImageError("snapshot table: entry overruns the table")
        extra = buf[p : p + extra_len]
        p += extra_len
        id_raw = bytes(buf[p : p + id_len])
        p += id_len
        name_raw = bytes(buf[p : p + name_len])
        p += name_len
        id_str, raw_id = _snapshot_text(id_raw)
        name, raw_name = _snapshot_text(name_raw)
        disk_size = None
        if len(extra) >= 8:
            vmsize = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        icount = None
        if len(extra) >= 24:
            icount = struct.unpack_from(">q", extra, 16)[0]
        entry = cls(
            l1_off,
            l1_size,
            id_str,
            name,
            sec,
            nsec,
            vmclock,
            vmsize,
            bytes(extra),
            disk_size,
            icount,
            raw_id,
            raw_name,
        )
        return entry, pos + _align8(p - pos)


def _snapshot_text(raw: bytes) -> tuple[str, bytes | None]:
    """(text, the raw bytes if they are not valid UTF-8)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), raw


def decode_snapshot_table(buf: bytes, count: int) -> list[SnapshotEntry]:
    out = []
    pos = 0
    for _ in range(count):
        entry, pos = SnapshotEntry.decode(buf, pos)
        out.append(entry)
    return out


def snapshot_table_size(entries: list[SnapshotEntry]) -> int:
    """Bytes the table occupies as QEMU counts them: every entry padded to 8 but the last."""
    if not entries:
        return 0
    last = entries[-1]
    unpadded = SNAPSHOT_HEADER_SIZE + len(last.extra_data) + len(last.id_bytes)
    return (
        sum(e.encoded_size for e in entries) - last.encoded_size + unpadded + len(last.name_bytes)
    )


def encode_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    """The snapshot table: the entries one after the other (each padded to 8)."""
    return b"".join(entry.encode() for entry in entries)


# -- bitmap directory ---------------------------------------------------------------------
_BITMAP_DIR_HEAD = struct.Struct(">QIIBBHI")


BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BITMAP_TYPE_DIRTY_TRACKING = 1
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ALL_ONES = 1 << 0


@record
class BitmapDirectoryEntry:
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        """qcow2's 'auto' flag: the bitmap tracks writes."""
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def encode(self) -> bytes:
        """The entry as the directory stores it, padded to a multiple of 8 bytes."""
        name = self.name.encode()
        raw = (
            _BITMAP_DIR_HEAD.pack(
                self.bitmap_table_offset,
                self.bitmap_table_size,
                self.flags,
                self.type,
                self.granularity_bits,
                len(name),
                len(self.extra_data),
            )
            + self.extra_data
            + name
        )
        return raw + bytes(_align8(len(raw)) - len(raw))


def encode_bitmap_directory(entries: list[BitmapDirectoryEntry]) -> bytes:
    return b"".join(e.encode() for e in entries)


def encode_bitmap_table(host_offsets: list[int]) -> bytes:
    """Bitmap table entries: a data cluster's offset, or 0 (every bit of that range clear)."""
    return struct.pack(f">{len(host_offsets)}Q", *host_offsets)


def decode_bitmap_directory(buf: bytes, count: int) -> list[BitmapDirectoryEntry]:
    out = []
    pos = 0
    for _ in range(count):
        if pos + _BITMAP_DIR_HEAD.size > len(buf):
            raise CorruptImageError("bitmap directory: entry truncated")
        toff, tsize, flags, btype, gbits, name_size, extra_size = _BITMAP_DIR_HEAD.unpack_from(
            buf, pos
        )
        p = pos + _BITMAP_DIR_HEAD.size
        if p + extra_size + name_size > len(buf):
            raise CorruptImageError("bitmap directory: entry overruns the directory")
        extra = buf[p : p + extra_size]
        p += extra_size
        name = buf[p : p + name_size].decode("utf-8", "replace")
        p += name_size
        out.append(BitmapDirectoryEntry(toff, tsize, flags, btype, gbits, name, extra))
        pos += _align8(p - pos)
    return out


# One bitmap table entry: (host_offset, all_ones), the data cluster holding its bits, or 0 (then
# every bit reads as all_ones).
BitmapTableEntry = tuple[int, bool]


def decode_bitmap_table(buf: bytes | bytearray | memoryview, count: int) -> list[BitmapTableEntry]:
    return [
        (e & BME_TABLE_OFFSET_MASK, bool(e & BME_TABLE_ALL_ONES))
        for e in struct.unpack_from(f">{count}Q", buf)
    ]


# -- L1 / L2 entries ----------------------------------------------------------------------
def l2_entry_type(entry: int, version: int = 3) -> int:
    """Type of a standard (non-extended) L2 entry: UNALLOCATED, ZERO_*, NORMAL or COMPRESSED."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO and version >= 3:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if entry & L2E_OFFSET_MASK or entry & OFLAG_COPIED:
        return NORMAL
    return UNALLOCATED


def subcluster_type(entry: int, bitmap: int, index: int) -> int:
    """Type of subcluster ``index`` (0..31) of an extended L2 entry."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    alloc = (bitmap >> index) & 1
    zero = (bitmap >> (32 + index)) & 1
    if alloc and zero:
        raise CorruptImageError("extended L2 entry: subcluster both allocated and zero")
    host = entry & L2E_OFFSET_MASK
    if zero:
        return ZERO_ALLOC if host else ZERO_PLAIN
    if alloc:
        if not host:
            raise CorruptImageError("extended L2 entry: allocated subcluster without offset")
        return NORMAL
    return UNALLOCATED_ALLOC if host else UNALLOCATED


def encode_l2_entry(host_offset: int, copied: bool = True, zero: bool = False) -> int:
    entry = host_offset & L2E_OFFSET_MASK
    if copied and host_offset:
        entry |= OFLAG_COPIED
    if zero:
        entry |= OFLAG_ZERO
    return entry


def compressed_geometry(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, sector-count shift, sector-count mask) of a compressed descriptor."""
    shift = 62 - (cluster_bits - 8)
    return (1 << shift) - 1, shift, (1 << (cluster_bits - 8)) - 1


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Host offset and readable length (bytes) of a compressed cluster descriptor."""
    omask, shift, smask = compressed_geometry(cluster_bits)
    offset = entry & omask
    nb_sectors = ((entry >> shift) & smask) + 1
    return offset, nb_sectors * 512 - (offset & 511)


def encode_compressed(offset: int, length: int, cluster_bits: int) -> int:
    """Descriptor for ``length`` compressed bytes stored at ``offset``."""
    omask, shift, smask = compressed_geometry(cluster_bits)
    if offset & ~omask:
        raise FormatError("compressed cluster offset too large for the cluster size")
    nb_sectors = (offset + length - 1) // 512 - offset // 512  # additional sectors
    if nb_sectors > smask:
        raise FormatError("compressed cluster too large")
    return OFLAG_COMPRESSED | (nb_sectors << shift) | offset


def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
    """Host cluster indices a compressed cluster occupies (each holds one reference)."""
    omask, shift, smask = compressed_geometry(cluster_bits)
    offset = (entry & omask) & ~511
    nb_sectors = ((entry >> shift) & smask) + 1
    end = offset + nb_sectors * 512
    return range(offset >> cluster_bits, ((end - 1) >> cluster_bits) + 1)


# -- tables ---------------------------------------------------------------------------------
def decode_table(buf: bytes | bytearray | memoryview) -> np.ndarray:
    """A table of big-endian 64-bit entries (L1, L2, refcount table) as native uint64."""
    import numpy as np

    return np.frombuffer(buf, dtype=">u8").astype(np.uint64)


def encode_table(entries: np.ndarray) -> bytes:
    import numpy as np

    return np.asarray(entries, dtype=np.uint64).astype(">u8").tobytes()


_RC_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}


def decode_refcount_block(buf: bytes | bytearray | memoryview, refcount_order: int) -> np.ndarray:
    """All entries of a refcount block as a native uint64 array."""
    import numpy as np

    if refcount_order >= 3:
        return np.frombuffer(buf, dtype=_RC_DTYPES[refcount_order]).astype(np.uint64)
    bits = 1 << refcount_order
    per_byte = 8 // bits
    raw = np.frombuffer(buf, dtype=np.uint8)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    mask = (1 << bits) - 1
    # Bit 0 is the least significant bit: entry k of a byte sits at bits k*w .. k*w+w-1.
    return ((raw[:, None] >> shifts) & mask).astype(np.uint64).ravel()


def encode_refcount_block(entries: np.ndarray, refcount_order: int) -> bytes:
    import numpy as np

    if refcount_order >= 3:
        return np.asarray(entries).astype(_RC_DTYPES[refcount_order]).tobytes()
    bits = 1 << refcount_order
    per_byte = 8 // bits
    vals = np.asarray(entries, dtype=np.uint64).astype(np.uint8).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    packed: bytes = (vals << shifts).sum(axis=1, dtype=np.uint16).astype(np.uint8).tobytes()
    return packed


def refcount_get(buf: bytes | bytearray | memoryview, index: int, refcount_order: int) -> int:
    """One refcount block entry from the encoded block."""
    bits = 1 << refcount_order
    if bits >= 8:
        n = bits // 8
        return int.from_bytes(buf[index * n : index * n + n], "big")
    byte, shift = divmod(index * bits, 8)
    return (buf[byte] >> shift) & ((1 << bits) - 1)


def refcount_set(buf: bytearray, index: int, refcount_order: int, value: int) -> None:
    """Set one refcount block entry in the encoded block."""
    bits = 1 << refcount_order
    if value < 0 or value >= 1 << bits:
        raise FormatError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        n = bits // 8
        buf[index * n : index * n + n] = value.to_bytes(n, "big")
        return
    byte, shift = divmod(index * bits, 8)
    mask = ((1 << bits) - 1) << shift
    buf[byte] = (buf[byte] & ~mask & 0xFF) | (value << shift)
