"""Host extents: a guest-cluster -> host-offset table that lets an exporter (the ublk queues'
compiled loop) run reads and in-place overwrites on the qcow2 file itself, without the image's
lock or Python, for clusters whose mapping cannot change under the I/O.

One 64-bit entry per guest cluster, in an anonymous private mapping (untouched pages cost
nothing, so a large disk is cheap until its clusters are used):

- 0: unknown; the exporter asks the image (and then calls :meth:`HostExtents.learn`).
- ``host | READABLE``: a plain data cluster (not compressed, not zero, cluster aligned) at
  ``host`` in the image file; a read may go there.
- ``host | READABLE | WRITABLE``: also COPIED (ours alone), not metadata, inside the file, and
  the image takes writes with no bookkeeping (first-write work done, no dirty bitmap to mark,
  not compressing): an overwrite may go there.

The image fills entries only under its lock, from the L2 entry it holds then (``learn``), and
clears an entry under its lock BEFORE it changes that cluster's L2 entry
(``ClusterMap.set_entry``/``_set_copied``); anything that changes the rules for every cluster
(read-only after an error, bitmaps, first-write work to redo) clears the whole table.

An exporter's I/O may still be in flight on a host cluster when its entry is cleared (say, a
discard of the same range from another queue). Such a cluster is only freed later: it waits in
the image's pending frees until every I/O ticket older than the free is returned. So each user
holds a ticket while its I/O may run (``hold``/``release``), and renews it when it knows its
older I/O has finished (the ublk queue counts its I/O per epoch, see ``vdisk.ublk.queue``).
"""

from __future__ import annotations

import mmap
from _thread import allocate_lock  # threading.Lock, without threading's imports

from . import format as fmt

TYPE_CHECKING = False  # typing itself costs `vdisk convert` about a bare start
if TYPE_CHECKING:
    from .image import Qcow2Image

READABLE = 1
WRITABLE = 2
#: the low bits of an entry that are flags (host offsets are cluster aligned, >= 512)
FLAG_MASK = 511
#: at most this many entries (8 GiB of table address space is more than any exporter needs;
#: clusters past it are simply served by the image)
MAX_ENTRIES = 1 << 30


class HostExtents:
    """The table of one image, shared by every exporter queue of that image."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image
        self.fd = image.fd
        self.cluster_bits = image.cluster_bits
        self.count = min(
            (image.size + image.cluster_size - 1) >> image.cluster_bits, MAX_ENTRIES
        )
        self._map = mmap.mmap(-1, max(self.count, 1) * 8, flags=mmap.MAP_PRIVATE)
        self.table = memoryview(self._map).cast("Q")
        #: tickets held by users (their I/O may still run on hosts they looked up)
        self.holders = 0
        #: L1 indexes whose whole L2 table was learned (later misses learn single entries)
        self.learned_tables: set[int] = set()
        self._users_lock = allocate_lock()

    def address(self) -> int:
        """The table's address, for compiled code (valid while this object lives)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    # -- used by the image, under its lock ---------------------------------------------
    def forget(self, guest_cluster: int) -> None:
        if guest_cluster < self.count:
            self.table[guest_cluster] = 0

    def forget_all(self) -> None:
        # Private anonymous memory: MADV_DONTNEED gives back zero pages.
        self._map.madvise(mmap.MADV_DONTNEED)
        self.learned_tables.clear()

    # -- used by exporters ---------------------------------------------------------------
    def lookup(self, offset: int, length: int, write: bool) -> int:
        """The host offset of guest range [offset, offset+length) if it lies in one cluster
        whose entry allows it, else -1."""
        cb = self.cluster_bits
        gc = offset >> cb
        if (offset + length - 1) >> cb != gc or gc >= self.count:
            return -1
        e = self.table[gc]
        if not e & (WRITABLE if write else READABLE):
            return -1
        return (e & ~FLAG_MASK) + (offset & ((1 << cb) - 1))

    def learn(self, offset: int, length: int) -> None:
        """Fill the entries of the clusters of [offset, offset+length) from the image's
        cached L2 tables (call after the image served a request there). The first time, the
        whole L2 table of each cluster is learned: one pass instead of one request per
        cluster through the image."""
        img = self.image
        cb = self.cluster_bits
        gc0, gc1 = offset >> cb, min((offset + max(length, 1) - 1) >> cb, self.count - 1)
        l2_bits = img.map.l2_bits
        with img._lock:
            for l1_index in range(gc0 >> l2_bits, (gc1 >> l2_bits) + 1):
                first, last = l1_index << l2_bits, ((l1_index + 1) << l2_bits) - 1
                if l1_index in self.learned_tables:
                    first, last = max(first, gc0), min(last, gc1)
                elif img._learn_extents(self, first, min(last, self.count - 1)):
                    self.learned_tables.add(l1_index)
                    continue
                img._learn_extents(self, max(first, gc0), min(last, gc1))

    def hold(self) -> int:
        """A ticket for the I/O this user may run from now on."""
        img = self.image
        with img._lock:
            ticket = img._take_ticket()
        with self._users_lock:
            self.holders += 1
        return ticket

    def release(self, ticket: int) -> None:
        """Give back a ``hold`` ticket: none of the I/O it covered is still running."""
        self.image._active.discard(ticket)  # atomic under the GIL, as the image's readers do
        with self._users_lock:
            self.holders -= 1

    def frees_waiting(self) -> bool:
        """Are freed clusters waiting for old tickets (then users should renew theirs)?"""
        return bool(self.image._pending)

    def close(self) -> None:
        self.table.release()
        try:
            self._map.close()
        except BufferError:
            pass


def entry_flags(img: Qcow2Image, e: int) -> int:
    """The table entry for L2 entry ``e`` of a plain image, under the image's lock."""
    if e & img._bad_bits or not e & fmt.L2E_OFFSET_MASK:
        return 0
    host = e & fmt.L2E_OFFSET_MASK
    flags = READABLE
    if (
        e & fmt.OFLAG_COPIED
        and img._write_ready
        and not img._readonly
        and not img._tracked
        and not img._compress_writes
    ):
        c = host >> img.cluster_bits
        if c not in img.metadata and c < img.refcounts.end_cluster:
            flags |= WRITABLE
    return host | flags
