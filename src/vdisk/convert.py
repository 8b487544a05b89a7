"""Copy one or more BlockDevices into another, like ``qemu-img convert``.

The sources are concatenated. Their block status drives the copy: ranges that read as zeros are
skipped when the target is known to read as zeros (a freshly created image) and written as
zeros otherwise; data ranges are read in chunks by a pool of threads. Within data, aligned
blocks of ``sparse_size`` bytes that are all zero are not written either, so the target stays
sparse (``sparse_size=0`` turns all of that off and fully allocates the target, as ``-S 0``).

Reads (and zero detection) run in the pool; writes happen in guest order on the calling thread
unless ``out_of_order`` (``-W``) lets each worker write its own chunk at once.

With ``compress`` (``convert -c``) the target must offer compressed writes
(:class:`CompressedTarget`, as a qcow2 image does): the copy goes by windows of whole target
clusters; each worker reads its window and compresses its clusters (the codecs release the GIL,
so this uses every core), zero clusters are skipped, and the compressed clusters are written in
order. As qemu-img, every cluster is compressed, except one that does not shrink.

A long copy flushes the target every ``flush_interval`` seconds, so that a copy killed outright
leaves a target whose metadata describes most of what was written. A ``stop`` event (set by a
signal handler) ends the copy between chunks: the writes in flight finish, the target is
flushed and ``ConvertInterrupted`` is raised; the target keeps what was copied, as qemu-img's.
"""

from __future__ import annotations

import _thread  # threading's C part: threading and queue cost a plain convert ~7 M instructions
import errno
import os
import time
from _queue import Empty, SimpleQueue  # queue's
from collections import deque

from .block import BlockDevice, Extent, SectorPadded
from .errors import RequestError, UnsupportedFeatureError, VdiskError
from .record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Protocol, runtime_checkable

    from .zeroscan import Mapping, ZeroScan
else:
    # typing and dataclasses cost `vdisk convert` more than copying an empty image.
    from .record import Protocol, runtime_checkable

CHUNK = 2 << 20  # bytes per read (qemu-img convert's buffer size)
_PROBE = 128 << 20  # block status window: small, so that the copy starts at once

FLUSH_INTERVAL = 10.0  # seconds between flushes of a long copy
NATIVE_SCAN_FROM = 32 << 20  # smaller copies scan in Python: loading the helper costs more

if TYPE_CHECKING:
    Progress = Callable[[int, int], None]  # (bytes done, bytes total)
    ReadErrorHook = Callable[[int, Exception], None]  # --salvage: (target offset, the error)
SECTOR = 512  # what --salvage retries and gives up on


class ConvertInterrupted(VdiskError):
    """The copy was stopped (``stop`` was set); the target holds what was copied, flushed."""

    errno = errno.EINTR


class Stop(Protocol):
    """What ends a copy early once set (a ``threading.Event`` is one)."""

    def is_set(self) -> bool: ...


class Source(Protocol):
    """What convert needs of a source (every BlockDevice is one)."""

    @property
    def size(self) -> int: ...

    def readinto(self, buf: memoryview, offset: int) -> int: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...


@runtime_checkable
class CompressedTarget(Protocol):
    """A target that takes compressed cluster writes (``Qcow2Image``): the compression half
    runs in the worker that read the data, the write half in guest order."""

    @property
    def cluster_size(self) -> int: ...

    def prepare_compressed(self, buf: memoryview, offset: int) -> list[Any]: ...

    def write_prepared(self, clusters: list[Any]) -> None: ...


@record(frozen=True)
class _Copy:
    source: Source
    src_offset: int
    dst_offset: int
    length: int


@record(frozen=True)
class _Zero:
    dst_offset: int
    length: int
    from_backing: bool = False  # -B: left unallocated, so that the target's backing shows


@record(frozen=True)
class _Window:
    """A cluster-aligned stretch of the target and the source data in it (the rest reads as
    zeros): the unit of a compressed copy."""

    dst_offset: int
    length: int
    pieces: tuple[_Copy, ...]


if TYPE_CHECKING:  # type aliases: for the checkers only
    _Step = _Copy | _Zero | _Window
    # What a finished read leaves to write: (target offset, data or None for zeros, length);
    # the data of a compressed copy is the target's prepared clusters (a list).
    _Writes = list[tuple[int, memoryview | list[Any] | None, int]]
    # What a step's data is in until it is written: a reused buffer or a file mapping.
    _Held = bytearray | Mapping | None


_zero_pool = bytes(CHUNK)


def _zeros(n: int) -> memoryview:
    """A read-only view of at least ``n`` zero bytes (the pool grows for a bigger request)."""
    global _zero_pool
    if len(_zero_pool) < n:
        _zero_pool = bytes(n)
    return memoryview(_zero_pool)


def zero_runs(
    buf: bytes | bytearray, dst_offset: int, block: int, length: int | None = None
) -> list[tuple[int, int, bool]]:
    """Split ``buf[:length]`` (to be written at ``dst_offset``) at multiples of ``block`` in
    the target; returns (start, end, nonzero) runs with adjacent blocks of the same kind
    merged. A block is zero when all its bytes are (a partial first or last block too).

    As qemu's buffer_is_zero, data is told apart by its first non-zero byte, not by reading
    it all: the first and last byte of every block are gathered at once (a strided view),
    and only a block where both are 0 is compared with zeros (memcmp, in ``startswith``)."""
    n = len(buf) if length is None else length
    if n == 0:
        return []
    zeros = _zeros(max(n, block))
    if buf.startswith(zeros[:n]):
        return [(0, n, False)]
    runs: list[tuple[int, int, bool]] = []

    def emit(a: int, b: int, nonzero: bool) -> None:
        if a >= b:
            return
        if runs and runs[-1][2] == nonzero:
            runs[-1] = (runs[-1][0], b, nonzero)
        else:
            runs.append((a, b, nonzero))

    head = min((-dst_offset) % block, n)  # a partial first block [0, head)
    if head:
        emit(0, head, not buf.startswith(zeros[:head], 0, head))
    stop = head + (n - head) // block * block  # whole blocks end here; a partial one follows
    count = (stop - head) // block
    if count:
        view = memoryview(buf)
        firsts = int.from_bytes(bytes(view[head:stop:block]), "little")
        lasts = int.from_bytes(bytes(view[head + block - 1 : stop : block]), "little")
        sampled = (firsts | lasts).to_bytes(count, "little")  # byte i: block i's samples
        whole = zeros[:block]
        pos = head
        i = sampled.find(0)
        while i >= 0:
            # Blocks i..j-1 all sampled 0: one compare for the lot, else block by block.
            j = count - len(sampled[i:].lstrip(b"\0"))
            at, end = head + i * block, head + j * block
            if buf.startswith(zeros[: end - at], at, end):
                emit(pos, at, True)
                emit(at, end, False)
                pos = end
            else:
                for b in range(at, end, block):
                    if buf.startswith(whole, b, stop):
                        emit(pos, b, True)
                        emit(b, b + block, False)
                        pos = b + block
            i = sampled.find(0, j)
        emit(pos, stop, True)
    if stop < n:
        emit(stop, n, not buf.startswith(zeros[: n - stop], stop, n))
    return runs


def _backing_size(src: Source, top_only: bool) -> int:
    """With ``top_only``, how much of ``src`` its backing file covers (0: none)."""
    backing = getattr(src, "backing", None) if top_only else None
    return min(backing.size, src.size) if backing is not None else 0


def _split(e: Extent, at: int) -> Iterator[Extent]:
    """``e`` cut at ``at`` (when inside it)."""
    if e.offset < at < e.end:
        yield Extent(e.offset, at - e.offset, e.data, e.zero, e.present, e.depth)
        yield Extent(at, e.end - at, e.data, e.zero, e.present, e.depth)
    else:
        yield e


def _source_extents(src: Source, top_only: bool, zeros_from: int) -> Iterator[tuple[Extent, bool]]:
    """The source's extents, each with whether the copy leaves it to the target's backing
    file (``top_only``): what the source's own backing file holds, and zeros at or past
    ``zeros_from`` (the end of the target's backing file, which then reads zeros too)."""
    covered = _backing_size(src, top_only)
    pos = 0
    while pos < src.size:
        window = min(_PROBE, src.size - pos)
        for whole in src.block_status(pos, window):
            for part in _split(whole, covered):
                for e in _split(part, zeros_from):
                    below = (e.depth > 0 or not e.present) and e.offset < covered
                    past_end = e.zero and not e.data and e.offset >= zeros_from
                    yield e, top_only and (below or past_end)
        pos += window


def plan(
    sources: Sequence[Source],
    sparse: bool,
    chunk: int = CHUNK,
    top_only: bool = False,
    backing_end: int | None = None,
) -> Iterator[_Step]:
    """The copy steps in target order, generated as the copy goes (memory stays bounded):
    chunked data copies and, with ``sparse``, zero ranges (otherwise holes are copied too).
    With ``top_only`` (convert -B), what a source's backing file provides, and zeros past
    ``backing_end`` (the target backing file's size), become zero ranges marked
    ``from_backing``, never written."""
    zero: _Zero | None = None  # a zero range still growing
    base = 0
    for src in sources:
        zeros_from = src.size if backing_end is None else max(0, backing_end - base)
        for e, below in _source_extents(src, top_only, zeros_from):
            if below or (sparse and e.zero and not e.data):
                if (
                    zero is not None
                    and zero.dst_offset + zero.length == base + e.offset
                    and zero.from_backing == below
                ):
                    zero = _Zero(zero.dst_offset, zero.length + e.length, below)
                else:
                    if zero is not None:
                        yield zero
                    zero = _Zero(base + e.offset, e.length, below)
                continue
            if zero is not None:
                yield zero
                zero = None
            off = e.offset
            while off < e.end:
                # Chunk boundaries aligned in the target, so reads stay cluster aligned.
                n = min(e.end - off, chunk - (base + off) % chunk)
                yield _Copy(src, off, base + off, n)
                off += n
        base += src.size
    if zero is not None:
        yield zero


def windows(sources: Sequence[Source], total: int, every: bool) -> Iterator[_Window]:
    """The copy as target windows of ``CHUNK`` bytes (a whole number of clusters of any
    cluster size qcow2 allows), in target order: those holding data, or ``every`` one."""
    start = 0
    pieces: list[_Copy] = []
    for step in plan(sources, True):
        if not isinstance(step, _Copy):
            continue
        # plan() never lets a copy cross a CHUNK boundary of the target.
        window = step.dst_offset - step.dst_offset % CHUNK
        if window != start:
            if pieces or every:
                yield _Window(start, min(CHUNK, total - start), tuple(pieces))
            if every:
                for empty in range(start + CHUNK, window, CHUNK):
                    yield _Window(empty, min(CHUNK, total - empty), ())
            start, pieces = window, []
        pieces.append(step)
    if pieces or every:
        yield _Window(start, min(CHUNK, total - start), tuple(pieces))
    if every:
        for empty in range(start + CHUNK, total, CHUNK):
            yield _Window(empty, min(CHUNK, total - empty), ())


_ZEROS = bytes(CHUNK)


class _Buffers:
    """Reused read buffers (a fresh 2 MiB buffer costs a page fault per 4 KiB each time); at
    most ``limit`` exist, as at most ``limit`` steps are in flight."""

    def __init__(self, limit: int) -> None:
        self.free: SimpleQueue[bytearray] = SimpleQueue()
        self.limit = limit
        self.made = 0
        self.lock = _thread.allocate_lock()

    def take(self) -> bytearray:
        try:
            return self.free.get_nowait()
        except Empty:
            pass
        with self.lock:
            if self.made < self.limit:
                self.made += 1
                return bytearray(CHUNK)
        return self.free.get()

    def give_back(self, buf: bytearray) -> None:
        self.free.put(buf)


# qemu's cache modes -> (flush at the end, every write durable before the next). vdisk reads
# and writes through the page cache in every mode: "none"/"off" and "directsync" promise what
# "writeback" and "writethrough" promise, without O_DIRECT's cache bypass.
CACHE_MODES = {
    "none": (True, False),
    "off": (True, False),
    "writeback": (True, False),
    "writethrough": (True, True),
    "directsync": (True, True),
    "unsafe": (False, False),
}


class RateLimit:
    """Sleeps so that data is written at no more than ``rate`` bytes per second (``-r``)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.written = 0

    def account(self, nbytes: int) -> None:
        if not self.rate:
            return
        self.written += nbytes
        ahead = self.start + self.written / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _file_of(dev: object) -> tuple[int, int] | None:
    """(fd, real size) of a device whose bytes are one host file's at the same offsets (a
    plain raw file, possibly behind SectorPadded), else None."""
    inner = dev.dev if isinstance(dev, SectorPadded) else dev
    get_fd = getattr(inner, "file_descriptor", None)
    fd = get_fd() if get_fd is not None else None
    if fd is None:
        return None
    return fd, inner.size  # type: ignore[attr-defined]  # a FileBacked device has a size


class _Offload:
    """Copy offload (copy_file_range) from plain raw sources to a plain raw target, for runs
    that need no zero detection (``-S 0``): the kernel copies, nothing passes through here."""

    def __init__(self, target: BlockDevice, enabled: bool) -> None:
        found = _file_of(target) if enabled else None
        self.target_fd = found[0] if found else None

    def copy(self, step: _Copy) -> bool:
        """Copy the step in the kernel; False (nothing copied) when it cannot be."""
        if self.target_fd is None:
            return False
        found = _file_of(step.source)
        if found is None or step.src_offset + step.length > found[1]:
            return False  # not a file, or past its end (the zeros SectorPadded adds)
        src_fd, done = found[0], 0
        try:
            while done < step.length:
                n = os.copy_file_range(
                    src_fd,
                    self.target_fd,
                    step.length - done,
                    step.src_offset + done,
                    step.dst_offset + done,
                )
                if n <= 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        if done and done < step.length:
            raise VdiskError("copy_file_range stopped short of the source's end")
        if not done:
            self.target_fd = None  # not here: read and write from now on
        return done == step.length


class _Copier:
    """One copy's shared state: what each step reads and writes, and how far it has got."""

    def __init__(
        self,
        target: BlockDevice,
        target_is_zero: bool,
        sparse_size: int,
        out_of_order: bool,
        limit: int,
        progress: Progress | None,
        total: int,
        fua: bool = False,
        rate: int | None = None,
        on_read_error: ReadErrorHook | None = None,
    ) -> None:
        self.target = target
        # Offloaded copies land at once, out of order: fine in a raw file (no layout to keep).
        self.offload = _Offload(target, enabled=sparse_size == 0)
        self.salvage = on_read_error is not None
        self.on_read_error = on_read_error
        self.fua = fua
        self.rate = RateLimit(rate)
        self.target_is_zero = target_is_zero
        self.sparse_size = sparse_size
        self.out_of_order = out_of_order
        self.buffers = _Buffers(limit)
        self.scan: ZeroScan | None = None
        # Sources are mapped only for a target that hands the bytes to the kernel (a write
        # fails with EFAULT if the file shrinks under the mapping); an encrypting one reads
        # them itself, where the fault would kill the process.
        self.map_sources = not getattr(target, "encrypted", False)
        self.scan_loaded = False
        self.retired: deque[Mapping] = deque()  # written, to unmap
        self.progress = progress
        self.total = total
        self.done = 0
        self.lock = _thread.allocate_lock()

    def read_window(self, step: _Window) -> tuple[_Held, _Writes]:
        """Read a window and compress its clusters (in a worker); zero clusters are skipped
        on a zeroed target (unless ``sparse_size`` is 0, as ``-S 0``)."""
        target = self.target
        assert isinstance(target, CompressedTarget)
        buf = self.buffers.take()
        view = memoryview(buf)[: step.length]
        try:
            if sum(p.length for p in step.pieces) < step.length:
                view[:] = _ZEROS[: step.length]
            for p in step.pieces:
                at = p.dst_offset - step.dst_offset
                p.source.readinto(view[at : at + p.length], p.src_offset)
            cs = target.cluster_size
            if self.sparse_size:
                runs = zero_runs(buf, step.dst_offset, cs, step.length)
            else:
                runs = [(0, step.length, True)]
            items: _Writes = []
            for a, b, nonzero in runs:
                off = step.dst_offset + a
                if not nonzero:
                    if not self.target_is_zero:
                        items.append((off, None, b - a))
                    continue
                # Whole clusters, or a short one that ends the target (as qemu-img allows).
                at_end = step.dst_offset + b == target.size
                whole = b if at_end or not b & (cs - 1) else b & ~(cs - 1)
                if whole > a:
                    items.append((off, target.prepare_compressed(view[a:whole], off), whole - a))
                if whole < b:  # a short last cluster short of the target's end
                    items.append((step.dst_offset + whole, view[whole:b], b - whole))
        except BaseException:
            self.buffers.give_back(buf)
            raise
        return buf, items

    def read(self, step: _Step) -> tuple[_Held, _Writes]:
        """Read a step's data (in a worker); what to write for it."""
        if isinstance(step, _Window):
            return self.read_window(step)
        if isinstance(step, _Zero):
            if self.target_is_zero or step.from_backing:
                return None, []
            return None, [(step.dst_offset, None, step.length)]
        if self.offload.copy(step):
            return None, []
        scan = self.scanner()
        mapping = self._map(scan, step) if scan is not None and self.map_sources else None
        held: bytearray | Mapping
        if mapping is not None:
            held, view = mapping, mapping.view
        else:
            held = buf = self.buffers.take()
            view = memoryview(buf)[: step.length]
        try:
            if mapping is None:
                self._read_into(step, view)
            if not self.sparse_size:
                return held, [(step.dst_offset, view, step.length)]
            if scan is not None:
                runs = scan.runs(held, step.dst_offset, self.sparse_size, step.length)
            else:
                assert isinstance(held, bytearray)
                runs = zero_runs(held, step.dst_offset, self.sparse_size, step.length)
        except BaseException:
            self._release(held)
            raise
        return held, [(step.dst_offset + a, view[a:b] if nz else None, b - a) for a, b, nz in runs]

    def _read_into(self, step: _Copy, view: memoryview) -> None:
        try:
            step.source.readinto(view, step.src_offset)
        except (VdiskError, OSError):
            if not self.salvage:
                raise
            self._salvage(step, view)

    def scanner(self) -> ZeroScan | None:
        """The compiled zero scan, loaded at the first data step of a copy big enough to pay
        for loading it and ctypes (an empty copy never loads them)."""
        if not self.scan_loaded:
            if self.total >= NATIVE_SCAN_FROM:
                from . import zeroscan

                self.scan = zeroscan.load()
            self.scan_loaded = True
        return self.scan

    def _map(self, scan: ZeroScan, step: _Copy) -> Mapping | None:
        """The step's source bytes as a mapping of the file that holds them, where they lie
        in one run of a file that its lock keeps from shrinking (``file_range``)."""
        src = step.source.dev if isinstance(step.source, SectorPadded) else step.source
        file_range = getattr(src, "file_range", None)
        found = file_range(step.src_offset, step.length) if file_range is not None else None
        return scan.map(found[0], found[1], step.length) if found is not None else None

    def _release(self, held: _Held, later: bool = False) -> None:
        """Done with a step's data: a buffer goes back to the pool, a mapping is unmapped, or
        with ``later`` (in the writing thread, which is the copy's bottleneck) closed and
        left for a worker to unmap (``unmap_retired``)."""
        if isinstance(held, bytearray):
            self.buffers.give_back(held)
        elif held is not None:
            held.view.release()
            if later:
                self.retired.append(held)
            else:
                held.unmap()

    def unmap_retired(self) -> None:
        retired = self.retired
        while retired:
            try:
                retired.popleft().unmap()
            except IndexError:  # another thread took the last one
                break

    def _salvage(self, step: _Copy, view: memoryview) -> None:
        """``--salvage``: read the step sector by sector; what fails reads as zeros."""
        for pos in range(0, len(view), SECTOR):
            part = view[pos : pos + SECTOR]
            try:
                step.source.readinto(part, step.src_offset + pos)
            except (VdiskError, OSError) as exc:
                part[:] = bytes(len(part))
                if self.on_read_error is not None:
                    self.on_read_error(step.dst_offset + pos, exc)

    def write(self, step: _Step, buf: _Held, items: _Writes) -> None:
        try:
            for off, data, n in items:
                if isinstance(data, list):
                    assert isinstance(self.target, CompressedTarget)
                    self.target.write_prepared(data)
                    self.rate.account(n)
                elif data is not None:
                    self.target.write(data, off, fua=self.fua)
                    self.rate.account(n)
                elif not self.target_is_zero:
                    self.target.write_zeroes(off, n, may_unmap=True)
        finally:
            items.clear()  # the views go before their mapping does
            self._release(buf, later=True)
        with self.lock:
            self.done += step.length
            if self.progress is not None:
                self.progress(self.done, self.total)

    def task(self, step: _Step) -> tuple[_Held, _Writes]:
        self.unmap_retired()
        buf, items = self.read(step)
        if self.out_of_order:
            self.write(step, buf, items)
            return None, []
        return buf, items


if TYPE_CHECKING:
    _Result = tuple[_Held, _Writes]


class _Task:
    """One step handed to a worker: the outcome, ready once ``result`` can return."""

    __slots__ = ("cancelled", "done", "error", "value")

    def __init__(self) -> None:
        self.cancelled = False
        self.value: _Result = (None, [])
        self.error: BaseException | None = None
        self.done = _thread.allocate_lock()
        self.done.acquire()  # released by the worker

    def result(self) -> _Result:
        with self.done:
            if self.error is not None:
                raise self.error
            return self.value


class _Pool:
    """The copy's worker threads, started as steps arrive (concurrent.futures, or even
    threading, would do, but importing them costs each ``vdisk convert`` more than the empty
    copy). ``close`` waits for them: each holds its ``exited`` lock until it returns."""

    def __init__(self, workers: int, run: Callable[[_Step], _Result]) -> None:
        self.workers = workers
        self.run = run
        self.queue: SimpleQueue[tuple[_Step, _Task] | None] = SimpleQueue()
        self.exited: list[_thread.LockType] = []

    def submit(self, step: _Step) -> _Task:
        task = _Task()
        self.queue.put((step, task))
        if len(self.exited) < self.workers:
            exited = _thread.allocate_lock()
            exited.acquire()
            _thread.start_new_thread(self._work, (exited,))
            self.exited.append(exited)
        return task

    def _work(self, exited: _thread.LockType) -> None:
        try:
            while (item := self.queue.get()) is not None:
                step, task = item
                if not task.cancelled:
                    try:
                        task.value = self.run(step)
                    except BaseException as exc:  # handed to the caller by result()
                        task.error = exc
                task.done.release()
        finally:
            exited.release()

    def close(self) -> None:
        """Wait for the workers; steps not started yet are skipped if cancelled."""
        for _ in self.exited:
            self.queue.put(None)
        for exited in self.exited:
            exited.acquire()


class _FlushClock:
    """Flushes the target when ``interval`` seconds have passed since the last flush."""

    def __init__(self, target: BlockDevice, interval: float | None) -> None:
        self.target = target
        self.interval = interval
        self.last = time.monotonic()

    def tick(self) -> None:
        if self.interval is not None and time.monotonic() - self.last >= self.interval:
            self.target.flush()
            self.last = time.monotonic()


def convert(
    sources: Sequence[Source],
    target: BlockDevice,
    *,
    target_is_zero: bool,
    sparse_size: int = 4096,
    workers: int = 8,
    out_of_order: bool = False,
    progress: Progress | None = None,
    flush: bool = True,
    stop: Stop | None = None,
    flush_interval: float | None = FLUSH_INTERVAL,
    compress: bool = False,
    fua: bool = False,
    top_only: bool = False,
    rate: int | None = None,
    salvage: ReadErrorHook | None = None,
) -> None:
    """Copy the concatenation of ``sources`` to the start of ``target``; ``flush`` it after
    (qemu-img convert's default cache mode, ``unsafe``, does not). ``stop`` ends the copy
    early with ``ConvertInterrupted``; ``flush_interval`` (None: never) flushes on the way;
    ``compress`` writes compressed clusters (the target must be a :class:`CompressedTarget`);
    ``fua`` makes every data write durable before the next (cache modes writethrough and
    directsync); ``top_only`` (convert -B: the target's backing file holds what the sources'
    backing files hold) copies only each source's own layer."""
    total = sum(s.size for s in sources)
    if total > target.size:
        raise RequestError("output file is smaller than input file")
    if workers < 1:
        raise RequestError("need at least one worker")
    if compress and not isinstance(target, CompressedTarget):
        raise UnsupportedFeatureError("Compression not supported for this file format")
    target_backing = getattr(target, "backing", None)
    backing_end = target_backing.size if target_backing is not None else None
    steps: Iterator[_Step] = (
        windows(sources, total, not (target_is_zero and sparse_size))
        if compress
        else plan(sources, sparse_size > 0, top_only=top_only, backing_end=backing_end)
    )
    limit = 2 * workers  # steps in flight: they bound the memory held
    copier = _Copier(
        target, target_is_zero, sparse_size, out_of_order, limit, progress, total, fua=fua,
        rate=rate, on_read_error=salvage,
    )  # fmt: skip
    clock = _FlushClock(target, flush_interval)
    stopped = False
    pool = _Pool(workers, copier.task)
    pending: deque[tuple[_Step, _Task]] = deque()

    def finish() -> None:
        step, task = pending.popleft()
        buf, items = task.result()
        if not out_of_order:
            copier.write(step, buf, items)  # in guest order, as qemu-img without -W

    try:
        for step in steps:
            if stop is not None and stop.is_set():
                stopped = True
                break
            if not copier.scan_loaded and isinstance(step, _Copy):
                copier.scanner()  # here, not in a worker that other workers would wait for
            pending.append((step, pool.submit(step)))
            while len(pending) >= limit:
                finish()
            clock.tick()
        while pending:
            finish()
    finally:
        for _, task in pending:
            task.cancelled = True
        pool.close()
        copier.unmap_retired()
    if stopped:
        target.flush()
        raise ConvertInterrupted(
            f"convert interrupted after {copier.done} of {total} bytes; "
            "the target keeps what was copied"
        )
    if flush:
        target.flush()


__all__ = [
    "CACHE_MODES",
    "CHUNK",
    "CompressedTarget",
    "ConvertInterrupted",
    "RateLimit",
    "Source",
    "Stop",
    "convert",
    "plan",
    "windows",
    "zero_runs",
]
