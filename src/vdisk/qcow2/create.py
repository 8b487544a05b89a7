"""Create QCOW2 images (v2 and v3), with qemu-img's option names and values."""

from __future__ import annotations

import os
from array import array

from ..errors import FormatError, RequestError, VdiskError, from_oserror
from ..fileio import pwrite_full
from ..filenames import resolve_backing
from ..record import record, replace
from ..sizes import parse_size, round_up_to_sector
from . import datafile
from . import format as fmt
from .cache import empty_refcount_block, encode_l2, encode_refcount_block, fill_refcounts

TYPE_CHECKING = False  # typing and dataclasses cost `vdisk convert -O qcow2` a bare start
if TYPE_CHECKING:
    from typing import Any, NamedTuple

    from .encryption import EncryptOptions
else:
    from ..record import NamedTuple

_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"invalid value {value!r} for {name}: expected on or off")


def _version(compat: Any) -> int:
    text = str(compat).lower()
    if text in ("0.10", "v2", "2"):
        return 2
    if text in ("1.1", "v3", "3"):
        return 3
    raise RequestError(f"invalid compat {compat!r}: expected 0.10 (v2) or 1.1 (v3)")


@record(frozen=True)
class _Options:
    """qemu-img's qcow2 creation options, parsed and checked against each other."""

    version: int
    cluster_bits: int
    refcount_order: int
    lazy_refcounts: bool
    extended_l2: bool
    compression_type: int
    preallocation: str
    data_file: str | None = None  # the external data file's name, as given
    data_file_raw: bool = False


def create(
    path: str,
    size: int | str | None = None,
    *,
    compat: str = "1.1",
    cluster_size: int | str = 65536,
    refcount_bits: int | str = 16,
    lazy_refcounts: bool | str = False,
    preallocation: str = "off",
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    extended_l2: bool | str = False,
    compression_type: str = "zlib",
    **options: Any,
) -> None:
    """Create a QCOW2 image at ``path`` of ``size`` bytes (default: the backing file's size).

    Options follow ``qemu-img create -o``: names with hyphens or underscores, values as
    strings or Python values.
    """
    opts = {k.replace("-", "_"): v for k, v in options.items()}
    compat = opts.pop("version", compat)
    compat = opts.pop("compat", compat)
    cluster_size = opts.pop("cluster_size", cluster_size)
    refcount_bits = opts.pop("refcount_bits", refcount_bits)
    lazy_refcounts = opts.pop("lazy_refcounts", lazy_refcounts)
    preallocation = opts.pop("preallocation", preallocation)
    backing_file = opts.pop("backing_file", backing_file)
    backing_fmt = opts.pop("backing_fmt", backing_fmt)
    extended_l2 = opts.pop("extended_l2", extended_l2)
    compression_type = opts.pop("compression_type", compression_type)
    data_file = opts.pop("data_file", None) or None
    data_file_raw = _bool("data_file_raw", opts.pop("data_file_raw", False))
    encrypt = None
    if opts:  # what is left is encryption (or refused): only then load the cipher code
        from .encryption import pop_encrypt_options

        encrypt = pop_encrypt_options(opts, path)
    _refuse_unsupported(opts, path)
    o = _parse_options(
        path,
        compat,
        cluster_size,
        refcount_bits,
        lazy_refcounts,
        extended_l2,
        compression_type,
        preallocation,
    )
    o = _data_file_options(o, data_file, data_file_raw, backing_file, path)
    if backing_file is not None and o.preallocation != "off" and not o.extended_l2:
        raise RequestError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            path=path,
        )
    if backing_file is not None and (size is None or not backing_fmt):
        backing_fmt, bsize = _probe_backing(path, backing_file, backing_fmt)
        if size is None:
            size = bsize
    if size is None:
        raise RequestError("image size is required (no backing file to take it from)", path=path)
    vsize = parse_size(size)
    if vsize < 0:
        raise RequestError(f"invalid size {vsize}", path=path)
    vsize = round_up_to_sector(vsize)  # as qemu-img sizes new images
    header = _new_header(o, vsize, backing_file, backing_fmt)
    if o.data_file is not None:  # as qemu-img: emptied, sized and preallocated like raw
        from ..backends.raw import create_raw

        create_raw(o.data_file, vsize, o.preallocation)
    crypto_area = _encryption_header(header, encrypt)
    _write_image(path, header, o.preallocation, crypto_area)


def _refuse_unsupported(opts: dict[str, Any], path: str) -> None:
    """What is left of the options after the known ones: refuse the unsupported and unknown."""
    for ignored in ("nocow", "size"):
        opts.pop(ignored, None)
    if opts:
        raise RequestError(f"unknown qcow2 option(s): {', '.join(sorted(opts))}", path=path)


_V3_ONLY = "only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"


def _parse_options(
    path: str,
    compat: Any,
    cluster_size: Any,
    refcount_bits: Any,
    lazy_refcounts: Any,
    extended_l2: Any,
    compression_type: Any,
    preallocation: Any,
) -> _Options:
    """Each option's value, with qemu-img's messages for bad values and bad combinations."""
    version = _version(compat)
    cs = parse_size(cluster_size)
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise RequestError("Cluster size must be a power of two between 512 and 2048k", path=path)
    cluster_bits = cs.bit_length() - 1
    rbits = int(refcount_bits)
    if rbits < 1 or rbits > 64 or rbits & (rbits - 1):
        raise RequestError(
            "Refcount width must be a power of two and may not exceed 64 bits", path=path
        )
    if version == 2 and rbits != 16:
        raise RequestError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            path=path,
        )
    lazy = _bool("lazy_refcounts", lazy_refcounts)
    if lazy and version == 2:
        raise RequestError(f"Lazy refcounts {_V3_ONLY}", path=path)
    ext_l2 = _bool("extended_l2", extended_l2)
    if ext_l2 and version == 2:
        raise RequestError(f"Extended L2 entries are {_V3_ONLY}", path=path)
    if ext_l2 and cluster_bits < 14:
        raise RequestError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            path=path,
        )
    ctype_name = str(compression_type).lower()
    if ctype_name not in ("zlib", "zstd"):
        raise RequestError(
            f"compression_type {compression_type!r}: expected zlib or zstd", path=path
        )
    ctype = fmt.COMPRESSION_ZLIB if ctype_name == "zlib" else fmt.COMPRESSION_ZSTD
    if ctype and version == 2:
        raise RequestError(f"Non-zlib compression type is {_V3_ONLY}", path=path)
    prealloc = str(preallocation).lower()
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise RequestError(
            f"preallocation {preallocation!r}: expected off, metadata, falloc or full", path=path
        )
    return _Options(version, cluster_bits, rbits.bit_length() - 1, lazy, ext_l2, ctype, prealloc)


def _new_header(
    o: _Options, size: int, backing_file: str | None, backing_fmt: str | None
) -> fmt.Header:
    """The header of a new image; its table offsets are filled in by the layout."""
    header = fmt.Header(
        version=o.version,
        cluster_bits=o.cluster_bits,
        size=size,
        refcount_order=o.refcount_order,
        header_length=fmt.V3_HEADER_LENGTH if o.version == 3 else fmt.V2_HEADER_LENGTH,
        compression_type=o.compression_type,
        extra_fields=b"\0" * 7 if o.version == 3 else b"",
    )
    if o.lazy_refcounts:
        header.compatible_features |= fmt.COMPAT_LAZY_REFCOUNTS
    if o.extended_l2:
        header.incompatible_features |= fmt.INCOMPAT_EXTL2
    if o.compression_type:
        header.incompatible_features |= fmt.INCOMPAT_COMPRESSION
    if backing_file is not None:
        header.backing_file = backing_file
        if backing_fmt:
            header.set_extension(fmt.EXT_BACKING_FORMAT, backing_fmt.encode())
    if o.data_file is not None:
        header.incompatible_features |= fmt.INCOMPAT_DATA_FILE
        header.set_extension(fmt.EXT_DATA_FILE, datafile.extension_name(o.data_file))
        if o.data_file_raw:
            header.autoclear_features |= fmt.AUTOCLEAR_DATA_FILE_RAW
    if o.version == 3 and o.cluster_bits >= 13:
        # QEMU writes the feature name table only where the first cluster has room for it.
        header.set_extension(fmt.EXT_FEATURE_TABLE, fmt.default_feature_table())
    return header


def _data_file_options(
    o: _Options, data_file: str | None, raw: bool, backing_file: str | None, path: str
) -> _Options:
    """The data-file options checked as qemu-img checks them. data_file_raw implies metadata
    preallocation: every L2 entry is set, so that the data file alone is the guest's disk."""
    if raw and data_file is None:
        raise RequestError("data-file-raw requires data-file", path=path)
    if data_file is None:
        return o
    if o.version < 3:
        raise RequestError(
            "External data files are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)",
            path=path,
        )
    if raw and backing_file is not None:
        raise RequestError(
            "Backing file and data-file-raw cannot be used at the same time", path=path
        )
    prealloc = "metadata" if raw and o.preallocation == "off" else o.preallocation
    return replace(o, data_file=data_file, data_file_raw=raw, preallocation=prealloc)


def _encryption_header(header: fmt.Header, encrypt: EncryptOptions | None) -> bytes:
    """Set the header's crypt_method (and for LUKS its extension, before the feature table as
    QEMU orders them); the LUKS header area to write, or b""."""
    if encrypt is None:
        return b""
    from .encryption import new_luks_area, warn_legacy_aes

    if encrypt.format == "aes":
        warn_legacy_aes()
        header.crypt_method = fmt.CRYPT_AES
        return b""
    header.crypt_method = fmt.CRYPT_LUKS
    area = new_luks_area(encrypt)
    ext = fmt.HeaderExtension(fmt.EXT_CRYPTO, fmt.CryptoExtension(0, len(area)).encode())
    at = next(
        (i for i, e in enumerate(header.extensions) if e.type == fmt.EXT_FEATURE_TABLE),
        len(header.extensions),
    )
    header.extensions.insert(at, ext)
    return area


def _probe_backing(path: str, backing_file: str, backing_fmt: str | None) -> tuple[str, int]:
    from .. import open as vopen
    from .. import probe_format

    bpath = resolve_backing(path, backing_file)
    if not os.path.exists(bpath):
        raise VdiskError(f"could not open backing file {backing_file!r}: no such file", path=path)
    bfmt = backing_fmt or probe_format(bpath)
    with vopen(bpath, format=bfmt, readonly=True) as dev:
        return bfmt, dev.size


class _Layout(NamedTuple):
    """Where a new image's structures go, in clusters: header | refcount table | refcount
    blocks | L1 | L2 tables | data. Without preallocation qemu-img's order is kept: header |
    refcount table | first refcount block | L1 | further refcount blocks, and the file ends
    where the L1 table's bytes end (so the sizes agree: 196616 bytes for a plain 64M image).
    An encrypted image's LUKS header area follows the L1 table (``crypto_at``)."""

    reftable_at: int
    reftable_clusters: int
    block_clusters: tuple[int, ...]
    l1_at: int
    l1_size: int
    l2_at: int
    l2_tables: int
    data_at: int
    data_clusters: int
    total: int
    crypto_at: int = 0
    crypto_clusters: int = 0


def _layout(header: fmt.Header, prealloc: str, path: str, crypto_len: int = 0) -> _Layout:
    cs = header.cluster_size
    l1_size = fmt.l1_entries_for(header.size, header.cluster_bits, header.l2_bits)
    if l1_size * 8 > fmt.MAX_L1_BYTES:
        raise RequestError(
            # qemu-img's words; the limit is the 32 MiB L1 table.
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            path=path,
        )
    l1_clusters = (l1_size * 8 + cs - 1) // cs
    crypto_clusters = (crypto_len + cs - 1) // cs
    data_clusters = (header.size + cs - 1) // cs if prealloc != "off" else 0
    if header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        data_clusters = 0  # the data lives in the data file
    l2_tables = l1_size if prealloc != "off" else 0
    rb_entries = 1 << header.refblock_bits
    # The refcount blocks count every cluster, themselves and the table included.
    t_clusters, blocks = 1, 1
    while True:
        total = 1 + t_clusters + blocks + l1_clusters + crypto_clusters + l2_tables + data_clusters
        b_new = (total + rb_entries - 1) // rb_entries
        t_new = (b_new * 8 + cs - 1) // cs
        if b_new == blocks and t_new == t_clusters:
            break
        blocks, t_clusters = max(blocks, b_new), max(t_clusters, t_new)
    if t_clusters * cs > fmt.MAX_REFTABLE_BYTES:
        raise RequestError(
            "refcount table would exceed 8 MiB; use a larger cluster size or refcount width",
            path=path,
        )
    blocks_at = 1 + t_clusters
    if prealloc == "off" and t_clusters == 1:
        l1_at = blocks_at + 1
        after_l1 = l1_at + l1_clusters + crypto_clusters
        block_clusters = (blocks_at, *range(after_l1, after_l1 + blocks - 1))
    else:
        l1_at = blocks_at + blocks
        block_clusters = tuple(range(blocks_at, blocks_at + blocks))
    l2_at = max(l1_at + l1_clusters + crypto_clusters, block_clusters[-1] + 1)
    data_at = l2_at + l2_tables
    return _Layout(
        1,
        t_clusters,
        block_clusters,
        l1_at,
        l1_size,
        l2_at,
        l2_tables,
        data_at,
        data_clusters,
        total,
        l1_at + l1_clusters,
        crypto_clusters,
    )


def _write_image(path: str, header: fmt.Header, prealloc: str, crypto_area: bytes = b"") -> None:
    cs = header.cluster_size
    lay = _layout(header, prealloc, path, len(crypto_area))
    if crypto_area:
        ext = fmt.CryptoExtension(lay.crypto_at * cs, len(crypto_area))
        header.set_extension(fmt.EXT_CRYPTO, ext.encode())
    header.l1_size = lay.l1_size
    header.l1_table_offset = lay.l1_at * cs
    header.refcount_table_offset = lay.reftable_at * cs
    header.refcount_table_clusters = lay.reftable_clusters
    blob = header.encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        os.ftruncate(fd, _file_end(lay, cs))
        pwrite_full(fd, blob, 0)
        _write_refcounts(fd, header, lay)
        if crypto_area:
            pwrite_full(fd, crypto_area, lay.crypto_at * cs)
        if lay.l2_tables:
            _write_preallocated_tables(fd, header, lay)
            if prealloc == "falloc" and lay.data_clusters:
                os.posix_fallocate(fd, lay.data_at * cs, lay.data_clusters * cs)
            elif prealloc == "full" and lay.data_clusters:
                chunk = bytes(1 << 20)
                pos, end = lay.data_at * cs, lay.total * cs
                while pos < end:
                    pos += os.pwrite(fd, chunk[: min(len(chunk), end - pos)], pos)
        os.fsync(fd)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    except FormatError as exc:
        exc.path = path
        raise
    finally:
        os.close(fd)


def _file_end(lay: _Layout, cs: int) -> int:
    """The new file's size: it ends with the L1 table's last byte when the L1 is last."""
    if lay.total == lay.l1_at + (lay.l1_size * 8 + cs - 1) // cs:
        return lay.l1_at * cs + lay.l1_size * 8
    return lay.total * cs


def _write_refcounts(fd: int, header: fmt.Header, lay: _Layout) -> None:
    """The refcount table and blocks: refcount 1 for every cluster of the layout."""
    cs = header.cluster_size
    cb = header.cluster_bits
    table = array("Q", (c << cb for c in lay.block_clusters))
    table.extend([0] * (lay.reftable_clusters * cs // 8 - len(table)))
    pwrite_full(fd, encode_l2(table), lay.reftable_at * cs)
    rb_entries = 1 << header.refblock_bits
    for b, block_at in enumerate(lay.block_clusters):
        block = empty_refcount_block(cs, header.refcount_order)
        lo = b * rb_entries
        fill_refcounts(block, 0, max(0, min(lo + rb_entries, lay.total) - lo), 1)
        pwrite_full(fd, encode_refcount_block(block, header.refcount_order), block_at * cs)


def _write_preallocated_tables(fd: int, header: fmt.Header, lay: _Layout) -> None:
    """L1 and every L2 table, mapping each guest cluster to its data cluster in order."""
    import numpy as np

    cs = header.cluster_size
    cb = np.uint64(header.cluster_bits)
    l2_entries = 1 << header.l2_bits
    guest_clusters = (header.size + cs - 1) // cs
    # Data clusters follow the tables in the file, or sit at their guest offset in a data file.
    data_at = lay.data_at if lay.data_clusters else 0
    l1 = (np.arange(lay.l1_size, dtype=np.uint64) + np.uint64(lay.l2_at)) << cb
    pwrite_full(fd, fmt.encode_table(l1 | np.uint64(fmt.OFLAG_COPIED)), lay.l1_at * cs)
    for t in range(lay.l2_tables):
        first = t * l2_entries
        n = min(l2_entries, guest_clusters - first)
        hosts = (np.arange(first, first + n, dtype=np.uint64) + np.uint64(data_at)) << cb
        hosts |= np.uint64(fmt.OFLAG_COPIED)
        if header.extended_l2:
            # Host clusters reserved, subclusters unallocated (as QEMU does): bitmaps stay 0.
            entries = np.zeros(2 * l2_entries, dtype=np.uint64)
            entries[0 : 2 * n : 2] = hosts
        else:
            entries = np.zeros(l2_entries, dtype=np.uint64)
            entries[:n] = hosts
        pwrite_full(fd, fmt.encode_table(entries), (lay.l2_at + t) * cs)


__all__ = ["create", "encode_l2"]
