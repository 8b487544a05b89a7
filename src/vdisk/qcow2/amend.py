"""Changes to an existing qcow2 image in place, as ``qemu-img amend -o`` makes them.

What can change: the version (``compat`` 0.10 <-> 1.1), ``lazy_refcounts``, the refcount width
(``refcount_bits``) and the virtual size; ``backing_file``/``backing_fmt`` only to their current
values, as in QEMU 7.2 (``set_backing``, used by rebase, changes them). The options of
features other modules own (``data_file``, ``data_file_raw``, ``encrypt.*``) go to hooks
(``datafile.amend_header``, ``encryption.amend_encryption``).

Every header change rebuilds the whole first cluster (header, extensions, backing name) in
memory and writes it with one pwrite, then fdatasyncs: a crash leaves the old or the new header
(the fields live in the first sector). A new refcount width writes the new refcount blocks and
table into free clusters first (the old structure stays in place and counted), switches the
header to them last, and only then frees the old structure (a leak repair): a crash at any point
leaves a consistent image, at worst with the old structure leaked. A downgrade to version 2
first turns every zero cluster into something version 2 can say (written zeros or, without a
backing file, an unallocated cluster), zero data synced before the L2 entry changes.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import locking
from ..errors import FormatError, RequestError, UnsupportedFeatureError, VdiskError, from_oserror
from ..fileio import pread_full, pwrite_full
from . import format as fmt

MAX_REFCOUNT_BITS = 64


class HeaderSpaceError(VdiskError):
    """The new header, extensions and backing name do not fit in the first cluster."""

    errno = errno.ENOSPC


_UNCHANGED = object()


@dataclass
class AmendOptions:
    """What to change; None (or, for the backing, ``_UNCHANGED``): leave it."""

    compat: str | None = None  # "0.10" or "1.1"
    lazy_refcounts: bool | None = None
    refcount_bits: int | None = None
    backing_file: object = _UNCHANGED  # str, or None to drop the backing file
    backing_fmt: str | None = None
    size: int | None = None
    data_file: str | None = None
    data_file_raw: bool | None = None
    encrypt: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)  # --object secret ids, for encrypt.*


# -- hooks for the options of features that live elsewhere ---------------------------------------
def amend_data_file(
    fd: int,
    header: fmt.Header,
    have: int,
    path: str,
    data_file: str | None,
    data_file_raw: bool | None,
) -> None:
    """``data_file``/``data_file_raw`` (``datafile.amend_header``): checked, then the header
    rewritten in one write, before any other change."""
    from .datafile import amend_header, check_data_file_opens

    new = header.copy()
    amend_header(new, data_file, data_file_raw)
    check_data_file_opens(path, header)
    if (new.extensions, new.autoclear_features) != (header.extensions, header.autoclear_features):
        write_header(fd, new, have, path)
        header.extensions = new.extensions
        header.autoclear_features = new.autoclear_features


def amend_encryption(path: str, options: dict[str, str], secrets: dict[str, bytes]) -> None:
    """``encrypt.*``: add or erase a LUKS key slot (``encryption.amend_encryption``). The
    image unlocks with the passphrase registered for it (``--image-opts
    encrypt.key-secret=ID``); new and old secrets are ids into ``secrets``."""
    from .encryption import amend_encryption as amend_key_slots
    from .image import Qcow2Image

    with Qcow2Image.open(path) as image:
        amend_key_slots(image, options, secrets)


hooks: dict[str, Callable[..., None]] = {"data_file": amend_data_file, "encrypt": amend_encryption}


# -- the checks qemu-img amend makes before it changes anything ----------------------------------
def check_options(header: fmt.Header, opts: AmendOptions, path: str) -> int:
    """Refuse what QEMU refuses, with its messages; returns the version to end with."""
    version = header.version
    if opts.compat is not None:
        version = {"0.10": 2, "1.1": 3}.get(opts.compat, 0)
        if not version:
            raise RequestError(f"Unknown compatibility level {opts.compat}")
    bits = opts.refcount_bits
    if bits is not None:
        if bits < 1 or bits > MAX_REFCOUNT_BITS or bits & (bits - 1):
            raise RequestError("Refcount width must be a power of two and may not exceed 64 bits")
        if version < 3 and bits != 16:
            raise RequestError(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above "
                "(use compat=1.1 or greater)"
            )
    if version < 3 and opts.lazy_refcounts:
        raise RequestError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use compat=1.1 or greater)",
        )
    if opts.backing_file is not _UNCHANGED or opts.backing_fmt is not None:
        # QEMU 7.2 takes the current values only (rebase changes them; so does set_backing).
        name = header.backing_file if opts.backing_file is _UNCHANGED else opts.backing_file
        if name != header.backing_file or opts.backing_fmt != _backing_format(header):
            raise RequestError(
                "Cannot amend the backing file. You can use 'qemu-img rebase' instead."
            )
    if version < header.version:
        _check_downgrade(header, bits, path)
    return version


def _check_downgrade(header: fmt.Header, bits: int | None, path: str) -> None:
    if (bits or header.refcount_bits) != 16:
        raise RequestError("compat=0.10 requires refcount_bits=16")
    # QEMU lets a zstd image through (its clusters would then read as zlib); vdisk refuses.
    left = header.incompatible_features & ~fmt.INCOMPAT_DIRTY
    if left & fmt.INCOMPAT_DATA_FILE:
        raise RequestError("Cannot downgrade an image with a data file")
    if left:
        raise RequestError(f"Cannot downgrade an image with incompatible features {left:#x} set")
    if header.extension(fmt.EXT_BITMAPS) is not None:
        raise RequestError("Cannot downgrade an image with persistent bitmaps")
    if header.nb_snapshots:
        raise UnsupportedFeatureError(
            "downgrading an image with internal snapshots is not supported yet", path=path
        )


# -- header writes ----------------------------------------------------------------------------
def _read_header(fd: int, path: str) -> tuple[fmt.Header, int]:
    """The decoded header and how many bytes of the first cluster the file has."""
    head = os.pread(fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
    try:
        header = fmt.Header.decode(head)
    except VdiskError as exc:
        exc.path = path
        raise
    return header, min(header.cluster_size, len(head))


def write_header(fd: int, header: fmt.Header, have: int, path: str) -> None:
    """Write ``header`` (with extensions and backing name) as the first cluster: one pwrite,
    then fdatasync. ``have``: bytes of the first cluster in the file (padded up to them)."""
    try:
        blob = header.encode()
    except FormatError:  # encode refuses a header past the first cluster
        blob = b""
    if not blob or len(blob) > header.cluster_size:
        raise HeaderSpaceError("No space left in the file header", path=path)
    first = blob + bytes(max(0, have - len(blob)))
    pwrite_full(fd, first, 0)
    os.fdatasync(fd)


def _open_locked(path: str) -> int:
    return locking.open_locked(path, os.O_RDWR, locking.mode_for("qcow2", readonly=False))


def set_backing(path: str, backing_file: str | None, backing_format: str | None) -> None:
    """Point the closed qcow2 image at ``path`` to ``backing_file`` (None: no backing file),
    recording ``backing_format`` (None: no format extension). Only the header changes."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        header, have = _read_header(fd, path)
        _apply_backing(header, backing_file, backing_format)
        write_header(fd, header, have, path)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    finally:
        os.close(fd)


def _apply_backing(header: fmt.Header, backing_file: str | None, backing_fmt: str | None) -> None:
    header.backing_file = backing_file or None
    fmt_ext = backing_fmt.encode() if backing_file and backing_fmt else None
    header.set_extension(fmt.EXT_BACKING_FORMAT, fmt_ext)


# -- the amend ---------------------------------------------------------------------------------
def amend(
    path: str, opts: AmendOptions, progress: Callable[[int, int], None] | None = None
) -> None:
    """Apply ``opts`` to the closed qcow2 image at ``path`` (qemu-img amend's order: upgrade,
    refcount width, lazy refcounts, size, downgrade last)."""
    try:
        if opts.encrypt:  # on an unlocked open of its own, before the header work below
            hooks["encrypt"](path, opts.encrypt, opts.secrets)
        _amend(path, opts, progress)
    except OSError as exc:
        raise from_oserror(exc, path) from None


def _amend(path: str, opts: AmendOptions, progress: Callable[[int, int], None] | None) -> None:
    from .check import FIX_LEAKS, check_and_repair

    steps = 5
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    fd = _open_locked(path)
    try:
        header, have = _read_header(fd, path)
        version = check_options(header, opts, path)
        if opts.data_file is not None or opts.data_file_raw is not None:
            hooks["data_file"](fd, header, have, path, opts.data_file, opts.data_file_raw)
        if header.dirty:
            header, have = _repair(fd, path)
        if version > header.version:
            _upgrade(header)
            write_header(fd, header, have, path)
        step()
        new_bits = opts.refcount_bits
        rewritten = new_bits is not None and new_bits != header.refcount_bits
        if rewritten:
            _rewrite_refcounts(fd, header, have, new_bits or 16, path)
        step()
        if opts.lazy_refcounts is not None and opts.lazy_refcounts != header.lazy_refcounts:
            header.compatible_features ^= fmt.COMPAT_LAZY_REFCOUNTS
            write_header(fd, header, have, path)
        step()
    except OSError as exc:
        raise from_oserror(exc, path) from None
    finally:
        os.close(fd)
    if rewritten:
        check_and_repair(path, FIX_LEAKS)  # frees the old refcount structure
    if opts.size is not None:
        _resize(path, opts.size)
    step()
    if version < 3 <= header.version:
        _downgrade(path)
    step()


def _backing_format(header: fmt.Header) -> str | None:
    ext = header.extension(fmt.EXT_BACKING_FORMAT)
    return ext.data.decode(errors="replace") if ext is not None else None


def _repair(fd: int, path: str) -> tuple[fmt.Header, int]:
    """A dirty (lazy refcounts) image: repair the refcounts first, as QEMU's open does."""
    from .check import repair_open_file

    repair_open_file(fd, path)
    header, have = _read_header(fd, path)
    if header.dirty:
        header.incompatible_features &= ~fmt.INCOMPAT_DIRTY
        write_header(fd, header, have, path)
    return header, have


def _upgrade(header: fmt.Header) -> None:
    """Version 2 -> 3 in memory: QEMU's v3 header length and feature name table."""
    header.version = 3
    header.header_length = fmt.V3_HEADER_LENGTH
    header.compression_type = 0
    header.extra_fields = b"\0" * (fmt.V3_HEADER_LENGTH - 105)
    header.refcount_order = 4
    header.set_extension(fmt.EXT_FEATURE_TABLE, fmt.default_feature_table())


def _rewrite_refcounts(fd: int, header: fmt.Header, have: int, bits: int, path: str) -> None:
    """New refcount blocks and table of ``bits`` wide entries in free clusters, synced; then
    the header switch (table offset, size and refcount_order in one sector write)."""
    from .check import expected_refcounts
    from .refcount import _FirstFitRebuild

    counts = expected_refcounts(fd, path)
    too_high = [int(c) for c in (counts > (1 << bits) - 1).nonzero()[0][:1]]
    if too_high:
        cluster = too_high[0]
        raise RequestError(
            f"Cannot decrease refcount entry width to {bits} bits: Cluster at offset "
            f"{cluster << header.cluster_bits:#x} has a refcount of {int(counts[cluster])}",
            path=path,
        )
    new = header.copy()
    new.refcount_order = bits.bit_length() - 1
    # New blocks and table where ``counts`` (which still counts the old ones) has room.
    offset, clusters = _FirstFitRebuild(fd, new, counts, path).run()
    header.refcount_order = new.refcount_order
    header.refcount_table_offset = offset
    header.refcount_table_clusters = clusters
    write_header(fd, header, have, path)


def _resize(path: str, size: int) -> None:
    from .image import Qcow2Image
    from .resize import resize

    with Qcow2Image.open(path) as img:
        resize(img, size)


# -- downgrade --------------------------------------------------------------------------------
def _downgrade(path: str) -> None:
    """Version 3 -> 2: zero clusters expanded, then the v2 header."""
    fd = _open_locked(path)
    try:
        header, have = _read_header(fd, path)
        needs_data = _expand_zero_clusters(fd, header)
    finally:
        os.close(fd)
    if needs_data:
        _write_zero_data(path, needs_data, header.cluster_size)
    fd = _open_locked(path)
    try:
        header, have = _read_header(fd, path)
        header.version = 2
        header.header_length = fmt.V2_HEADER_LENGTH
        header.incompatible_features = header.compatible_features = 0
        header.autoclear_features = 0
        header.compression_type = 0
        header.set_extension(fmt.EXT_FEATURE_TABLE, None)
        write_header(fd, header, have, path)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    finally:
        os.close(fd)


def _expand_zero_clusters(fd: int, header: fmt.Header) -> list[int]:
    """Rewrite the active L2 entries with the zero flag as version 2 can read them: an
    allocated one gets zeros written into its cluster (synced) and loses the flag; an
    unallocated one becomes a hole when there is no backing file. Returns the guest offsets
    of unallocated zero clusters over a backing file, which need data clusters of zeros."""
    cs = header.cluster_size
    per_l2 = cs // 8
    l1 = bytearray(header.l1_size * 8)
    pread_full(fd, l1, header.l1_table_offset)
    zeros = bytes(cs)
    needs_data: list[int] = []
    for l1_index, (l1e,) in enumerate(struct.iter_unpack(">Q", l1)):
        l2_offset = l1e & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        table = bytearray(cs)
        pread_full(fd, table, l2_offset)
        changed = False
        for l2_index, (entry,) in enumerate(struct.iter_unpack(">Q", table)):
            if not entry & fmt.OFLAG_ZERO or entry & fmt.OFLAG_COMPRESSED:
                continue
            host = entry & fmt.L2E_OFFSET_MASK
            if host:
                pwrite_full(fd, zeros, host)
                new = entry & ~fmt.OFLAG_ZERO
            elif header.backing_file:
                needs_data.append((l1_index * per_l2 + l2_index) * cs)
                continue
            else:
                new = 0
            struct.pack_into(">Q", table, l2_index * 8, new)
            changed = True
        if changed:
            os.fdatasync(fd)  # the zeros before the entries that expose them
            pwrite_full(fd, table, l2_offset)
    os.fdatasync(fd)
    return needs_data


def _write_zero_data(path: str, guest_offsets: list[int], cluster_size: int) -> None:
    """Data clusters of zeros at ``guest_offsets`` (through the library's allocating write)."""
    from .image import Qcow2Image

    zeros = bytes(cluster_size)
    with Qcow2Image.open(path) as img:
        for offset in guest_offsets:
            n = min(cluster_size, img.size - offset)
            img.write(zeros[:n], offset)


__all__ = [
    "AmendOptions",
    "HeaderSpaceError",
    "amend",
    "check_options",
    "hooks",
    "set_backing",
    "write_header",
]
