"""Named questions tools ask of an open qcow2 image, answered from its own structures.

* ``specific_info``: what ``qemu-img info`` prints under "Format specific information"
  (QEMU's ``qcow2_get_specific_info``), keyed as the QAPI type ``ImageInfoSpecificQCow2``.
* ``metadata_preallocated``: whether the image looks metadata-preallocated, by QEMU's test in
  ``qcow2_detect_metadata_preallocation`` (qcow2-refcount.c).
* ``reserved_host_runs``: host offsets that extended L2 entries keep for clusters whose
  subclusters are unallocated (``qemu-img map`` prints them).

``Qcow2Image`` exposes each as a method that takes the metadata lock; these functions expect
it held. Nothing here writes.
"""

from __future__ import annotations

import os

from ..fileio import pread_full
from . import format as fmt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .image import Qcow2Image

_BME_FLAG_IN_USE = 1 << 0
_BME_FLAG_AUTO = 1 << 1


def specific_info(image: Qcow2Image) -> dict[str, Any]:
    """The format-specific part of the image's ImageInfo (its ``data`` member)."""
    h = image.header
    compression = fmt.COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type))
    encrypt = _encrypt_info(image)
    if h.version == 2:
        v2: dict[str, Any] = {
            "compat": "0.10",
            "compression-type": compression,
            "refcount-bits": h.refcount_bits,
        }
        if encrypt:
            v2["encrypt"] = encrypt
        return v2
    data: dict[str, Any] = {
        "compat": "1.1",
        "compression-type": compression,
        "lazy-refcounts": h.lazy_refcounts,
        "refcount-bits": h.refcount_bits,
    }
    if encrypt:
        data["encrypt"] = encrypt
    data["corrupt"] = h.corrupt
    data["extended-l2"] = h.extended_l2
    bitmaps = _bitmap_list(image.fd, h)
    if bitmaps:
        data["bitmaps"] = bitmaps
    if h.data_file:
        data["data-file"] = h.data_file
        data["data-file-raw"] = bool(h.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW)
    return data


def _encrypt_info(image: Qcow2Image) -> dict[str, Any] | None:
    if not image.header.crypt_method:
        return None
    from .encryption import encrypt_info

    return encrypt_info(image.fd, image.header)


def _bitmap_list(fd: int, h: fmt.Header) -> list[dict[str, Any]]:
    """The persistent dirty bitmaps as QEMU lists them (only with the autoclear bit set)."""
    ext = h.bitmaps
    if ext is None or not h.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        return []
    directory = bytearray(ext.directory_size)
    pread_full(fd, directory, ext.directory_offset)
    out: list[dict[str, Any]] = []
    for entry in fmt.decode_bitmap_directory(bytes(directory), ext.nb_bitmaps):
        flags = []
        if entry.flags & _BME_FLAG_IN_USE:
            flags.append("in-use")
        if entry.flags & _BME_FLAG_AUTO:
            flags.append("auto")
        out.append({"flags": flags, "name": entry.name, "granularity": 1 << entry.granularity_bits})
    return out


def metadata_preallocated(image: Qcow2Image) -> bool:
    """QEMU's test: more clusters carry a refcount than the file has blocks allocated, by a
    margin of 10% (at least 2). QEMU then asks the file system where data clusters are holes."""
    st = os.fstat(image.fd)
    cs = image.cluster_size
    real = st.st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end = (st.st_size + cs - 1) // cs
    used = 0
    for cluster in range(end):
        used += image.refcounts.get(cluster) > 0
        if used > threshold:
            return True
    return False


def reserved_host_runs(
    image: Qcow2Image, offset: int, length: int
) -> list[tuple[int, int, int | None]]:
    """(guest offset, length, host offset or None) pieces of an unallocated guest range: on an
    extended-L2 image a cluster with a host cluster keeps that offset for all its subclusters."""
    cb = image.cluster_bits
    cs = image.cluster_size
    l2_bits = image.header.l2_bits
    end = offset + length
    out: list[tuple[int, int, int | None]] = []
    pos = offset
    while pos < end:
        guest_cluster = pos >> cb
        l1_index = guest_cluster >> l2_bits
        table = image.map.l2_table(l1_index) if image.header.extended_l2 else None
        if table is None:
            stop = min(end, (l1_index + 1) << (l2_bits + cb))
            out.append((pos, stop - pos, None))
            pos = stop
            continue
        stop = min(end, (guest_cluster + 1) << cb)
        entry = table[2 * (guest_cluster & ((1 << l2_bits) - 1))]
        host = entry & fmt.L2E_OFFSET_MASK
        if entry & fmt.OFLAG_COMPRESSED or not host:
            out.append((pos, stop - pos, None))
        else:
            out.append((pos, stop - pos, host + (pos & (cs - 1))))
        pos = stop
    return out
