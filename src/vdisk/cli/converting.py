"""What ``vdisk convert`` does once its flags are parsed: qemu-img convert's checks and
messages, the target's creation, the copy (``vdisk.convert``) and the signal handling.

No click here: the command is parsed either by click (``cli/convert.py``) or, for the plain
spellings, by ``cli/quick.py``, and both call :func:`run`. This module's imports stay off the
costly stdlib modules (typing, dataclasses, enum, re) for the same reason.

SIGTERM and SIGINT during the copy stop copying, flush and close the target (which keeps what
was copied), then kill the process by the same signal, so that its caller sees what qemu-img's
sees (qemu-img dies by the signal: a shell reports 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import sys

from ..block import SectorPadded
from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..record import record, replace
from ..sizes import SECTOR_SIZE, parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from types import FrameType
    from typing import Any

    from ..block import BlockDevice
    from .options import ParsedOpt
    from .progress import Progress
else:
    # The C module under `signal`, whose wrappers turn numbers into enums: importing enum
    # costs about half a bare interpreter start.
    import _signal

_MAX_SPARSE = 32768 * SECTOR_SIZE  # qemu-img's limit for -S (16 MiB)
_MAX_WORKERS = 16  # qemu-img's limit for -m


@record(frozen=True)
class _Settings:
    """The checked flags that shape the copy."""

    sparse_size: int
    workers: int
    out_of_order: bool
    rate: int | None  # -r, bytes/s
    salvage: bool
    top_only: bool  # -B: copy only each source's own layer (the target's backing has the rest)
    flush: bool  # at the end, and every few seconds of a long copy (not with cache=unsafe)
    fua: bool
    compress: bool = False


def _compress_settings(settings: _Settings, out_fmt: str, options: tuple[str, ...]) -> _Settings:
    """``-c``: qemu-img's checks of the target format and its creation options."""
    if out_fmt != "qcow2":
        raise UnsupportedFeatureError("Compression not supported for this file format")
    opts = ",".join(options)
    if "encrypt" in opts:
        raise RequestError("Compression and encryption not supported at the same time")
    if "preallocation=" in opts and "preallocation=off" not in opts:
        raise RequestError("Compression and preallocation not supported at the same time")
    return replace(settings, compress=True)


def _check_counts(sparse: str, workers: str) -> tuple[int, int]:
    """``-S`` and ``-m`` as qemu-img checks them, with its messages."""
    try:
        sparse_size = parse_size(sparse)
    except VdiskError:
        sparse_size = -1
    if sparse_size < 0 or sparse_size % SECTOR_SIZE or sparse_size > _MAX_SPARSE:
        raise RequestError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            "up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        )
    try:
        nworkers = int(workers)
    except ValueError:
        nworkers = 0
    if not 1 <= nworkers <= _MAX_WORKERS:
        raise RequestError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        )
    return sparse_size, nworkers


def _warn_read_error(offset: int, exc: Exception) -> None:
    """--salvage: qemu-img's warning for each sector that could not be read."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, VdiskError):
        reason = exc.message
    echo(f"vdisk: warning: error while reading offset {offset}: {reason}", err=True)


def check_cache_modes(cache: str | None, src_cache: str | None = None) -> None:
    """``-t`` / ``-T`` as qemu-img checks them (the mode names of vdisk.convert.CACHE_MODES)."""
    from ..convert import CACHE_MODES

    if cache is not None and cache not in CACHE_MODES:
        raise RequestError(f"Invalid cache option: {cache}")
    if src_cache is not None and src_cache not in CACHE_MODES:
        raise RequestError(f"Invalid source cache option: {src_cache}")


def check_rate(rate: str | None) -> int | None:
    """``-r`` as qemu-img reads it (a size; 0 means no limit)."""
    if rate is None:
        return None
    try:
        return parse_size(rate) or None
    except VdiskError:
        raise RequestError(
            "Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None


def _target_opts(
    dst: str, out_fmt: str, options: tuple[str, ...], backing: str | None, backing_fmt: str | None
) -> dict[str, ParsedOpt]:
    """The target's ``-o`` options with ``-B``/``-F`` folded in, checked as qemu-img checks."""
    from .create import _backing_flags
    from .options import parse_opts

    opts = parse_opts(out_fmt, list(options), dst) if options else {}
    _backing_flags(opts, out_fmt, backing, backing_fmt, dst)
    if "backing_fmt" in opts and "backing_file" not in opts:
        raise RequestError(
            f"error while converting {out_fmt}: Backing format cannot be used without backing file",
            path=dst,
        )
    if "backing_file" in opts and "backing_fmt" not in opts:
        raise RequestError("Use of backing file requires explicit backing format")
    return opts


def _create_target(dst: str, out_fmt: str, opts: dict[str, ParsedOpt], total: int) -> None:
    """Make the target as qemu-img would: its ``-o`` options, sized for all sources."""
    import vdisk

    if vdisk.is_uri(dst):
        _check_export_target(dst, out_fmt, total)
        return
    kwargs = {}
    if opts:  # the option tables (and click, under them) only when there are options
        from .create import _backing_size
        from .options import create_opts

        if "backing_file" in opts:
            _backing_size(dst, opts["backing_file"].value, opts["backing_fmt"].value)
        kwargs = {
            d.kwarg: opts[d.name].value
            for d in create_opts(out_fmt)
            if d.kwarg is not None and d.name in opts
        }
    vdisk.create(dst, total, format=out_fmt, **kwargs)
    if out_fmt == "raw":
        write_first_block(dst, total)


def write_first_block(path: str, size: int) -> None:
    """Write the first 4 KiB of a new raw file (or all of a smaller one) as QEMU does (for its
    alignment probing), so that the file's allocation matches qemu-img's."""
    import vdisk

    if not size or vdisk.is_uri(path):
        return
    with vdisk.open(path, format="raw") as fresh:
        fresh.write(bytes(min(fresh.size, 4096)), 0)


def _skip_syncs(target: BlockDevice) -> None:
    """cache=unsafe: a qcow2 target writes its metadata back on close without fdatasync."""
    from ..qcow2 import Qcow2Image

    if isinstance(target, Qcow2Image):
        target.durable = False


class _Signalled(BaseException):
    """The copy stopped on a signal; raised past the cleanup, then the process dies by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _die_by(signum: int) -> None:
    """Die by ``signum`` as an unhandled signal does (default action restored, raised)."""
    _signal.signal(signum, _signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _check_export_target(dst: str, out_fmt: str, total: int) -> None:
    """An NBD export cannot be created, only written: QEMU checks that it is large enough."""
    import vdisk

    if out_fmt != "raw":
        raise UnsupportedFeatureError(
            f"creating a {out_fmt} image on an NBD export is not supported", path=dst
        )
    with vdisk.open(dst, format="raw", readonly=True) as export:
        if export.size < total:
            raise RequestError(f"error while converting {out_fmt}: Cannot grow NBD nodes", path=dst)


class _StopOnSignals:
    """While the block runs, SIGTERM and SIGINT set the copy's stop flag (and are kept in
    ``caught``) rather than kill; the previous handlers come back at its end. A plain class,
    not contextlib's decorator nor threading's Event: this module is on the quick command's
    import path. It is the copy's ``convert.Stop``: the handler runs in the main thread, which
    runs the copy's loop too."""

    def __init__(self) -> None:
        self.caught: list[int] = []
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return bool(self.caught)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)

    def __enter__(self) -> _StopOnSignals:
        try:
            for sig in (_signal.SIGTERM, _signal.SIGINT):
                self._previous[sig] = _signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals reach only that one
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            _signal.signal(sig, old)


def _snapshot_options(spec: str | None, sources: int) -> dict[str, object]:
    """The open options of ``-l``: snapshot.id=/snapshot.name= options, or an ID or name."""
    if spec is None:
        return {}
    from .snapshot import convert_snapshot_key

    if sources > 1:
        raise RequestError("No support for concatenating multiple snapshot")
    return {"snapshot": convert_snapshot_key(spec), "snapshot_keep_size": True}


def _open_source(
    src: str, fmt: str | None, force_share: bool, snap_opts: dict[str, object]
) -> BlockDevice:
    import vdisk

    if not snap_opts:
        return vdisk.open(src, format=fmt, readonly=True, force_share=force_share)
    from ..qcow2.snapshot import SnapshotNotFoundError

    try:
        return vdisk.open(src, format=fmt, readonly=True, force_share=force_share, **snap_opts)
    except SnapshotNotFoundError:
        raise RequestError("Failed to load snapshot: Can't find snapshot") from None


def _copy(
    inputs: list[BlockDevice | SectorPadded],
    target: BlockDevice,
    dst: str,
    settings: _Settings,
    target_is_zero: bool,
    show: Progress | None,
) -> None:
    from .. import convert as conv

    with _StopOnSignals() as signals:
        try:
            conv.convert(
                inputs,
                target,
                target_is_zero=target_is_zero,
                sparse_size=settings.sparse_size,
                workers=settings.workers,
                out_of_order=settings.out_of_order,
                progress=show,
                flush=settings.flush,
                stop=signals,
                compress=settings.compress,
                flush_interval=conv.FLUSH_INTERVAL if settings.flush else None,
                fua=settings.fua,
                top_only=settings.top_only,
                rate=settings.rate,
                salvage=_warn_read_error if settings.salvage else None,
            )
        except conv.ConvertInterrupted as exc:
            if show is not None:
                show.close()
            if signals.caught:
                raise _Signalled(signals.caught[0]) from None
            exc.path = dst
            raise


def echo(message: str, err: bool = False) -> None:
    """One line on stdout (or stderr), flushed, as ``click.echo`` writes it."""
    stream = sys.stderr if err else sys.stdout
    stream.write(message + "\n")
    stream.flush()


def run(
    files: tuple[str, ...] | list[str],
    *,
    fmt: str | None = None,
    out_fmt: str = "raw",
    options: tuple[str, ...] = (),
    backing: str | None = None,
    backing_fmt: str | None = None,
    skip_create: bool = False,
    sparse: str = "4k",
    out_of_order: bool = False,
    workers: str = "8",
    rate: str | None = None,
    salvage: bool = False,
    progress: bool = False,
    quiet: bool = False,
    compress: bool = False,
    force_share: bool = False,
    cache: str = "unsafe",
    src_cache: str = "writeback",
    snapshot: str | None = None,
    bitmaps: bool = False,
    skip_broken: bool = False,
) -> int:
    """``vdisk convert`` with its flags parsed (the defaults are the command's); 0 when done,
    a VdiskError for qemu-img's refusals."""
    import vdisk

    from ..backends.raw import RawDevice

    sparse_size, nworkers = _check_counts(sparse, workers)
    rate_limit = check_rate(rate)
    if len(files) < 2:
        raise RequestError("Must specify image file name")
    *srcs, dst = files
    vdisk.check_format(fmt, srcs[0])
    vdisk.check_format(out_fmt, dst)
    if skip_create and options:
        raise RequestError("-o has no effect when skipping image creation")
    check_cache_modes(cache, src_cache)
    opts: dict[str, ParsedOpt] = {}
    if not skip_create and (options or backing is not None or backing_fmt is not None):
        opts = _target_opts(dst, out_fmt, options, backing, backing_fmt)
    top_only = backing is not None or "backing_file" in opts
    from ..convert import CACHE_MODES

    flush, fua = CACHE_MODES[cache]
    settings = _Settings(
        sparse_size, nworkers, out_of_order, rate_limit, salvage, top_only, flush=flush, fua=fua
    )
    if compress:
        settings = _compress_settings(settings, out_fmt, options)
    if bitmaps or skip_broken:
        from ..qcow2.bitmap import check_copy_args

        check_copy_args(len(srcs), out_fmt, skip_broken and not bitmaps)
    sources: list[BlockDevice] = []
    target: BlockDevice | None = None
    signalled: int | None = None
    try:
        snap_opts = _snapshot_options(snapshot, len(srcs))
        for src in srcs:
            sources.append(_open_source(src, fmt, force_share, snap_opts))
        if bitmaps:
            from ..qcow2.bitmap import copyable_bitmaps

            to_copy = copyable_bitmaps(sources[0], skip_broken, echo)
        # Raw sources as QEMU sizes them (whole sectors).
        inputs = [SectorPadded(s) if isinstance(s, RawDevice) else s for s in sources]
        total = sum(s.size for s in inputs)
        if not skip_create:
            _create_target(dst, out_fmt, opts, total)
        target = vdisk.open(dst, format=out_fmt, readonly=False)
        if not settings.flush and out_fmt == "qcow2":
            _skip_syncs(target)
        if target.size < total:
            raise RequestError("output file is smaller than input file", path=dst)
        if bitmaps:
            from ..qcow2.bitmap import check_copy_target

            check_copy_target(target)
        show = None
        if progress and not quiet:
            from .progress import Progress  # shutil and the terminal code, only for -p

            show = Progress()
        if show is not None:
            show(0, total)
        # A target with a backing file reads what it shows, not zeros (qemu-img's has_zero_init).
        _copy(inputs, target, dst, settings, not skip_create and not top_only, show)
        if bitmaps:
            from ..qcow2.bitmap import copy_bitmaps

            copy_bitmaps(to_copy, target)
        if show is not None:
            show.close()
    except _Signalled as exc:
        signalled = exc.signum
    finally:
        for dev in sources:
            dev.close()
        if target is not None:
            target.close()
    if signalled is not None:
        _die_by(signalled)  # after the target is flushed and closed
    return 0
