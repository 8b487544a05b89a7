"""Qcow2Image: a QCOW2 file as a thread-safe BlockDevice.

Lock story
----------
One metadata lock (``_lock``, with the condition ``_cond`` on it) protects everything that
describes the image: the header, the L1 table, the refcount table, the metadata cache (L2
tables and refcount blocks), the free-space index, the pending frees and the in-flight sets.
Guest data I/O never happens under it, except the small table writes of a flush:

* read: lock; translate the range into segments; take a ticket; unlock; one preadv per
  contiguous host run; return the ticket (``set.discard``, atomic under the GIL, so no second
  lock round trip). A 4K read inside one cluster with a cached L2 table skips the segment
  list entirely; so does a write in place into a cluster that is already ours.
* write: lock; wait until no allocating write is in flight on the same guest clusters; plan
  each cluster (in place / new / reuse); allocate clusters; mark the allocating ones in
  flight; take a ticket; unlock; read copy-on-write head/tail; one pwritev per contiguous host
  run; lock; store the L2 entries; clear the in-flight marks; return the ticket.
* write_zeroes / discard: lock; wait as a write does; update L2 entries; unlock.
* compressed write (``compressed_write.py``): compress with no lock held; then as a write,
  with byte allocation in place of cluster allocation; compressed writers take turns.

Clusters freed by an overwrite, a discard or a zero request are not reusable at once: they go
to a pending list tagged with the current ticket number and their refcount drops only at a
flush, after the L2 change is on disk, and only once every I/O that started before the free
has finished (its ticket is returned). So a crash can only leak clusters, and a reader that
translated an address before a discard never reads another guest cluster's data.

Ordering on disk: data and refcount increases are synced before L2 tables are written; L2
tables before the L1 entries that point at them; refcount decreases last. ``flush()`` keeps
these promises; evicting a dirty L2 table from the cache does the same in small.
"""

from __future__ import annotations

import os
import struct
from _thread import allocate_lock  # threading.Lock, without threading's imports
from array import array

from .. import locking
from ..backends.raw import write_zeroes_fd
from ..block import BlockDevice, BlockDeviceBase, Extent, merge_extents
from ..errors import (
    BackingChainError,
    CorruptImageError,
    ReadOnlyError,
    RequestError,
    UnsupportedFeatureError,
    VdiskError,
    from_oserror,
)
from ..fileio import pread_full, pwrite_full, pwritev_full
from ..filenames import resolve_backing
from . import datafile
from . import format as fmt
from .bitmap import BitmapSet, PersistentBitmap
from .cache import L2, MetadataCache, default_capacity
from .cluster import (
    IN_PLACE,
    NEW,
    SEG_BACKING,
    SEG_COMPRESSED,
    SEG_DATA,
    SEG_ZERO,
    ClusterMap,
    Segment,
    WritePlan,
    read_snapshots,
)
from .compress import decompress_cluster
from .compressed_write import CompressedWriter, PreparedCluster, prepare
from .extents import HostExtents, entry_flags
from .refcount import RefcountManager
from .references import MetadataClusters, metadata_clusters
from .summary import read_header

TYPE_CHECKING = False
if TYPE_CHECKING:
    from threading import Condition
    from typing import Any

    from typing_extensions import Buffer

    from .encryption import ImageCipher

MAX_CHAIN_DEPTH = 64
_ZEROS = bytes(1 << 20)
# Module-level copies for the hot paths (a global load, not a module attribute load).
_L1E_OFFSET_MASK = fmt.L1E_OFFSET_MASK
_L2E_OFFSET_MASK = fmt.L2E_OFFSET_MASK
_OFLAG_COPIED = fmt.OFLAG_COPIED


def _norm_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in options.items()}


class Qcow2Image(BlockDeviceBase):
    """A QCOW2 image (v2 or v3). Open with :meth:`open`; see the module docstring for locks."""

    snapshot: fmt.SnapshotEntry | None  # the snapshot a read-only view shows (open(snapshot=))
    data_file: str | None  # the external data file's path, if the image has one
    _passphrase: str | bytes | None = None
    _unlock_key: bool = True

    def __init__(self) -> None:  # use Qcow2Image.open()
        raise TypeError("use Qcow2Image.open(path, ...)")

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str,
        readonly: bool = False,
        l2_cache_size: int | str | None = None,
        refcount_cache_size: int | str | None = None,
        open_backing: bool = True,
        force_share: bool = False,
        **options: Any,
    ) -> Qcow2Image:
        """Open ``path`` as a BlockDevice.

        ``l2_cache_size``/``refcount_cache_size`` (bytes or '4M') size the metadata cache like
        QEMU's options. ``open_backing=False`` leaves the backing chain closed (``backing`` is
        None; unallocated clusters read as zeros), as ``qemu-img info`` opens images.
        The file is locked as QEMU locks it (see vdisk.locking); ``force_share=True`` (qemu-img
        -U) needs ``readonly`` and lets writers in. ``snapshot`` (an ID or name, or
        ``{"id": ..., "name": ...}``) opens that internal snapshot read-only with its disk
        size (``snapshot_keep_size=True``: the image's size, as qemu-img convert -l reads it).
        """
        opts = _norm_options(options)
        chain: tuple[str, ...] = opts.pop("_chain", ())
        l2_cache_size = opts.pop("l2_cache_size", l2_cache_size)
        refcount_cache_size = opts.pop("refcount_cache_size", refcount_cache_size)
        opts.pop("format", None)
        open_backing = bool(opts.pop("backing", open_backing))
        snapshot: str | dict[str, str] | None = opts.pop("snapshot", None)
        keep_size = bool(opts.pop("snapshot_keep_size", False))
        if snapshot is not None:
            readonly = True  # a snapshot view never writes
        data_file: str | None = opts.pop("data_file", None)
        compress = bool(opts.pop("compress", False))
        passphrase = opts.pop("passphrase", None)
        unlock = bool(opts.pop("unlock", True))
        if opts:
            raise RequestError(
                f"unknown qcow2 open option(s): {', '.join(sorted(opts))}", path=path
            )
        self = cls.__new__(cls)
        self.data_file = data_file  # overrides the header's data-file name
        # Encrypted images (qcow2/encryption.py): unlock=False opens metadata only (info).
        self._passphrase, self._unlock_key = passphrase, unlock
        self._init(
            path,
            readonly,
            _size_opt(l2_cache_size),
            _size_opt(refcount_cache_size),
            open_backing,
            chain,
            force_share,
        )
        if snapshot is not None:
            self._open_snapshot_view(snapshot, keep_size)
        self._compress_writes = compress
        return self

    def _open_snapshot_view(self, key: str | dict[str, str], keep_size: bool) -> None:
        from .snapshot import load_view

        try:
            self.snapshot = load_view(self, key, keep_size)
        except BaseException:
            self.close()
            raise

    def _init(
        self,
        path: str,
        readonly: bool,
        l2_cache_size: int | None,
        refcount_cache_size: int | None,
        open_backing: bool,
        chain: tuple[str, ...],
        force_share: bool = False,
    ) -> None:
        self.path = path
        self.backing: BlockDevice | None = None
        self.fd = -1
        self.data_fd = -1  # guest data: the fd, or the external data file's
        self.lock_mode: locking.LockMode | None = None  # what the fd's locks say, if taken
        if force_share and not readonly:
            raise RequestError("force-share=on can only be used with read-only images", path=path)
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            mode = locking.mode_for("qcow2", readonly, force_share)
            self.lock_mode = mode if locking.lock(self.fd, path, mode) else None
            self._load(path, readonly, l2_cache_size, refcount_cache_size, open_backing, chain)
        except VdiskError as exc:
            self._abort()
            if exc.path is None:
                exc.path = path
            raise
        except OSError as exc:
            self._abort()
            raise from_oserror(exc, path) from None
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if self.backing is not None:
            self.backing.close()
        if self.data_fd >= 0 and self.data_fd != self.fd:
            os.close(self.data_fd)
        self.data_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _load(
        self,
        path: str,
        readonly: bool,
        l2_cache_size: int | None,
        refcount_cache_size: int | None,
        open_backing: bool,
        chain: tuple[str, ...],
    ) -> None:
        fd = self.fd
        file_size = os.fstat(fd).st_size
        header = read_header(fd)
        self._encrypted = bool(header.crypt_method)
        self._crypto: ImageCipher | None = None
        if self._encrypted and (self._unlock_key or not readonly):
            from .encryption import open_cipher  # loads cryptography only when needed

            self._crypto = open_cipher(fd, header, self._passphrase, path)
        if header.corrupt and not readonly:
            raise CorruptImageError(
                "image is marked corrupt (incompatible bit 1); open it read-only, or repair it"
            )
        if header.dirty and not readonly:
            header = self._repair_refcounts(header)
            file_size = os.fstat(fd).st_size
        super().__init__(header.size, readonly, path)
        self._opened_rw = not readonly
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.granularity = self.cluster_size >> (5 if header.extended_l2 else 0)
        self._lock = allocate_lock()
        self._condition: Condition | None = None  # on _lock, made by the first wait
        self.metadata: set[int] = set()
        capacity = default_capacity(
            header.size,
            header.cluster_bits,
            header.l2_entry_size,
            l2_cache_size,
            refcount_cache_size,
        )
        self.cache = MetadataCache(
            fd, self.cluster_size, header.refcount_order, capacity, self._before_table_write
        )
        # Shortcuts for the hot read path.
        self._slots = self.cache._slots
        self._extended = header.extended_l2
        # The hot paths serve plain images; extended L2 and encrypted ones take the general.
        self._fast_paths = not (header.extended_l2 or self._encrypted)
        self._span_bits = header.cluster_bits + header.l2_bits
        self._l2_mask = (1 << header.l2_bits) - 1
        self._bad_bits = (
            fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO | ((self.cluster_size - 1) & fmt.L2E_OFFSET_MASK)
        )
        self.refcounts = RefcountManager(fd, header, self.cache, file_size, self.metadata, path)
        self.map = ClusterMap(
            fd, header, self.cache, self.refcounts, self.metadata, file_size, path
        )
        #: the host-extent table an exporter asked for (``host_extents``), else None
        self._extents: HostExtents | None = None
        self._open_data_file(path, header, readonly, open_backing)
        found = self._find_metadata(file_size)
        self.metadata.update(found.all)
        # Fixed until the first write, which checks that no L2 pointer lands on them.
        self._non_l2_metadata = found.others
        self._inflight: set[int] = set()
        self._waiters = 0
        # Set while an operation drains the I/O in flight: new requests wait at _admit, so
        # a stream of them cannot starve the drain.
        self._quiescing = 0
        self._next_ticket = 0
        self._active: set[int] = set()
        self._pending: list[tuple[int, list[int]]] = []
        self._unsynced = False
        # False (qemu's cache=unsafe): flush/close still write the metadata back, in order,
        # but never fdatasync; a crash (of the host) may then lose or tear anything.
        self.durable = True
        self._write_ready = False
        self._set_dirty = False
        self._compressed_cache: tuple[int, bytes] = (-1, b"")
        self.snapshot = None
        self._compressed = CompressedWriter(self)
        self.refcounts.on_release = self._compressed.released
        self._compress_writes = False  # compress=True: whole-cluster writes go compressed
        # Persistent dirty bitmaps (bitmap.py); the write paths mark ``_tracked`` if any.
        self._bitmaps = BitmapSet(self, readonly)
        self._tracked = self._bitmaps.tracked
        # Backing chain.
        self._chain_depth = 0
        if header.backing_file and open_backing:
            self.backing = self._open_backing(chain)
            self._chain_depth = getattr(self.backing, "_chain_depth", 0) + 1

    def _find_metadata(self, file_size: int) -> MetadataClusters:
        """Host clusters holding metadata, from the same walk as check (no L2 table read)."""
        return metadata_clusters(
            self.fd,
            self.header,
            file_size,
            self.path,
            l1=self.map.l1,
            reftable=self.refcounts.table,
        )

    def _open_data_file(
        self, path: str, header: fmt.Header, readonly: bool, open_backing: bool
    ) -> None:
        """The fd guest data goes through: the image's own, or its external data file's.
        Without ``open_backing`` (as qemu-img info opens) a missing data file is no error."""
        where = datafile.data_file_path(path, header, self.data_file)
        self.data_raw = datafile.is_raw(header)
        if where is None:
            self.data_fd = self.fd
            return
        self.map.data_file = True
        if not open_backing and not os.path.exists(where):
            return
        share = self.lock_mode is not None and self.lock_mode.force_share
        self.data_fd, _locked = datafile.open_data_file(where, readonly, share)
        self.data_file = where

    def _open_backing(self, chain: tuple[str, ...]) -> BlockDevice:
        h = self.header
        assert h.backing_file is not None
        name = h.backing_file
        from ..nbd import backing as nbd_backing

        if nbd_backing.is_nbd_backing(name):
            return nbd_backing.open_nbd_backing(name, h.backing_format)
        if name.startswith("json:") or (":" in name.split("/")[0] and not os.path.exists(name)):
            raise UnsupportedFeatureError(
                f"backing file {name!r}: protocol backing files are not supported"
            )
        bpath = resolve_backing(self.path, name)
        real = os.path.realpath(bpath)
        here = os.path.realpath(self.path)
        seen = (*chain, here)
        if real in seen:
            raise BackingChainError(f"backing file loop: {name!r} is already in the chain")
        if len(seen) > MAX_CHAIN_DEPTH:
            raise BackingChainError(f"backing chain deeper than {MAX_CHAIN_DEPTH}")
        if not os.path.exists(bpath):
            raise BackingChainError(f"backing file {name!r} not found")
        # As QEMU: -U (force-share) reaches the whole chain.
        share = self.lock_mode is not None and self.lock_mode.force_share
        bfmt = h.backing_format
        if bfmt is None:
            from .. import probe_format

            bfmt = probe_format(bpath)
        if bfmt == "qcow2":
            return Qcow2Image.open(bpath, readonly=True, force_share=share, _chain=seen)
        if bfmt == "raw":
            from ..backends.raw import RawDevice

            return RawDevice(bpath, readonly=True, force_share=share)
        raise UnsupportedFeatureError(f"backing file {name!r}: format {bfmt!r} is not supported")

    def _repair_refcounts(self, header: fmt.Header) -> fmt.Header:
        """The dirty bit is set: refcounts may be wrong. As QEMU, run the check with every
        repair on (the one walk and the one rebuild), then take the repaired header."""
        from .check import repair_open_file  # numpy: only a dirty image needs the check

        result = repair_open_file(self.fd, self.path)
        repaired = read_header(self.fd)
        if repaired.dirty and not result.check_errors:
            # The refcounts now match the tables (what the dirty bit warns of); what check
            # still reports lies in the tables themselves. QEMU clears the bit too.
            repaired.incompatible_features &= ~fmt.INCOMPAT_DIRTY
            pwrite_full(
                self.fd,
                struct.pack(">Q", repaired.incompatible_features),
                fmt.HDR_INCOMPATIBLE_FEATURES,
            )
            os.fdatasync(self.fd)
        return repaired

    # -- header fields ------------------------------------------------------------------
    def _write_features(
        self, incompatible: int | None = None, autoclear: int | None = None
    ) -> None:
        if self.header.version < 3:
            return
        if incompatible is not None:
            pwrite_full(self.fd, struct.pack(">Q", incompatible), fmt.HDR_INCOMPATIBLE_FEATURES)
            self.header.incompatible_features = incompatible
        if autoclear is not None:
            pwrite_full(self.fd, struct.pack(">Q", autoclear), fmt.HDR_AUTOCLEAR_FEATURES)
            self.header.autoclear_features = autoclear
        os.fdatasync(self.fd)

    def _prepare_first_write(self) -> None:
        """Under the lock, before the first change: refuse a write that cannot be made safe,
        then the dirty bit and autoclear bits."""
        problem = self._write_hazard()
        if problem:
            raise self._mark_corrupt(problem)
        h = self.header
        if h.version >= 3:
            keep = h.autoclear_features & self._bitmaps.kept_autoclear()
            if self.map.data_file:
                keep |= h.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW
            if h.autoclear_features != keep:
                # Bitmaps are kept up to date (bitmap.py) and data_file_raw stays true; we
                # know no other autoclear feature.
                self._write_features(autoclear=keep)
            self._bitmaps.begin_write()
            if h.lazy_refcounts and not h.dirty:
                self._write_features(incompatible=h.incompatible_features | fmt.INCOMPAT_DIRTY)
                self._set_dirty = True
        self._write_ready = True
        self._forget_extents()  # learned before: relearned writable

    def _write_hazard(self) -> str | None:
        """Why writing would damage this image, judged before anything is written: an L2
        table pointer that lands on other metadata, or refcounts evidently wrong (a metadata
        cluster at refcount 0, so the allocator would hand out metadata)."""
        l1_index = self.map.l2_on_metadata(self._non_l2_metadata)
        if l1_index is not None:
            l2_offset = self.map.l1[l1_index] & fmt.L1E_OFFSET_MASK
            return f"L1 entry {l1_index}: L2 table at {l2_offset:#x} overlaps other metadata"
        cluster = self.refcounts.unreferenced_metadata()
        if cluster is not None:
            return (
                f"metadata cluster at {cluster << self.cluster_bits:#x} has refcount 0: "
                "the refcounts are wrong"
            )
        return None

    def _mark_corrupt(self, message: str) -> CorruptImageError:
        try:
            self._write_features(
                incompatible=self.header.incompatible_features | fmt.INCOMPAT_CORRUPT
            )
        except OSError:
            pass
        self._readonly = True
        self._forget_extents()
        return CorruptImageError(f"{message}; image marked corrupt", path=self.path)

    # -- tickets and pending frees ------------------------------------------------------
    def _take_ticket(self) -> int:
        t = self._next_ticket
        self._next_ticket = t + 1
        self._active.add(t)
        return t

    def _free_later(self, clusters: list[int]) -> None:
        if clusters:
            self._pending.append((self._next_ticket, clusters))

    def _releasable(self) -> bool:
        if not self._pending:
            return False
        oldest = min(self._active) if self._active else self._next_ticket
        return self._pending[0][0] <= oldest

    def _release_pending(self) -> bool:
        oldest = min(self._active) if self._active else self._next_ticket
        keep: list[tuple[int, list[int]]] = []
        released = False
        for bound, clusters in self._pending:
            if bound <= oldest:
                for c in clusters:
                    if not self.refcounts.get(c):
                        continue  # a damaged entry freed it twice: skipping can only leak
                    self.refcounts.add(c, -1)
                    if c in self.metadata and self.refcounts.get(c) == 0:
                        self.metadata.discard(c)
                        self.cache.drop(c << self.cluster_bits)
                released = True
            else:
                keep.append((bound, clusters))
        self._pending = keep
        return released

    @property
    def _cond(self) -> Condition:
        """Under the lock: the condition on it (threading costs an image's open more than the
        rest of it, and only a request that must wait needs it)."""
        if self._condition is None:
            import threading

            self._condition = threading.Condition(self._lock)
        return self._condition

    def _wait(self, timeout: float | None = None) -> None:
        """Under the lock: wait on the condition, counted so that finishing requests notify."""
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def _admit(self) -> None:
        """Hold a new request until the drain under way (see snapshot.py) has finished."""
        with self._lock:
            while self._quiescing:
                self._wait()

    def _wait_inflight(self, gc0: int, gc1: int) -> None:
        while self._inflight and any(gc in self._inflight for gc in range(gc0, gc1 + 1)):
            self._wait()

    # -- write-back ---------------------------------------------------------------------
    def _before_table_write(self, kind: int) -> None:
        """Cache eviction hook: a dirty L2 table may go out only after what it depends on."""
        self.refcounts.refuse_after_failed_move()
        if kind == L2:
            wrote = self.refcounts.write_back()
            if self._unsynced and self.data_fd != self.fd:
                os.fdatasync(self.data_fd)
            if wrote or self._unsynced:
                if self.durable:
                    os.fdatasync(self.fd)
                self._unsynced = False

    def _flush_locked(self) -> None:
        self.refcounts.write_back()
        if self.durable:
            if self.data_fd != self.fd:
                os.fdatasync(self.data_fd)
            os.fdatasync(self.fd)
        self._unsynced = False
        tables = self.cache.write_back(L2)
        if tables and self.durable:
            os.fdatasync(self.fd)
        if self.map.write_l1() and self.durable:  # the L1 write happens either way
            os.fdatasync(self.fd)
        if self._release_pending():
            self.refcounts.write_back()
            if self.durable:
                os.fdatasync(self.fd)

    def flush(self) -> None:
        if self._closed:
            raise self._closed_error()
        if not self._opened_rw:
            return
        with self._lock:
            try:
                self._flush_locked()
            except OSError as exc:
                raise from_oserror(exc, self.path) from None

    def _closed_error(self) -> VdiskError:
        from ..errors import ClosedError

        return ClosedError("device is closed", path=self.path)

    def close(self) -> None:
        """Flush and release the file; the fd is released even when the flush fails."""
        if self._closed:
            return
        try:
            if self._opened_rw and self.fd >= 0:
                with self._lock:
                    self._active.clear()
                    if not self._readonly:
                        self._bitmaps.store(final=True)
                    self._flush_locked()
                    if self._pending:
                        self._release_pending()
                        self._flush_locked()
                    if self._set_dirty or (self.header.dirty and self._write_ready):
                        self._write_features(
                            incompatible=self.header.incompatible_features & ~fmt.INCOMPAT_DIRTY
                        )
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        finally:
            super().close()
            self._abort()

    # -- reads --------------------------------------------------------------------------
    def readinto(self, buf: Buffer, offset: int) -> int:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        if self._closed or offset < 0 or offset + n > self._size:
            self.check_request(offset, n)
        if not n:
            return n
        if self._quiescing:
            self._admit()
        cmask = self.cluster_size - 1
        if (offset & cmask) + n <= cmask + 1 and self._fast_paths:
            # Hot path: one cluster, its L2 table cached, a plain data entry.
            host = 0
            with self._lock:
                l2_off = self.map.l1[offset >> self._span_bits] & _L1E_OFFSET_MASK
                slot = self._slots.get(l2_off) if l2_off else None
                if slot is not None:
                    self._slots.move_to_end(l2_off)
                    e = slot.table[(offset >> self.cluster_bits) & self._l2_mask]
                    if not e & self._bad_bits:
                        host = e & _L2E_OFFSET_MASK
                        if host:
                            ticket = self._next_ticket
                            self._next_ticket = ticket + 1
                            self._active.add(ticket)
            if host:
                try:
                    got = os.preadv(self.data_fd, [view], host + (offset & cmask))
                    if got < n:
                        pread_full(self.data_fd, view[got:], host + (offset & cmask) + got)
                except OSError as exc:
                    raise from_oserror(exc, self.path) from None
                finally:
                    # set.discard is a single atomic operation under the GIL; the lock
                    # holders only read the set (min()) without running Python code.
                    self._active.discard(ticket)
                return n
        self._read(view, offset)
        return n

    def file_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """``block.FileRanges``: only a read-only open, whose lock keeps QEMU's users from
        resizing the file (not under force-share), offers its plain data clusters; a
        writable image may move or free clusters under the caller."""
        if not self.readonly or self._encrypted or self._closed or self.data_fd != self.fd:
            return None
        if self.lock_mode is None or self.lock_mode.force_share:
            return None
        if offset < 0 or length <= 0 or offset + length > self._size:
            return None
        segs: list[Segment] = []
        with self._lock:
            self.map.map_range(offset, length, segs)
        if len(segs) != 1 or segs[0][0] != SEG_DATA:
            return None
        host = segs[0][3]
        if host + length > os.fstat(self.fd).st_size:
            return None  # past the file's end (a damaged image): readinto says so
        return self.fd, host

    def _read(self, view: memoryview, offset: int) -> None:
        segs: list[Segment] = []
        with self._lock:
            self.map.map_range(offset, len(view), segs)
            ticket = self._next_ticket
            self._next_ticket = ticket + 1
            self._active.add(ticket)
        try:
            fd = self.data_fd
            # Many whole compressed clusters: decoded in place, on the codec pool.
            inflated = self._compressed.decompress_segments(segs, view, offset)
            crypto = self._crypto if self._encrypted else None
            if self._encrypted and crypto is None:
                raise self._locked_error()
            for kind, g, length, arg in segs:
                b = g - offset
                if kind == SEG_DATA:
                    if crypto is not None:
                        crypto.read(fd, view[b : b + length], arg, g)
                    else:
                        pread_full(fd, view[b : b + length], arg)
                elif kind == SEG_ZERO:
                    _fill_zero(view, b, length)
                elif kind == SEG_BACKING:
                    self._read_backing(view[b : b + length], g)
                elif g not in inflated:
                    data = self._decompress(arg)
                    c = g & (self.cluster_size - 1)
                    view[b : b + length] = data[c : c + length]
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        finally:
            self._active.discard(ticket)  # atomic under the GIL (see readinto)

    def _read_backing(self, view: memoryview, guest: int) -> None:
        parent = self.backing
        n = len(view)
        if parent is None or guest >= parent.size:
            _fill_zero(view, 0, n)
            return
        avail = min(n, parent.size - guest)
        parent.readinto(view[:avail], guest)
        if avail < n:
            _fill_zero(view, avail, n - avail)

    def _decompress(self, entry: int) -> bytes:
        """The guest data of a compressed cluster (the last one is kept for the next read)."""
        cached = self._compressed_cache
        if cached[0] == entry:
            return cached[1]
        if self.map.data_file:
            raise CorruptImageError(
                "compressed cluster entry found in an image with an external data file",
                path=self.path,
            )
        host, length = fmt.decode_compressed(entry, self.cluster_bits)
        raw = bytearray(length)
        pread_full(self.fd, raw, host)
        try:
            data = decompress_cluster(raw, self.header.compression_type, self.cluster_size)
        except CorruptImageError as exc:
            raise CorruptImageError(
                f"compressed cluster at {host:#x}: {exc.message}", path=self.path
            ) from None
        self._compressed_cache = (entry, data)
        return data

    # -- writes -------------------------------------------------------------------------
    def write(self, buf: Buffer, offset: int, fua: bool = False) -> int:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        if self._closed or self._readonly or offset < 0 or offset + n > self._size:
            self.check_request(offset, n, write=True)  # raises the matching error
        if self._quiescing:
            self._admit()
        if self._tracked:
            self._bitmaps.mark(offset, n)
        if self._compress_writes and n:
            try:
                self._compressed.write_whole_clusters(view, offset)
            except OSError as exc:
                raise from_oserror(exc, self.path) from None
            if fua:
                self.flush()
            return n
        cmask = self.cluster_size - 1
        if (
            n
            and (offset & cmask) + n <= cmask + 1
            and self._fast_paths
            and self._write_ready
            and self.data_fd == self.fd  # data-file clusters have no refcounts
        ):
            # Hot path: a cluster that is ours (COPIED), its L2 table cached: write in place.
            host = 0
            new = False
            cb = self.cluster_bits
            with self._lock:
                gc = offset >> cb
                if not self._readonly and not (self._inflight and gc in self._inflight):
                    l1e = self.map.l1[offset >> self._span_bits]
                    l2_off = l1e & _L1E_OFFSET_MASK
                    slot = self._slots.get(l2_off) if l2_off else None
                    if slot is not None:
                        self._slots.move_to_end(l2_off)
                        e = slot.table[gc & self._l2_mask]
                        if e & _OFLAG_COPIED and not e & self._bad_bits:
                            host = e & _L2E_OFFSET_MASK
                            c = host >> cb
                            if c in self.metadata or c >= self.refcounts.end_cluster:
                                host = 0  # the general path refuses it
                        elif (
                            e == 0 and n == cmask + 1 and l1e & _OFLAG_COPIED and not self._pending
                        ):
                            # A whole unallocated cluster: no copy-on-write needed.
                            c = self.refcounts.allocate_end_fast()
                            if c is not None:
                                host = c << cb
                                new = True
                                self._inflight.add(gc)
                        if host:
                            ticket = self._next_ticket
                            self._next_ticket = ticket + 1
                            self._active.add(ticket)
            if new:
                ok = False
                try:
                    pwritev_full(self.fd, [view], host)
                    ok = True
                except OSError as exc:
                    raise from_oserror(exc, self.path) from None
                finally:
                    with self._lock:
                        if ok:
                            table = self.cache.get(l2_off, L2)
                            table[gc & self._l2_mask] = host | _OFLAG_COPIED
                            self.cache.mark_dirty(l2_off, table)
                            self._unsynced = True
                        else:
                            self._free_later([host >> cb])
                        self._inflight.discard(gc)
                        self._active.discard(ticket)
                        if self._waiters:
                            self._cond.notify_all()
                if fua:
                    self.flush()
                return n
            if host:
                try:
                    pwritev_full(self.fd, [view], host + (offset & cmask))
                except OSError as exc:
                    raise from_oserror(exc, self.path) from None
                finally:
                    self._active.discard(ticket)  # atomic under the GIL (see readinto)
                if fua:
                    self.flush()
                return n
        if (
            n > cmask + 1
            and not (offset | n) & cmask
            and self._fast_paths
            and self._write_ready
            and self.data_fd == self.fd
            and self._write_new_run(view, offset)
        ):
            if fua:
                self.flush()
            return n
        if n:
            try:
                self._write(view, offset)
            except OSError as exc:
                raise from_oserror(exc, self.path) from None
        if fua:
            self.flush()
        return n

    def _write_new_run(self, view: memoryview, offset: int) -> bool:
        """Whole clusters, all unallocated in one cached L2 table, written to as many new
        clusters at the file end: one allocation, one write, one L2 update (as qemu-img
        convert lays its target out: data in guest order). False, with nothing done, when
        that does not apply; the general path then takes the write."""
        cb = self.cluster_bits
        gc0 = offset >> cb
        count = len(view) >> cb
        guest = range(gc0, gc0 + count)
        with self._lock:
            if self._readonly or self._pending:
                return False
            if (gc0 + count - 1) >> self.map.l2_bits != gc0 >> self.map.l2_bits:
                return False  # crosses an L2 table
            l1e = self.map.l1[offset >> self._span_bits]
            l2_off = l1e & _L1E_OFFSET_MASK
            slot = self._slots.get(l2_off) if l2_off and l1e & _OFLAG_COPIED else None
            if slot is None:
                return False
            i0 = gc0 & self._l2_mask
            if any(slot.table[i0 : i0 + count]):
                return False  # something is mapped: copy-on-write or in place, not here
            if self._inflight and not self._inflight.isdisjoint(guest):
                return False
            first = self.refcounts.allocate_end_fast(count)
            if first is None:
                return False
            self._slots.move_to_end(l2_off)
            self._inflight.update(guest)
            ticket = self._take_ticket()
        host = first << cb
        ok = False
        try:
            pwritev_full(self.fd, [view], host)
            ok = True
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        finally:
            with self._lock:
                if ok:
                    table = self.cache.get(l2_off, L2)  # reloaded if evicted meanwhile
                    start = host | _OFLAG_COPIED
                    table[i0 : i0 + count] = array(
                        "Q", range(start, start + (count << cb), 1 << cb)
                    )
                    self.cache.mark_dirty(l2_off, table)
                    self._unsynced = True
                else:
                    self._free_later(list(range(first, first + count)))
                self._inflight.difference_update(guest)
                self._active.discard(ticket)
                if self._waiters:
                    self._cond.notify_all()
        return True

    def write_compressed(self, buf: Buffer, offset: int) -> int:
        """Write whole clusters compressed, as ``qemu-io -c 'write -c'``: ``offset`` cluster
        aligned, the length whole clusters or up to the image end. A cluster that does not
        shrink is stored as a normal cluster. Clusters are compressed on the codec pool."""
        n = len(memoryview(buf).cast("B"))
        self.write_prepared(prepare(self, buf, offset))
        return n

    def prepare_compressed(self, buf: Buffer, offset: int) -> list[PreparedCluster]:
        """The compression half of :meth:`write_compressed`, in the calling thread and
        without any lock (convert's workers call it); write the result with
        :meth:`write_prepared` while ``buf`` is still valid."""
        return prepare(self, buf, offset, parallel=False)

    def write_prepared(self, clusters: list[PreparedCluster]) -> None:
        """The writing half of :meth:`write_compressed`."""
        if self._closed or self._readonly:
            self.check_request(0, 0, write=True)
        if self._quiescing:
            self._admit()
        if self._tracked:
            for cluster in clusters:
                self._bitmaps.mark(cluster.guest_offset, len(cluster.data))
        try:
            self._compressed.write(clusters)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None

    def _write(self, view: memoryview, offset: int) -> None:
        """The general write: plan, copy-on-write, host runs, commit."""
        if self._encrypted:
            view, offset = self._sector_aligned(view, offset)
        end = offset + len(view)
        frees: list[int] = []
        with self._lock:
            plan = self._plan_locked(
                offset >> self.cluster_bits, (end - 1) >> self.cluster_bits, (offset, end)
            )
            ticket = self._take_ticket()
        ok = False
        try:
            head, tail = self._copy_on_write(plan, offset, end)
            for host, iov in self._host_runs(plan, view, offset, head, tail):
                if self._encrypted:
                    iov = self._encrypt_run(plan, host, iov)
                pwritev_full(self.data_fd, iov, host)
            ok = True
        finally:
            with self._lock:
                self._commit_locked(plan, ticket, ok, frees)

    def _sector_aligned(self, view: memoryview, offset: int) -> tuple[memoryview, int]:
        """Encrypted images are written in whole 512-byte sectors: widen the request with
        the plaintext of its partial first and last sector."""
        end = offset + len(view)
        start, stop = offset & ~511, (end + 511) & ~511
        if start == offset and stop == end:
            return view, offset
        if self._crypto is None:
            raise self._locked_error()
        whole = bytearray(stop - start)
        if start < offset:
            self._read(memoryview(whole)[:512], start)
        if stop > end and not (start < offset and stop - 512 == start):
            self._read(memoryview(whole)[-512:], stop - 512)
        whole[offset - start : end - start] = view
        return memoryview(whole), start

    def _encrypt_run(self, plan: WritePlan, host: int, iov: list[Any]) -> list[Any]:
        """One host run's ciphertext (IVs from the host offset, or for legacy AES the guest)."""
        crypto = self._crypto
        if crypto is None:
            raise self._locked_error()
        guest = 0
        if not crypto.by_host_offset:
            cs = self.cluster_size
            for item in plan.clusters:
                if item.host_offset <= host < item.host_offset + cs:
                    guest = (item.guest_cluster << self.cluster_bits) + host - item.host_offset
                    break
        data = iov[0] if len(iov) == 1 else b"".join(iov)
        return [crypto.encrypt(data, host, guest)]

    def _locked_error(self) -> VdiskError:
        from .luks import UnlockError

        return UnlockError("image is encrypted: a passphrase is needed", path=self.path)

    def _plan_locked(self, gc0: int, gc1: int, span: tuple[int, int] | None = None) -> WritePlan:
        """Under the lock: plan guest clusters gc0..gc1, check the plan against the metadata,
        then make the L2 tables ours, allocate NEW clusters and mark them in flight.
        ``span`` (guest start, end) narrows an extended-L2 plan to the written subclusters."""
        if self._readonly:
            raise ReadOnlyError("image is read-only", path=self.path)
        if not self._write_ready:
            self._prepare_first_write()
        if self._inflight:
            self._wait_inflight(gc0, gc1)
        plan = self.map.plan_write(gc0, gc1)
        if self._extended and span is not None:
            self.map.plan_subclusters(plan, *span)
        problem = self.map.plan_conflict(plan)
        if problem:
            raise self._mark_corrupt(problem)
        frees: list[int] = []
        self.map.prepare_write(plan, frees)
        if frees:
            self._free_later(frees)
        if plan.new_count:
            self._allocate_new(plan)
        inflight = self._inflight
        for item in plan.clusters:
            if item.mode != IN_PLACE:
                inflight.add(item.guest_cluster)
        return plan

    def _allocate_new(self, plan: WritePlan) -> None:
        """Host clusters for the NEW clusters of ``plan``; none may be metadata."""
        rc = self.refcounts
        exhausted = not rc.free_heap and rc.scan_cursor >= rc.end_cluster
        if self._pending and exhausted and self._releasable():
            # Reuse freed clusters rather than grow the file: make them free now.
            self._flush_locked()
        hosts = rc.allocate(plan.new_count)
        clash = [c for c in hosts if c in self.metadata]
        if clash:
            self._free_later(hosts)
            raise self._mark_corrupt(f"allocator returned metadata cluster {clash[0]}")
        new_hosts = iter(hosts)
        cb = self.cluster_bits
        for item in plan.clusters:
            if item.mode == NEW:
                item.host_offset = next(new_hosts) << cb

    def _copy_on_write(
        self, plan: WritePlan, offset: int, end: int
    ) -> tuple[bytearray | None, bytearray | None]:
        """The guest data around the request in its first and last cluster, where those
        clusters move to a new host cluster (None where nothing needs copying)."""
        cs = self.cluster_size
        head = tail = None
        first, last = plan.clusters[0], plan.clusters[-1]
        if first.write_to is not None:  # extended L2: the planned subclusters
            head_from = (first.guest_cluster << self.cluster_bits) + first.write_from
        else:
            head_from = offset if first.mode == IN_PLACE else offset & ~(cs - 1)
        if head_from < offset:
            head = bytearray(offset - head_from)
            self._read(memoryview(head), head_from)
        cluster_end = (last.guest_cluster + 1) << self.cluster_bits
        if last.write_to is not None:
            tail_to = cluster_end - cs + last.write_to
        else:
            tail_to = end if last.mode == IN_PLACE else cluster_end
        if tail_to > end:
            tail = bytearray(tail_to - end)
            avail = min(tail_to, self._size) - end
            if avail > 0:
                self._read(memoryview(tail)[:avail], end)
        return head, tail

    def _host_runs(
        self,
        plan: WritePlan,
        view: memoryview,
        offset: int,
        head: bytearray | None,
        tail: bytearray | None,
    ) -> list[tuple[int, list[Any]]]:
        """(host offset, iovec) per contiguous host run; adjacent request ranges merge so a
        run is as few iovec entries as possible."""
        cb = self.cluster_bits
        cs = self.cluster_size
        end = offset + len(view)
        gc0, gc1 = plan.clusters[0].guest_cluster, plan.clusters[-1].guest_cluster
        # Pieces: (start, end) of the request buffer, or a copy-on-write buffer.
        runs: list[tuple[int, list[Any]]] = []
        run_end = -1
        for item in plan.clusters:
            gc = item.guest_cluster
            gstart = max(offset, gc << cb)
            gend = min(end, (gc + 1) << cb)
            piece = (gstart - offset, gend - offset)
            if item.write_to is not None:  # extended L2: the planned subclusters
                hstart = item.host_offset + item.write_from
                length = item.write_to - item.write_from
                pre = head if gc == gc0 else None
                post = tail if gc == gc1 else None
            elif item.mode == IN_PLACE:
                hstart = item.host_offset + (gstart & (cs - 1))
                length = gend - gstart
                pre = post = None
            else:
                hstart = item.host_offset
                length = cs
                pre = head if gc == gc0 else None
                post = tail if gc == gc1 else None
            if hstart != run_end:
                runs.append((hstart, []))
            pieces = runs[-1][1]
            if pre is not None:
                pieces.append(pre)
            if pieces and isinstance(pieces[-1], tuple) and pieces[-1][1] == piece[0]:
                pieces[-1] = (pieces[-1][0], piece[1])
            else:
                pieces.append(piece)
            if post is not None:
                pieces.append(post)
            run_end = hstart + length
        return [
            (host, [view[p[0] : p[1]] if isinstance(p, tuple) else p for p in pieces])
            for host, pieces in runs
        ]

    def _commit_locked(self, plan: WritePlan, ticket: int, ok: bool, frees: list[int]) -> None:
        """Under the lock, after the data writes: store the L2 entries (or, on failure, give
        the NEW clusters back) and clear this write's in-flight marks."""
        self._active.discard(ticket)
        try:
            if ok:
                self._unsynced = True
                for item in plan.clusters:
                    if item.mode != IN_PLACE:
                        self.map.commit_write(item, frees)
            else:
                frees.extend(
                    item.host_offset >> self.cluster_bits
                    for item in plan.clusters
                    if item.mode == NEW
                )
        finally:
            self._free_later(frees)
            for item in plan.clusters:
                # Only our own marks: an in-place cluster may have been deallocated and
                # be in flight for another writer's allocation by now.
                if item.mode != IN_PLACE:
                    self._inflight.discard(item.guest_cluster)
            if self._waiters:
                self._cond.notify_all()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if self._quiescing:
            self._admit()
        if self._tracked:
            self._bitmaps.mark(offset, length)
        try:
            if self.data_raw and length:  # as QEMU: the raw data file first
                write_zeroes_fd(self.data_fd, offset, length, may_unmap)
            self._zero_or_discard(offset, length, may_unmap, discard=False)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        if self._quiescing:
            self._admit()
        if self._tracked:
            self._bitmaps.mark(offset, length)
        try:
            if self.data_raw:  # the discarded clusters read as zeros: so must the raw file
                self._zero_raw_data_file(offset, length)
            self._zero_or_discard(offset, length, True, discard=True)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None

    def _zero_raw_data_file(self, offset: int, length: int) -> None:
        """Punch the part of [offset, offset+length) that discard deallocates (whole
        clusters, or subclusters; the image end counts as their end) in the raw data file."""
        g = self.granularity
        end = offset + length
        start = (offset + g - 1) & ~(g - 1)
        stop = end if end >= self._size else end & ~(g - 1)
        if start < stop:
            write_zeroes_fd(self.data_fd, start, stop - start, True)

    def _zero_or_discard(
        self, offset: int, length: int, may_unmap: bool, discard: bool, by_subcluster: bool = True
    ) -> None:
        if not length:
            return
        if self._extended and by_subcluster:
            self._zero_or_discard_subclusters(offset, length, may_unmap, discard)
            return
        cb = self.cluster_bits
        cs = self.cluster_size
        end = offset + length
        # Whole clusters only; the image end counts as a cluster end.
        a = (offset + cs - 1) & ~(cs - 1)
        b = end & ~(cs - 1) if end < self._size else ((end + cs - 1) & ~(cs - 1))
        if a >= b:
            if not discard:
                self._write_zero_data(offset, length)
            return
        if not discard:
            if offset < a:
                self._write_zero_data(offset, a - offset)
            if min(b, self._size) < end:
                self._write_zero_data(b, end - b)
        gc0, gc1 = a >> cb, (b >> cb) - 1
        v3 = self.header.version >= 3
        has_backing = self.header.backing_file is not None
        data_zero: list[int] = []
        with self._lock:
            if not self._write_ready:
                self._prepare_first_write()
            if self._readonly:
                raise ReadOnlyError("image is read-only", path=self.path)
            self._wait_inflight(gc0, gc1)
            m = self.map
            problem = m.range_conflict(gc0, gc1)
            if problem:
                raise self._mark_corrupt(problem)
            frees: list[int] = []
            for gc in range(gc0, gc1 + 1):
                if discard:
                    e, _bm = m.entry(gc)
                    allocated = m.allocated(e)
                    if v3 and (has_backing or allocated):
                        m.deallocate_cluster(gc, zero=True, frees=frees)
                    elif not v3:
                        m.deallocate_cluster(gc, zero=False, frees=frees)
                elif v3:
                    m.zero_cluster(gc, may_unmap, frees)
                else:
                    e, _bm = m.entry(gc)
                    allocated = m.allocated(e)
                    if has_backing or (allocated and not may_unmap):
                        data_zero.append(gc)
                    elif allocated:
                        m.deallocate_cluster(gc, zero=False, frees=frees)
            self._free_later(frees)
        # v2 has no zero flag: where deallocating is not allowed or would expose the
        # backing file, write zeros.
        for gc in data_zero:
            start = gc << cb
            self._write_zero_data(start, min(cs, self._size - start))

    def _zero_or_discard_subclusters(
        self, offset: int, length: int, may_unmap: bool, discard: bool
    ) -> None:
        """Extended L2, as QEMU: whole clusters through the zero flag path; whole subclusters
        of a partial cluster through their bitmap bits; a part of a subcluster is ignored by
        discard and written as zero data by write_zeroes (unless the rest of the subcluster
        already reads as zeros, then the subcluster is zeroed whole)."""
        scs = self.granularity
        cs = self.cluster_size
        end = offset + length
        a = (offset + scs - 1) & ~(scs - 1)
        b = end if end >= self._size else end & ~(scs - 1)
        if a > b:  # inside one subcluster
            if not discard:
                self._zero_part_of_subcluster(offset, end)
            return
        if not discard and offset < a:
            self._zero_part_of_subcluster(offset, a)
        ca = (a + cs - 1) & ~(cs - 1)
        cb = b if b >= self._size else b & ~(cs - 1)
        self._subcluster_bits_range(a, min(ca, b), discard)
        if ca < cb:
            self._zero_or_discard(ca, cb - ca, may_unmap, discard, by_subcluster=False)
        self._subcluster_bits_range(max(ca, cb), b, discard)
        if not discard and b < end:
            self._zero_part_of_subcluster(b, end)

    def _subcluster_bits_range(
        self, start: int, end: int, discard: bool, if_unallocated: bool = False
    ) -> bool:
        """Zero or discard the whole subclusters of [start, end), which lies in one cluster
        (the image end counts as a subcluster end). ``if_unallocated``: only if the (one)
        subcluster holds no data, judged under the lock; returns whether it was done."""
        if start >= end:
            return True
        cb, sb = self.cluster_bits, self.cluster_bits - 5
        gc = start >> cb
        cmask = self.cluster_size - 1
        first, last = (start & cmask) >> sb, ((end - 1) & cmask) >> sb
        with self._lock:
            if not self._write_ready:
                self._prepare_first_write()
            if self._readonly:
                raise ReadOnlyError("image is read-only", path=self.path)
            self._wait_inflight(gc, gc)
            problem = self.map.range_conflict(gc, gc)
            if problem:
                raise self._mark_corrupt(problem)
            e, bm = self.map.entry(gc)
            if if_unallocated and (e & fmt.OFLAG_COMPRESSED or bm >> first & 1):
                return False
            frees: list[int] = []
            has_backing = self.header.backing_file is not None
            if discard:
                self.map.discard_subclusters(gc, first, last, has_backing, frees)
                zeroed = True
            else:
                zeroed = self.map.zero_subclusters(gc, first, last, frees)
            self._free_later(frees)
        if not zeroed:  # a compressed cluster: as QEMU, write the zeros as data
            self._write_zero_data(start, end - start)
        return True

    def _zero_part_of_subcluster(self, start: int, end: int) -> None:
        """write_zeroes of [start, end) inside one subcluster: the bitmap can take it only when
        the subcluster is not allocated and the rest of it reads as zeros already."""
        scs = self.granularity
        s0 = start & ~(scs - 1)
        s1 = min(s0 + scs, self._size)
        rest = [(s0, start - s0), (end, s1 - end)]
        reads_zero = all(n == 0 or all(x.zero for x in self._status(o, n)) for o, n in rest)
        if reads_zero and self._subcluster_bits_range(s0, s1, discard=False, if_unallocated=True):
            return
        self._write_zero_data(start, end - start)

    def _write_zero_data(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(_ZEROS))
            self._write(memoryview(_ZEROS)[:n], offset)
            offset += n
            length -= n

    # -- block status -------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.check_request(offset, length)
        return merge_extents(self._status(offset, length))

    def _status(self, offset: int, length: int) -> list[Extent]:
        segs: list[Segment] = []
        with self._lock:
            self.map.map_range(offset, length, segs, status=True)
        out: list[Extent] = []
        hide = self._encrypted  # as QEMU: an encrypted cluster's host bytes are no guest data
        for kind, g, n, arg in segs:
            if kind == SEG_DATA:
                out.append(Extent(g, n, data=True, zero=False, host_offset=None if hide else arg))
            elif kind == SEG_ZERO:
                out.append(
                    Extent(g, n, data=False, zero=True, host_offset=None if hide else arg or None)
                )
            elif kind == SEG_COMPRESSED:
                out.append(Extent(g, n, data=True, zero=False, compressed=True))
            else:
                out.extend(self._backing_status(g, n))
        return out

    def _backing_status(self, g: int, n: int) -> list[Extent]:
        parent = self.backing
        out: list[Extent] = []
        if parent is not None and g < parent.size:
            avail = min(n, parent.size - g)
            for e in parent.block_status(g, avail):
                out.append(
                    Extent(
                        e.offset,
                        e.length,
                        e.data,
                        e.zero,
                        e.present,
                        e.depth + 1,
                        e.host_offset,
                        e.compressed,
                    )
                )
            g += avail
            n -= avail
        if n:
            out.append(Extent(g, n, data=False, zero=True, present=False, depth=self._chain_depth))
        return out

    # -- information --------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        """Whether the data clusters are encrypted (LUKS or legacy AES)."""
        return self._encrypted

    @property
    def snapshots(self) -> list[fmt.SnapshotEntry]:
        """The internal snapshot table (read from disk)."""
        with self._lock:
            return read_snapshots(self.fd, self.header)

    # -- internal snapshots (vdisk.qcow2.snapshot) ----------------------------------------
    def create_snapshot(self, name: str, **fields: int) -> fmt.SnapshotEntry:
        """Snapshot the active state as ``name``; returns the new table entry."""
        from .snapshot import create_snapshot

        return create_snapshot(self, name, **fields)

    def apply_snapshot(self, name_or_id: str) -> fmt.SnapshotEntry:
        """Revert the active state (and size) to a snapshot, found by ID first, then name.
        Every tracked bitmap is marked dirty over the whole disk: the revert changes data
        no write reported, and an incremental backup must copy it."""
        from .snapshot import apply_snapshot, find_snapshot

        if self._tracked:
            snapshots = self.snapshots
            target = snapshots[find_snapshot(snapshots, name_or_id)]
            if target.disk_size not in (None, self._size):
                raise UnsupportedFeatureError(
                    "cannot revert to a snapshot of another disk size while persistent "
                    "bitmaps are tracked; remove the bitmaps first",
                    path=self.path,
                )
        entry = apply_snapshot(self, name_or_id)
        if self._tracked:
            self._bitmaps.mark(0, self._size)
        return entry

    def delete_snapshot(
        self, name_or_id: str, by_id: bool = True, by_name: bool = True
    ) -> fmt.SnapshotEntry:
        """Delete a snapshot, found by ID first, then name (``by_id``/``by_name`` narrow it)."""
        from .snapshot import delete_snapshot

        return delete_snapshot(self, name_or_id, by_id, by_name)

    # -- persistent dirty bitmaps (logic in bitmap.py) -------------------------------------
    def bitmaps(self) -> list[PersistentBitmap]:
        """The persistent dirty bitmaps, in directory order (bits read on demand)."""
        with self._lock:
            return self._bitmaps.all()

    def bitmap(self, name: str) -> PersistentBitmap:
        """The named bitmap, its bits read; refused when it is inconsistent (in use)."""
        with self._lock:
            return self._bitmaps.find(name)

    def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        self._change_bitmaps(lambda b, frees: b.add(name, granularity, enabled))

    def remove_bitmap(self, name: str) -> None:
        self._change_bitmaps(lambda b, frees: b.remove(name, frees))

    def enable_bitmap(self, name: str, enabled: bool = True) -> None:
        self._change_bitmaps(lambda b, frees: b.set_enabled(name, enabled))

    def clear_bitmap(self, name: str) -> None:
        self._change_bitmaps(lambda b, frees: b.clear(name))

    def merge_bitmap(
        self,
        name: str,
        source: str,
        source_image: Qcow2Image | None = None,
        source_bitmap: PersistentBitmap | None = None,
    ) -> None:
        """OR bitmap ``source`` (of this image, or of ``source_image``), or ``source_bitmap``,
        into ``name``."""
        src = source_image.bitmap(source) if source_image is not None else source_bitmap
        self._change_bitmaps(lambda b, frees: b.merge(name, src or b.find(source)))

    def store_bitmaps(self) -> None:
        """Store the tracked bitmaps consistent now, as close does (flush keeps them IN_USE,
        as QEMU does); the next write marks them in use again."""
        with self._lock:
            if self._readonly:
                raise ReadOnlyError("image is read-only", path=self.path)
            try:
                self._bitmaps.store(final=True)
            except OSError as exc:
                raise from_oserror(exc, self.path) from None
            self._write_ready = False  # the next write goes through begin_write again
            self._forget_extents()

    def _change_bitmaps(self, change: Any) -> None:
        """Run ``change(bitmap_set, frees)`` and store the result durably."""
        with self._lock:
            if self._readonly:
                raise ReadOnlyError("image is read-only", path=self.path)
            if not self._write_ready:
                self._prepare_first_write()
            frees: list[int] = []
            self._forget_extents()  # a bitmap to mark ends writes that skip the image
            try:
                change(self._bitmaps, frees)
                self._bitmaps.store(final=False)
            except OSError as exc:
                raise from_oserror(exc, self.path) from None
            finally:
                self._free_later(frees)

    # -- host extents (see extents.py) ----------------------------------------------------
    def host_extents(self) -> HostExtents | None:
        """The guest-cluster -> host-offset table through which an exporter may read and
        overwrite data clusters in the image file itself, or None where this image has no
        such clusters to offer (encrypted, extended L2, an external data file, a read-only
        snapshot view). One table per image, shared by its users."""
        with self._lock:
            if not self._fast_paths or self.data_fd != self.fd or self.snapshot is not None:
                return None
            if self._extents is None:
                self._extents = HostExtents(self)
                self.map.extents = self._extents
            return self._extents

    def _learn_extents(self, ext: HostExtents, gc0: int, gc1: int) -> bool:
        """Under the lock: fill the entries of guest clusters gc0..gc1 (in one L2 table)
        if that table is cached; returns whether it was."""
        table = ext.table
        inflight = self._inflight
        l2_off = self.map.l1[gc0 >> self.map.l2_bits] & _L1E_OFFSET_MASK
        slot = self._slots.get(l2_off) if l2_off else None
        if slot is None:
            return False
        entries = slot.table
        mask = self._l2_mask
        for gc in range(gc0, gc1 + 1):
            if not (inflight and gc in inflight):
                table[gc] = entry_flags(self, entries[gc & mask])
        return True

    def _forget_extents(self) -> None:
        """Under the lock: the rules changed for every cluster; the table starts over."""
        if self._extents is not None:
            self._extents.forget_all()

    def allocated_clusters(self) -> int:
        with self._lock:
            return self.refcounts.end_cluster

    def __repr__(self) -> str:
        return f"<Qcow2Image {self.path!r} v{self.header.version} size={self._size}>"

    def specific_info(self) -> dict[str, Any]:
        """What ``qemu-img info`` prints under "Format specific information" (QAPI keys)."""
        from .queries import specific_info

        with self._lock:
            return specific_info(self)

    def metadata_preallocated(self) -> bool:
        """True if QEMU would take this image for metadata-preallocated (qcow2-refcount.c)."""
        from .queries import metadata_preallocated

        with self._lock:
            return metadata_preallocated(self)

    def reserved_host_runs(self, offset: int, length: int) -> list[tuple[int, int, int | None]]:
        """(guest offset, length, host offset or None) of an unallocated range: extended L2
        entries keep their host cluster's offset for unallocated subclusters."""
        from .queries import reserved_host_runs

        with self._lock:
            return reserved_host_runs(self, offset, length)


def _fill_zero(view: memoryview, start: int, length: int) -> None:
    while length > 0:
        k = min(length, len(_ZEROS))
        view[start : start + k] = _ZEROS[:k]
        start += k
        length -= k


def _size_opt(value: int | str | None) -> int | None:
    if value is None:
        return None
    from ..sizes import parse_size

    return parse_size(value)
