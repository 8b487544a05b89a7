"""Compression codecs of qcow2 clusters (QEMU keeps them in qcow2-threads.c).

Pure functions over bytes: the image finds a compressed cluster (``format.decode_compressed``)
and reads its bytes; this module turns them into one cluster of guest data. The header's
``compression_type`` picks the codec: deflate (raw, no zlib header, a 4 KiB window as QEMU
writes it) or zstd (one or more frames). Output is bounded by the cluster size whatever the
input claims, and the input may carry padding after the compressed data (the stored length is
rounded up to 512-byte sectors). The compress side of each codec belongs here too.
"""

from __future__ import annotations

import io
import zlib

from ..errors import CorruptImageError, UnsupportedFeatureError
from . import format as fmt

# QEMU's deflate: raw stream (negative wbits), 2^12-byte window.
DEFLATE_WBITS = -12


def decompress_cluster(raw: bytes | bytearray, compression_type: int, cluster_size: int) -> bytes:
    """One cluster of guest data from its compressed bytes.

    Raises CorruptImageError if the data does not decode to exactly ``cluster_size`` bytes.
    """
    if compression_type == fmt.COMPRESSION_ZLIB:
        data = _inflate(raw, cluster_size)
    elif compression_type == fmt.COMPRESSION_ZSTD:
        data = _zstd_decompress(raw, cluster_size)
    else:
        raise UnsupportedFeatureError(f"compression type {compression_type} is not supported")
    if len(data) != cluster_size:
        raise CorruptImageError(f"decompresses to {len(data)} bytes, not {cluster_size}")
    return data


def _inflate(raw: bytes | bytearray, cluster_size: int) -> bytes:
    try:
        return zlib.decompressobj(DEFLATE_WBITS).decompress(bytes(raw), cluster_size)
    except zlib.error as exc:
        raise CorruptImageError(f"deflate: {exc}") from None


def _zstd_decompress(raw: bytes | bytearray, cluster_size: int) -> bytes:
    import zstandard

    # Stop at a cluster's worth of output: the bytes after it are padding or the next
    # cluster, and a hostile frame must not make us inflate more than one cluster.
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(bytes(raw)), read_across_frames=True
    )
    out = bytearray()
    try:
        while len(out) < cluster_size:
            part = reader.read(cluster_size - len(out))
            if not part:
                break
            out += part
    except zstandard.ZstdError as exc:
        raise CorruptImageError(f"zstd: {exc}") from None
    return bytes(out)


__all__ = ["DEFLATE_WBITS", "decompress_cluster"]
