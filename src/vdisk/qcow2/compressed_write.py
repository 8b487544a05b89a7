"""Compressed cluster writes of a Qcow2Image (QEMU's ``write -c`` and ``compress=on``), and
the parallel decompression of a read that spans many compressed clusters.

A compressed write takes whole guest clusters (the image's last cluster may be short). Each is
compressed with the header's codec (``compress.py``); one that does not shrink is written as a
normal cluster through the image's ordinary write path, as QEMU does.

Compressed data is packed at byte granularity, as QEMU's ``qcow2_alloc_bytes``: the next
compressed cluster starts where the previous one ended, so consecutive compressed clusters
share host clusters, and one may run on into the next host cluster when that is the next one
allocated. Every host cluster a compressed cluster touches holds one reference for it, so
freeing it (through ``ClusterMap.entry_frees``) drops the refcount of each of them.

Order, as in the rest of the write path: L2 tables are made ours and the bytes allocated
(refcounts raised in the cache) under the metadata lock; the compressed data is written outside
it; then the L2 entries are stored. ``flush`` writes refcounts and data before L2 tables, so a
crash can at worst leak the bytes of a compressed cluster whose entry never reached the disk.

Compressed writers take turns (``CompressedWriter.lock``): the data of the last cluster of a
run is padded with zeros to its 512-byte sector end (so the file never ends mid-sector, as
QEMU keeps it), and that padding lies in the free bytes the next compressed write fills.
"""

from __future__ import annotations

import os
from _thread import allocate_lock  # threading.Lock, without threading's imports

from ..errors import CorruptImageError, ReadOnlyError, RequestError, UnsupportedFeatureError
from ..fileio import pread_full, pwritev_full
from ..record import record
from . import format as fmt
from .cluster import SEG_COMPRESSED, Segment
from .compress import compress_cluster, compress_many, decompress_many_into
from .datafile import refuse_on_data_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from typing_extensions import Buffer

    from .image import Qcow2Image

SECTOR = 512
PARALLEL_READ_MIN = 4  # compressed clusters in one read worth a trip to the codec pool
SPAN_GAP = 4096  # bytes between compressed clusters still read in the same pread
_PAD = bytes(SECTOR)


@record
class PreparedCluster:
    """One guest cluster ready to write: its data and, if it shrank, its compressed form."""

    guest_offset: int
    data: memoryview
    compressed: bytes | None


def refuse_compression(image: Qcow2Image) -> None:
    """Raise if this image cannot hold compressed clusters (QEMU refuses the same)."""
    h = image.header
    refuse_on_data_file(h, image.path)
    if h.crypt_method:
        raise UnsupportedFeatureError(
            "Compression and encryption not supported at the same time", path=image.path
        )


def prepare(
    image: Qcow2Image, buf: Buffer, offset: int, parallel: bool = True
) -> list[PreparedCluster]:
    """Split a whole-cluster request into clusters and compress them (CPU only, no lock:
    convert's workers call this in parallel). ``parallel`` spreads them over the codec pool.
    """
    view = memoryview(buf).cast("B")
    n = len(view)
    cs = image.cluster_size
    image.check_request(offset, n, write=True)
    refuse_compression(image)
    if offset & (cs - 1):
        raise RequestError(
            f"compressed write at {offset}: not aligned to the cluster size ({cs})",
            path=image.path,
        )
    if n & (cs - 1) and offset + n != image.size:
        raise RequestError(
            f"compressed write of {n} bytes: not whole clusters and not up to the image end",
            path=image.path,
        )
    pieces = [view[i : i + cs] for i in range(0, n, cs)]
    ctype = image.header.compression_type
    if parallel:
        blobs = compress_many(pieces, ctype, cs)
    else:
        blobs = [compress_cluster(p, ctype, cs) for p in pieces]
    return [
        PreparedCluster(offset + i * cs, piece, blob)
        for i, (piece, blob) in enumerate(zip(pieces, blobs, strict=True))
    ]


class CompressedWriter:
    """The byte allocator for compressed data and the write of prepared clusters."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image
        self.lock = allocate_lock()
        # Byte offset where the next compressed cluster may start; 0: start a new cluster.
        self.tail = 0

    def released(self, cluster: int) -> None:
        """A host cluster's refcount fell to 0: stop packing into it (it may be reused)."""
        if self.tail and self.tail >> self.image.cluster_bits == cluster:
            self.tail = 0

    def alloc_bytes(self, size: int) -> int:
        """Under the image lock: ``size`` bytes for compressed data, with a reference on each
        host cluster they touch (QEMU's qcow2_alloc_bytes)."""
        image = self.image
        rc = image.refcounts
        cb = image.cluster_bits
        cs = image.cluster_size
        offset = self.tail
        if offset:
            count = rc.get(offset >> cb)
            if count == 0 or count >= rc.max_refcount:
                offset = 0
        free_in_cluster = cs - (offset & (cs - 1)) if offset else 0
        if not offset or free_in_cluster < size:
            new = rc.allocate(1)[0]  # refcount 1: this cluster's reference
            if new in image.metadata:
                image._free_later([new])
                raise image._mark_corrupt(f"allocator returned metadata cluster {new}")
            if offset and new == (offset >> cb) + 1:
                rc.add(offset >> cb, 1)  # runs on from the current cluster into the new one
            else:
                offset = new << cb
        else:
            rc.add(offset >> cb, 1)
        end = offset + size
        self.tail = end if end & (cs - 1) else 0
        return offset

    def write(self, clusters: list[PreparedCluster]) -> None:
        """Write prepared clusters: runs of compressed ones here, the others as normal writes."""
        run: list[PreparedCluster] = []
        plain: list[PreparedCluster] = []
        cs = self.image.cluster_size
        for pc in clusters:
            kind = run if pc.compressed is not None else plain
            other = plain if kind is run else run
            if other or (kind and pc.guest_offset != kind[-1].guest_offset + cs):
                self._flush_runs(run, plain)  # a run is consecutive guest clusters
            kind.append(pc)
        self._flush_runs(run, plain)

    def _flush_runs(self, run: list[PreparedCluster], plain: list[PreparedCluster]) -> None:
        """Write the pending run of compressed clusters or of plain ones (one normal write
        for consecutive plain clusters), and empty both lists."""
        if run:
            self._write_run(run)
        if plain:
            data = plain[0].data if len(plain) == 1 else b"".join(p.data for p in plain)
            self.image._write(memoryview(data), plain[0].guest_offset)
        run.clear()
        plain.clear()

    def _write_run(self, run: list[PreparedCluster]) -> None:
        image = self.image
        cb = image.cluster_bits
        gc0 = run[0].guest_offset >> cb
        gc1 = run[-1].guest_offset >> cb
        with self.lock:
            entries, ticket = self._allocate_run(run, gc0, gc1)
            ok = False
            try:
                for host, iov in _host_runs(run, entries, cb):
                    pwritev_full(image.fd, iov, host)
                ok = True
            finally:
                self._commit_run(run, entries, ticket, ok)

    def _allocate_run(
        self, run: list[PreparedCluster], gc0: int, gc1: int
    ) -> tuple[list[int], int]:
        """Under the image lock: own the L2 tables, allocate the bytes, mark in flight.
        Returns the compressed L2 entries and the I/O ticket."""
        image = self.image
        m = image.map
        cb = image.cluster_bits
        with image._lock:
            if image._readonly:
                raise ReadOnlyError("image is read-only", path=image.path)
            if not image._write_ready:
                image._prepare_first_write()
            if image._inflight:
                image._wait_inflight(gc0, gc1)
            problem = m.range_conflict(gc0, gc1)
            if problem:
                raise image._mark_corrupt(problem)
            frees: list[int] = []
            for l1_index in range(gc0 >> m.l2_bits, (gc1 >> m.l2_bits) + 1):
                m.writable_l2(l1_index, frees)  # tables before the data they map
            image._free_later(frees)
            entries: list[int] = []
            try:
                for pc in run:
                    assert pc.compressed is not None
                    size = len(pc.compressed)
                    entries.append(fmt.encode_compressed(self.alloc_bytes(size), size, cb))
            except BaseException:
                held: list[int] = []
                for e in entries:
                    m.entry_frees(e, held)
                image._free_later(held)
                raise
            image._inflight.update(range(gc0, gc1 + 1))
            # An entry can repeat once its bytes were freed and reused: forget the last read.
            image._compressed_cache = (-1, b"")
            return entries, image._take_ticket()

    def _commit_run(
        self, run: list[PreparedCluster], entries: list[int], ticket: int, ok: bool
    ) -> None:
        """Under the image lock: store the entries (or give the bytes back on failure)."""
        image = self.image
        m = image.map
        cb = image.cluster_bits
        with image._lock:
            image._active.discard(ticket)
            frees: list[int] = []
            try:
                if ok:
                    image._unsynced = True
                    for pc, entry in zip(run, entries, strict=True):
                        old = m.set_entry(pc.guest_offset >> cb, entry, 0, frees)
                        m.entry_frees(old, frees)
                else:
                    for entry in entries:
                        m.entry_frees(entry, frees)
            finally:
                image._free_later(frees)
                for pc in run:
                    image._inflight.discard(pc.guest_offset >> cb)
                if image._waiters:
                    image._cond.notify_all()

    def decompress_segments(self, segs: list[Segment], view: memoryview, offset: int) -> set[int]:
        """Decode the whole compressed clusters among a read's segments straight into
        ``view`` (the read's buffer, which starts at guest ``offset``), on the codec pool
        when there are enough to share. Returns the guest offsets of the segments done:
        none for few, or when one is damaged (the one-by-one path then names it); a partial
        cluster (a read's unaligned head or tail) is left to that path too."""
        image = self.image
        cs = image.cluster_size
        whole = [
            s
            for s in segs
            if s.kind == SEG_COMPRESSED and s.length == cs and not s.guest_offset & (cs - 1)
        ]
        if len(whole) < PARALLEL_READ_MIN:
            return set()
        raws = _read_spans(
            image.fd, [fmt.decode_compressed(s.arg, image.cluster_bits) for s in whole]
        )
        outs = [view[s.guest_offset - offset : s.guest_offset - offset + cs] for s in whole]
        try:
            decompress_many_into(raws, image.header.compression_type, outs)
        except CorruptImageError:
            return set()
        return {s.guest_offset for s in whole}

    def write_whole_clusters(self, view: memoryview, offset: int) -> None:
        """A write on an image opened with ``compress=True``: its whole clusters (and a short
        last cluster of the image) go compressed, a partial head or tail as a normal write."""
        image = self.image
        cs = image.cluster_size
        end = offset + len(view)
        start = (offset + cs - 1) & ~(cs - 1)
        stop = end if end == image.size else end & ~(cs - 1)
        if start >= stop:
            image._write(view, offset)
            return
        if offset < start:
            image._write(view[: start - offset], offset)
        self.write(prepare(image, view[start - offset : stop - offset], start))
        if stop < end:
            image._write(view[stop - offset :], stop)


def _read_spans(fd: int, places: list[tuple[int, int]]) -> list[memoryview]:
    """The bytes at each (host offset, length), read with one pread per stretch of nearby
    places (packed compressed clusters lie back to back). A stretch never spans more than
    its members plus ``SPAN_GAP`` between each, so memory stays bounded by the request."""
    out: list[memoryview] = [memoryview(b"")] * len(places)
    order = sorted(range(len(places)), key=lambda i: places[i][0])
    members: list[int] = []
    start = end = 0

    def read_stretch() -> None:
        # os.pread: a bytes object filled by the read itself (a bytearray would be zeroed
        # first, a memset of every compressed byte read).
        data: bytes | bytearray = os.pread(fd, end - start, start)
        if len(data) < end - start:  # short: past EOF reads as zeros
            data = bytearray(end - start)
            pread_full(fd, data, start)
        view = memoryview(data)
        for i in members:
            host, length = places[i]
            out[i] = view[host - start : host - start + length]

    for i in order:
        host, length = places[i]
        if members and host <= end + SPAN_GAP:
            end = max(end, host + length)
        else:
            if members:
                read_stretch()
            members, start, end = [], host, host + length
        members.append(i)
    if members:
        read_stretch()
    return out


def _host_runs(
    run: list[PreparedCluster], entries: list[int], cluster_bits: int
) -> list[tuple[int, list[Any]]]:
    """(host offset, iovec) per contiguous stretch of compressed data; the last piece of
    each stretch is padded with zeros to its sector end."""
    out: list[tuple[int, list[Any]]] = []
    run_end = -1
    for pc, entry in zip(run, entries, strict=True):
        host, _length = fmt.decode_compressed(entry, cluster_bits)
        assert pc.compressed is not None
        if host != run_end:
            _pad(out, run_end)
            out.append((host, []))
        out[-1][1].append(pc.compressed)
        run_end = host + len(pc.compressed)
    _pad(out, run_end)
    return out


def _pad(out: list[tuple[int, list[Any]]], run_end: int) -> None:
    if out and run_end & (SECTOR - 1):
        out[-1][1].append(_PAD[: SECTOR - (run_end & (SECTOR - 1))])


__all__ = ["CompressedWriter", "PreparedCluster", "prepare", "refuse_compression"]
