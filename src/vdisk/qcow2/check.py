"""Consistency check and repair of a QCOW2 image, with qemu-img check's accounting.

The expected refcount of every host cluster comes from the one reference walk
(``references.ReferenceWalk``: header, active and snapshot L1/L2 tables, data and compressed
clusters, snapshot table, bitmaps, refcount structures). Here it is compared with the stored
refcounts:

* stored > expected: a leak (wasted space, harmless);
* stored < expected: a corruption (a cluster in use may be handed out again);
* stored == 0 while referenced: the refcount structure itself needs rebuilding;
* COPIED flags that disagree with refcount == 1, misaligned or reserved-bit entries: corruptions.

Repairs (``fix``): FIX_LEAKS lowers leaked refcounts; FIX_ERRORS also raises refcounts that are
too low, rebuilds the refcount structure when needed (the one rebuild,
``refcount.rebuild_refcount_structure``) and fixes COPIED flags (only here). The numbers follow
QEMU's ``qcow2_check_refcounts`` so that ``vdisk check`` and ``qemu-img check`` agree. Opening a
dirty lazy-refcounts image read-write runs the same check with every repair on
(:func:`repair_open_file`).

The checker works on the file directly (not through Qcow2Image) so that it sees a dirty or
corrupt-marked image as it is: opening one through the library would repair it first.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .. import locking
from ..errors import (
    CorruptImageError,
    NoSpaceError,
    RequestError,
    UnsupportedFeatureError,
    VdiskError,
    from_oserror,
)
from ..fileio import pread_full, pwrite_full
from . import datafile
from . import format as fmt
from .cluster import read_snapshots
from .refcount import rebuild_refcount_structure
from .references import CheckFailed, Findings, ReferenceWalk, StoredRefcounts, table_ok

FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclass
class CheckResult:
    """What one check pass found, in qemu-img check's terms (its JSON keys, with underscores)."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)  # what qemu prints on stderr

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


def _validate_for_check(h: fmt.Header, path: str) -> None:
    """The table checks QEMU makes when it opens an image for ``qemu-img check``."""
    cs = h.cluster_size
    if h.l1_size < fmt.l1_entries_for(h.size, h.cluster_bits, h.l2_bits):
        raise CorruptImageError("L1 table is too small", path=path)
    if not table_ok(h.l1_table_offset, h.l1_size, 8, cs):
        raise CorruptImageError("Active L1 table offset invalid", path=path)
    if not table_ok(h.refcount_table_offset, h.refcount_table_clusters, cs, cs):
        raise CorruptImageError("Reference count table offset invalid", path=path)
    bitmaps = h.bitmaps if h.autoclear_features & fmt.AUTOCLEAR_BITMAPS else None
    if bitmaps is not None and bitmaps.directory_offset % cs:
        raise CorruptImageError("bitmaps_ext: invalid bitmap directory offset", path=path)


class _Checker:
    def __init__(self, fd: int, path: str, fix: int) -> None:
        self.fd = fd
        self.path = path
        self.fix = fix
        file_size = os.fstat(fd).st_size
        head = bytearray(min(file_size, 1 << 21))
        pread_full(fd, head, 0)
        h = fmt.Header.decode(head)
        try:
            h.validate(file_size)
        except CorruptImageError:
            # Table placement errors: QEMU opens such an image for checking as long as its
            # tables are aligned and addressable, and the check reports what they cause.
            _validate_for_check(h, path)
        unknown = h.incompatible_features & ~fmt.INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedFeatureError(
                f"unsupported incompatible feature bits {unknown:#x}", path=path
            )
        self.h = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.file_size = file_size
        self.file_clusters = (file_size + self.cs - 1) >> self.cb
        self.res = CheckResult(path)
        self.res.total_clusters = (h.size + self.cs - 1) >> self.cb
        self.found = Findings()  # of the walk under way
        self.rebuild = False

    # -- the reference walk -----------------------------------------------------------------
    def calculate(self) -> np.ndarray:
        """Expected refcount of every host cluster (what the walk reports goes to ``res``)."""
        walk = ReferenceWalk(
            self.fd,
            self.h,
            self.file_size,
            self.path,
            fix_errors=bool(self.fix & FIX_ERRORS),
            repair_prealloc=self._zero_l2_entry,
        )
        self.found = walk.found
        try:
            counts = walk.expected_refcounts()
        finally:
            self._take_findings(walk.found)
        self.file_size = walk.file_size
        self.file_clusters = walk.file_clusters
        return counts

    def _take_findings(self, found: Findings) -> None:
        res = self.res
        res.messages.extend(found.messages)
        res.corruptions += found.corruptions
        res.check_errors += found.check_errors
        res.corruptions_fixed += found.corruptions_fixed
        res.allocated_clusters += found.allocated_clusters
        res.fragmented_clusters += found.fragmented_clusters
        res.compressed_clusters += found.compressed_clusters
        self.rebuild |= found.rebuild

    def _say(self, text: str) -> None:
        self.res.messages.append(text)

    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        pread_full(self.fd, buf, offset)
        return buf

    def _zero_l2_entry(self, l2_off: int, index: int, raw: np.ndarray, active: bool) -> bool:
        """Turn a misaligned preallocated zero cluster into a plain zero cluster (QEMU's fix)."""
        ext = self.h.extended_l2
        size = 16 if ext else 8
        offset = l2_off + index * size
        if self._overlaps_metadata(offset, size, active):
            # As QEMU: refuse the write and mark the image corrupt.
            self.found.messages.append(
                "qcow2: Marking image as corrupt: Preventing invalid write on metadata; "
                "further corruption events will be suppressed"
            )
            if self.h.version >= 3:
                self.h.incompatible_features |= fmt.INCOMPAT_CORRUPT
                pwrite_full(
                    self.fd,
                    struct.pack(">Q", self.h.incompatible_features),
                    fmt.HDR_INCOMPATIBLE_FEATURES,
                )
                os.fdatasync(self.fd)
            self.found.messages.append("ERROR: Overlap check failed")
            self.found.check_errors += 1
            raise CheckFailed("Input/output error", path=self.path, errno=_errno.EIO)
        if ext:
            bitmap = int(raw[2 * index + 1])
            bitmap = ((bitmap | bitmap << 32) & 0xFFFFFFFF00000000) & ((1 << 64) - 1)
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", fmt.OFLAG_ZERO)
        pwrite_full(self.fd, data, offset)
        os.fdatasync(self.fd)
        return True

    def _overlaps_metadata(self, offset: int, size: int, active: bool) -> bool:
        """QEMU's default ("cached") overlap check before it rewrites an L2 entry."""
        h, cs, cb = self.h, self.cs, self.cb
        ranges = [
            (0, cs),
            (h.l1_table_offset, h.l1_size * 8),
            (h.refcount_table_offset, h.refcount_table_clusters * cs),
        ]
        reftable = StoredRefcounts(self.fd, h).table & np.uint64(fmt.REFT_OFFSET_MASK)
        ranges += [(int(o), cs) for o in reftable[reftable != 0].tolist()]
        if h.nb_snapshots:
            for snap in read_snapshots(self.fd, h):
                ranges.append((snap.l1_table_offset, snap.l1_size * 8))
            ranges.append((h.snapshots_offset, h.nb_snapshots * fmt.SNAPSHOT_HEADER_SIZE))
        bitmaps = h.bitmaps if h.autoclear_features & fmt.AUTOCLEAR_BITMAPS else None
        if bitmaps is not None:
            ranges.append((bitmaps.directory_offset, bitmaps.directory_size))
        if not active:
            l1 = fmt.decode_table(self._read(h.l1_table_offset, h.l1_size * 8))
            l2s = l1 & np.uint64(fmt.L1E_OFFSET_MASK)
            ranges += [(int(o), cs) for o in l2s[l2s != 0].tolist()]
        first, last = offset >> cb, (offset + size - 1) >> cb
        for start, length in ranges:
            if length > 0 and start >> cb <= last and (start + length - 1) >> cb >= first:
                return True
        return False

    # -- comparing with the stored refcounts -------------------------------------------------
    def compare(self, counts: np.ndarray, fix: int, stored: StoredRefcounts) -> int:
        """Compare every cluster; fix what ``fix`` allows. Returns the highest used cluster."""
        res = self.res
        have, bad = stored.range_values(counts.size)
        for c in np.flatnonzero(bad).tolist():
            self._say(f"Can't get refcount for cluster {c}: Input/output error")
        res.check_errors += int(bad.sum())
        ok = ~bad
        used = ok & ((have > 0) | (counts > 0))
        highest = counts.size - 1 - int(np.argmax(used[::-1])) if used.any() else 0
        diff = np.flatnonzero(ok & (have != counts))
        fixes: list[int] = []
        for c in diff.tolist():
            r1, r2 = int(have[c]), int(counts[c])
            fixed = False
            if r1 == 0:
                self.rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                res.leaks_fixed += 1
                fixed = True
            elif r1 < r2 and fix & FIX_ERRORS:
                res.corruptions_fixed += 1
                fixed = True
            tag = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
            self._say(f"{tag} cluster {c} refcount={r1} reference={r2}")
            if fixed:
                fixes.append(c)
            elif r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        if fixes:
            idx = np.array(fixes, dtype=np.uint64)
            stored.set(idx, counts[idx.astype(np.int64)])
            self._zero_freed([c for c in fixes if not counts[c]])
        return highest

    def _zero_freed(self, clusters: list[int]) -> None:
        """Leaked clusters just freed: drop their data (punched, else zeroed), as QEMU
        discards what a repair frees. Nothing references them, so the order is free."""
        from ..backends.raw import write_zeroes_fd

        for c in clusters:
            start = c << self.cb
            if start < self.file_size:
                write_zeroes_fd(self.fd, start, min(self.cs, self.file_size - start), True)

    # -- rebuilding the refcount structure ---------------------------------------------------
    def rebuild_refcounts(self, counts: np.ndarray) -> None:
        """Write a new refcount structure holding ``counts`` (the one rebuild, first fit).

        The old structure stays counted here; the caller's second pass finds it leaked and
        frees it.
        """
        try:
            rebuild_refcount_structure(self.fd, self.h, counts, self.path)
        except NoSpaceError as exc:
            raise CheckFailed(exc.message, path=self.path, errno=exc.errno) from None
        self.file_size = os.fstat(self.fd).st_size
        self.file_clusters = (self.file_size + self.cs - 1) >> self.cb

    # -- COPIED flags -------------------------------------------------------------------------
    def check_copied(self, stored: StoredRefcounts) -> None:
        res, h = self.res, self.h
        if self.fix & FIX_ERRORS:
            repair = True
        elif self.fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        tag = "Repairing" if repair else "ERROR"
        l1 = fmt.decode_table(self._read(h.l1_table_offset, h.l1_size * 8))
        for i in np.flatnonzero(l1).tolist():
            l1e = int(l1[i])
            l2_off = l1e & fmt.L1E_OFFSET_MASK
            if not l2_off:
                continue
            rc, bad = stored.values(np.array([l2_off >> self.cb], dtype=np.uint64))
            if not bad[0] and (int(rc[0]) == 1) != bool(l1e & fmt.OFLAG_COPIED):
                refcount = int(rc[0])
                res.corruptions += 1
                self._say(
                    f"{tag} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    new = l1e | fmt.OFLAG_COPIED if refcount == 1 else l1e & ~fmt.OFLAG_COPIED
                    pwrite_full(self.fd, struct.pack(">Q", new), h.l1_table_offset + 8 * i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = fmt.decode_table(self._read(l2_off, self.cs))
            step = 2 if h.extended_l2 else 1
            ent = raw[0::step]
            host = ent & np.uint64(fmt.L2E_OFFSET_MASK)
            sel = np.flatnonzero(((ent & np.uint64(fmt.OFLAG_COMPRESSED)) == 0) & (host != 0))
            if not sel.size:
                continue
            if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:  # data clusters count as 1
                rcs, bad = np.ones(sel.size, dtype=np.uint64), np.zeros(sel.size, dtype=bool)
            else:
                rcs, bad = stored.values(host[sel] >> np.uint64(self.cb))
            copied = (ent[sel] & np.uint64(fmt.OFLAG_COPIED)) != 0
            wrong = ~bad & ((rcs == 1) != copied)
            if not wrong.any():
                continue
            for k in np.flatnonzero(wrong).tolist():
                e = int(ent[sel[k]])
                self._say(f"{tag} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={int(rcs[k])}")
            n = int(wrong.sum())
            res.corruptions += n
            if repair:
                idx = sel[wrong]
                flip = np.uint64(fmt.OFLAG_COPIED)
                raw[idx * step] = np.where(rcs[wrong] == 1, ent[idx] | flip, ent[idx] & ~flip)
                pwrite_full(self.fd, fmt.encode_table(raw), l2_off)
                res.corruptions -= n
                res.corruptions_fixed += n

    # -- the whole pass -----------------------------------------------------------------------
    def run(self) -> CheckResult:
        res, fix = self.res, self.fix
        counts = self.calculate()
        stored = StoredRefcounts(self.fd, self.h)
        before = (res.corruptions, res.leaks, res.check_errors)
        highest = self.compare(counts, 0, stored)
        if self.rebuild and fix & FIX_ERRORS:
            old_corruptions, old_leaks = res.corruptions, res.leaks
            self._say("Rebuilding refcount structure")
            self.rebuild_refcounts(counts)
            del counts, stored  # one file-sized array at a time
            res.corruptions = res.leaks = 0
            res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
            self.rebuild = False
            counts = self.calculate()
            stored = StoredRefcounts(self.fd, self.h)
            saved = (res.corruptions, res.leaks, res.leaks_fixed, res.corruptions_fixed)
            highest = self.compare(counts, FIX_LEAKS, stored)
            fresh_leaks = res.leaks
            res.corruptions, res.leaks, res.leaks_fixed, res.corruptions_fixed = saved
            if self.rebuild:
                self._say("ERROR rebuilt refcount structure is still broken")
            if res.corruptions < old_corruptions:
                res.corruptions_fixed += old_corruptions - res.corruptions
            if res.leaks < old_leaks:
                res.leaks_fixed += old_leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self._say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed("Input/output error", path=self.path, errno=_errno.EIO)
            if res.leaks or res.corruptions:
                res.corruptions, res.leaks, res.check_errors = before
                stored = StoredRefcounts(self.fd, self.h)
                highest = self.compare(counts, fix, stored)
        self.check_copied(stored)
        res.image_end_offset = (highest + 1) * self.cs
        if fix and not res.check_errors and not res.corruptions:
            self._mark_clean()
        if fix:
            os.fdatasync(self.fd)
        return res

    def _mark_clean(self) -> None:
        h = self.h
        clear = fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_CORRUPT
        if h.version >= 3 and h.incompatible_features & clear:
            h.incompatible_features &= ~clear
            os.fdatasync(self.fd)
            pwrite_full(
                self.fd, struct.pack(">Q", h.incompatible_features), fmt.HDR_INCOMPATIBLE_FEATURES
            )


def expected_refcounts(fd: int, path: str) -> np.ndarray:
    """The refcount every host cluster should have (the reference walk), for a new refcount
    structure; a walk that finds damage refuses (``check -r`` first)."""
    checker = _Checker(fd, path, 0)
    counts = checker.calculate()
    res = checker.res
    if res.corruptions or res.check_errors:
        raise CorruptImageError(
            "the image has errors: repair it first (qemu-img check -r all)", path=path
        )
    return counts


def check(path: str, fix: int = 0, force_share: bool = False) -> CheckResult:
    """One check pass over the qcow2 image at ``path``; ``fix`` is FIX_LEAKS | FIX_ERRORS.

    The file is locked as qemu-img check locks it: read-write when repairing, else read-only
    (``force_share``, qemu-img -U, beside a writer)."""
    if force_share and fix:
        raise RequestError("force-share=on can only be used with read-only images", path=path)
    try:
        fd = os.open(path, (os.O_RDWR if fix else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        locking.lock(fd, path, locking.mode_for("qcow2", not fix, force_share))
        checker = _Checker(fd, path, fix)
        data_file = datafile.data_file_path(path, checker.h, None)
        if data_file is not None and not os.path.exists(data_file):  # as qemu-img check
            raise VdiskError(
                f"Could not open '{data_file}': No such file or directory",
                path=path,
                errno=_errno.ENOENT,
            )
        return checker.run()
    except OSError as exc:
        raise from_oserror(exc, path) from None
    except VdiskError as exc:
        if exc.path is None:
            exc.path = path
        raise
    finally:
        os.close(fd)


def repair_open_file(fd: int, path: str) -> CheckResult:
    """Check and repair everything, on an image file the caller holds open read-write
    (QEMU's repair of a dirty lazy-refcounts image when it opens one)."""
    return _Checker(fd, path, FIX_LEAKS | FIX_ERRORS).run()


def check_and_repair(
    path: str, fix: int = 0, force_share: bool = False
) -> tuple[CheckResult, CheckResult | None]:
    """qemu-img check's flow: check (repairing what ``fix`` allows); if anything was repaired,
    check again without repairing. Returns (final result, the repairing pass or None); the
    final result carries the repairing pass's fixed counts."""
    first = check(path, fix, force_share)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return first, None
    final = check(path, 0, force_share)
    final.corruptions_fixed = first.corruptions_fixed
    final.leaks_fixed = first.leaks_fixed
    return final, first


__all__ = [
    "FIX_ERRORS",
    "FIX_LEAKS",
    "CheckFailed",
    "CheckResult",
    "check",
    "check_and_repair",
    "expected_refcounts",
    "repair_open_file",
]
