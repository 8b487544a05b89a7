"""Compression codecs of qcow2 clusters (QEMU keeps them in qcow2-threads.c).

Pure functions over bytes: the image finds a compressed cluster (``format.decode_compressed``)
and reads its bytes; this module turns them into one cluster of guest data. The header's
``compression_type`` picks the codec: deflate (raw, no zlib header, a 4 KiB window as QEMU
writes it) or zstd (one or more frames). Output is bounded by the cluster size whatever the
input claims, and the input may carry padding after the compressed data (the stored length is
rounded up to 512-byte sectors). Decoding inflates with ISA-L (the ``isal`` package, about
twice as fast as zlib) when it is installed, else with zlib; :func:`decompress_into` writes a
cluster straight into the caller's buffer (a whole zstd frame is decoded there in place).

The compress side follows QEMU's rules: deflate at the default level with a 4 KiB window,
zstd at its default level; a cluster whose compressed form does not fit in ``cluster_size - 1``
bytes is not compressed (the caller stores it as a normal cluster). A short last cluster of the
image is padded with zeros to a whole cluster first, as QEMU does.

zlib, ISA-L and zstandard release the GIL while they work, so :func:`compress_many` and
:func:`decompress_many` (and ``_into``) spread independent clusters over a small thread pool (one thread per
core): the data plane of ``convert -c`` and of reading compressed images.
"""

from __future__ import annotations

import io
import os
import zlib
from _thread import _local as thread_local  # threading.local, without threading's imports
from _thread import allocate_lock

from ..errors import CorruptImageError, UnsupportedFeatureError
from . import format as fmt

TYPE_CHECKING = False  # typing itself costs `vdisk convert` about a bare start
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any, TypeVar

    import zstandard
    from typing_extensions import Buffer

    _In = TypeVar("_In")
    _Out = TypeVar("_Out")

# QEMU's deflate: raw stream (negative wbits), 2^12-byte window.
DEFLATE_WBITS = -12
DEFLATE_MEMLEVEL = 9  # QEMU's deflateInit2 memLevel
ZSTD_LEVEL = 3  # zstd's default level, which QEMU keeps


def compress_cluster(data: Buffer, compression_type: int, cluster_size: int) -> bytes | None:
    """The compressed form of one cluster of guest data, or None if it does not shrink below
    ``cluster_size`` bytes (QEMU's rule: the output must fit in ``cluster_size - 1``).

    ``data`` may be shorter than a cluster (the image's last cluster): it is padded with zeros.
    """
    view = memoryview(data).cast("B")
    if len(view) > cluster_size:
        raise ValueError(f"{len(view)} bytes is more than one cluster ({cluster_size})")
    if len(view) < cluster_size:
        padded = bytearray(cluster_size)
        padded[: len(view)] = view
        view = memoryview(padded)
    if compression_type == fmt.COMPRESSION_ZLIB:
        deflater = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, DEFLATE_WBITS, DEFLATE_MEMLEVEL
        )
        out = deflater.compress(view) + deflater.flush()
    elif compression_type == fmt.COMPRESSION_ZSTD:
        out = _zstd_compressor().compress(view)
    else:
        raise UnsupportedFeatureError(f"compression type {compression_type} is not supported")
    return out if len(out) < cluster_size else None


_local = thread_local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    """One ZstdCompressor per thread (a compressor is not safe to share between threads)."""
    comp: zstandard.ZstdCompressor | None = getattr(_local, "zstd", None)
    if comp is None:
        import zstandard

        comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.zstd = comp
    return comp


_pool: ThreadPoolExecutor | None = None
_pool_lock = allocate_lock()
# Read once: os.cpu_count() costs ~0.1 ms a call, and _spread runs once per 2 MiB read.
_CORES = max(1, os.cpu_count() or 1)


def codec_pool() -> ThreadPoolExecutor:
    """The shared pool of codec threads, one per core (made on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # Here: concurrent.futures (and logging with it) is a start-up cost readers of
            # uncompressed images need not pay.
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="vdisk-codec")
        return _pool


def _spread(func: Callable[[_In], _Out], items: Sequence[_In]) -> list[_Out]:
    """``func`` of each item, in order: one contiguous slice per core, the calling thread
    taking the first (few hand-offs, so few waits for the GIL between clusters)."""
    n = len(items)
    parts = min(n, _CORES)
    if parts < 2:
        return [func(x) for x in items]
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [
        codec_pool().submit(lambda a, b: [func(x) for x in items[a:b]], bounds[i], bounds[i + 1])
        for i in range(1, parts)
    ]
    out = [func(x) for x in items[: bounds[1]]]
    for f in futures:
        out.extend(f.result())
    return out


def compress_many(
    clusters: Sequence[Buffer], compression_type: int, cluster_size: int
) -> list[bytes | None]:
    """:func:`compress_cluster` of each cluster, in order; spread over the cores."""
    return _spread(lambda c: compress_cluster(c, compression_type, cluster_size), clusters)


def decompress_many(
    raws: Sequence[Buffer], compression_type: int, cluster_size: int
) -> list[bytes]:
    """:func:`decompress_cluster` of each input, in order; spread over the cores."""
    return _spread(lambda r: decompress_cluster(r, compression_type, cluster_size), raws)


def decompress_many_into(
    raws: Sequence[Buffer], compression_type: int, outs: Sequence[memoryview]
) -> None:
    """:func:`decompress_into` of each (input, output) pair; spread over the cores."""
    pairs = list(zip(raws, outs, strict=True))
    _spread(lambda pair: decompress_into(pair[0], compression_type, pair[1]), pairs)


def decompress_into(raw: Buffer, compression_type: int, out: memoryview) -> None:
    """:func:`decompress_cluster` of ``raw`` (a cluster of ``len(out)`` bytes) into ``out``.

    A zstd frame that says it holds exactly one cluster (as QEMU and we write them) decodes
    straight into ``out``: no cluster-sized bytes object, no copy. Anything else goes through
    :func:`decompress_cluster` and is copied in. Raises CorruptImageError as it does."""
    if compression_type == fmt.COMPRESSION_ZSTD and _zstd_into(raw, out):
        return
    out[:] = decompress_cluster(raw, compression_type, len(out))


def decompress_cluster(raw: Buffer, compression_type: int, cluster_size: int) -> bytes:
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


def _inflate(raw: Buffer, cluster_size: int) -> bytes:
    codec = _inflater()
    try:
        data: bytes = codec.decompressobj(DEFLATE_WBITS).decompress(raw, cluster_size)
    except codec.error as exc:
        raise CorruptImageError(f"deflate: {exc}") from None
    return data


_fast_zlib: Any = None


def _inflater() -> Any:
    """The zlib-compatible module that inflates: ISA-L's (``isal``, about twice as fast as
    zlib on qcow2 clusters: the bulk of a deflate image's decompression) when installed, else
    zlib. Both stop at ``cluster_size`` bytes of output and ignore what follows the stream;
    ISA-L's window is always 32 KiB, so it also decodes streams that reach further back than
    QEMU's 4 KiB (which QEMU never writes)."""
    global _fast_zlib
    if _fast_zlib is None:
        try:  # imported here: readers of uncompressed images need not pay for it
            from isal import isal_zlib

            _fast_zlib = isal_zlib
        except ImportError:
            _fast_zlib = zlib
    return _fast_zlib


def _zstd_dctx() -> zstandard.ZstdDecompressor:
    """This thread's ZstdDecompressor (made once: half the cost of a 64 KiB cluster)."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "zstd_d", None)
    if dctx is None:
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        _local.zstd_d = dctx
    return dctx


def _zstd_into(raw: Buffer, out: memoryview) -> bool:
    """Decode a one-cluster zstd frame straight into ``out``; False (nothing done) when the
    frame does not say it holds exactly ``len(out)`` bytes."""
    import zstandard

    src = memoryview(raw)
    try:
        if zstandard.frame_content_size(src) != len(out):
            return False
    except zstandard.ZstdError:
        return False  # decompress_cluster names the damage
    reader = _zstd_dctx().stream_reader(src, read_across_frames=False)
    done = 0
    try:
        while done < len(out):
            n = reader.readinto(out[done:])
            if not n:
                break
            done += n
    except zstandard.ZstdError as exc:
        raise CorruptImageError(f"zstd: {exc}") from None
    if done != len(out):
        raise CorruptImageError(f"decompresses to {done} bytes, not {len(out)}")
    return True


def _zstd_decompress(raw: Buffer, cluster_size: int) -> bytes:
    import zstandard

    # Stop at a cluster's worth of output: the bytes after it are padding or the next
    # cluster, and a hostile frame must not make us inflate more than one cluster.
    dctx = _zstd_dctx()
    try:
        whole = zstandard.frame_content_size(memoryview(raw)) == cluster_size
    except zstandard.ZstdError:
        whole = False  # the stream below names the damage
    if whole:
        # One frame that says it holds exactly one cluster (as QEMU and we write them):
        # decoded in one call, its size checked by the library, what follows ignored.
        try:
            return dctx.decompress(memoryview(raw))
        except zstandard.ZstdError as exc:
            raise CorruptImageError(f"zstd: {exc}") from None
    reader = dctx.stream_reader(io.BytesIO(bytes(raw)), read_across_frames=True)
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


__all__ = [
    "DEFLATE_WBITS",
    "codec_pool",
    "compress_cluster",
    "compress_many",
    "decompress_cluster",
    "decompress_into",
    "decompress_many",
    "decompress_many_into",
]
