"""``vdisk convert``: qemu-img convert's flags, checks and messages; the copy is
``vdisk.convert``.

SIGTERM and SIGINT during the copy stop copying, flush and close the target (which keeps what
was copied), then kill the process by the same signal, so that its caller sees what qemu-img's
sees (qemu-img dies by the signal: a shell reports 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import click

from ..block import SECTOR_SIZE, BlockDevice, SectorPadded
from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..sizes import parse_size
from .options import create_opts, parse_opts
from .progress import Progress

_MAX_SPARSE = 32768 * SECTOR_SIZE  # qemu-img's limit for -S (16 MiB)
_MAX_WORKERS = 16  # qemu-img's limit for -m
_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


@dataclass(frozen=True)
class _Settings:
    """The checked flags that shape the copy."""

    sparse_size: int
    workers: int
    out_of_order: bool
    flush: bool


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


def _create_target(dst: str, out_fmt: str, options: tuple[str, ...], total: int) -> None:
    """Make the target as qemu-img would: its ``-o`` options, sized for all sources."""
    import vdisk

    if vdisk.is_uri(dst):
        _check_export_target(dst, out_fmt, total)
        return
    opts = parse_opts(out_fmt, list(options), dst)
    if "backing_file" in opts or "backing_fmt" in opts:
        # qemu-img would then copy only what differs from the backing file.
        raise UnsupportedFeatureError(
            "a backing file for the target (-B, -o backing_file) is not supported yet", path=dst
        )
    kwargs = {
        d.kwarg: opts[d.name].value
        for d in create_opts(out_fmt)
        if d.kwarg is not None and d.name in opts
    }
    vdisk.create(dst, total, format=out_fmt, **kwargs)
    if out_fmt == "raw" and total:
        # QEMU writes the first block of every raw file it creates (for its alignment
        # probing); do the same so that the output's allocation matches qemu-img's.
        with vdisk.open(dst, format="raw") as fresh:
            fresh.write(bytes(min(fresh.size, 512 if total < 4096 else 4096)), 0)


class _Signalled(BaseException):
    """The copy stopped on a signal; raised past the cleanup, then the process dies by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _die_by(signum: int) -> None:
    """Die by ``signum`` as an unhandled signal does (default action restored, raised)."""
    signal.signal(signum, signal.SIG_DFL)
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


@contextmanager
def _stop_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """An event set by SIGTERM or SIGINT while the block runs, and the signals caught
    (previous handlers restored)."""
    stop = threading.Event()
    caught: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop, caught  # signals reach only the main thread; nothing to install
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop, caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _copy(
    inputs: list[BlockDevice | SectorPadded],
    target: BlockDevice,
    dst: str,
    settings: _Settings,
    target_is_zero: bool,
    show: Progress | None,
) -> None:
    from .. import convert as conv

    with _stop_on_signals() as (stop, caught):
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
                stop=stop,
            )
        except conv.ConvertInterrupted as exc:
            if show is not None:
                show.close()
            if caught:
                raise _Signalled(caught[0]) from None
            exc.path = dst
            raise


@click.command("convert")
@click.option("-f", "fmt", metavar="FMT", help="Source format (default: probe).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (raw, qcow2).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Output creation options.")
@click.option("-n", "skip_create", is_flag=True, help="Write into an existing target.")
@click.option("-S", "sparse", default="4k", metavar="SIZE", help="Zero run that stays sparse.")
@click.option("-W", "out_of_order", is_flag=True, help="Allow out-of-order writes.")
@click.option("-m", "workers", default="8", metavar="N", help="Parallel requests (1-16).")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-c", "compress", is_flag=True, help="Compress (not supported).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
@click.option("-t", "cache", default="unsafe", metavar="CACHE", help="Target cache mode.")
@click.option("-T", "src_cache", metavar="CACHE", help="Accepted (source cache mode).")
@click.option("--bitmaps", "bitmaps", is_flag=True, help="Copy the persistent dirty bitmaps.")
@click.option(
    "--skip-broken-bitmaps", "skip_broken", is_flag=True, help="With --bitmaps: skip in-use ones."
)
@click.argument("files", nargs=-1)
def convert_cmd(
    fmt: str | None,
    out_fmt: str,
    options: tuple[str, ...],
    skip_create: bool,
    sparse: str,
    out_of_order: bool,
    workers: str,
    progress: bool,
    quiet: bool,
    compress: bool,
    force_share: bool,
    cache: str,
    src_cache: str | None,
    bitmaps: bool,
    skip_broken: bool,
    files: tuple[str, ...],
) -> int:
    """Convert the source images (concatenated) into DST, like qemu-img convert."""
    import vdisk

    from ..backends.raw import RawDevice

    if compress:
        raise UnsupportedFeatureError("compression (-c) is not supported yet")
    sparse_size, nworkers = _check_counts(sparse, workers)
    if len(files) < 2:
        raise RequestError("Must specify image file name")
    *srcs, dst = files
    vdisk.check_format(fmt, srcs[0])
    vdisk.check_format(out_fmt, dst)
    if skip_create and options:
        raise RequestError("-o has no effect when skipping image creation")
    if cache not in _CACHE_MODES:
        raise RequestError(f"Invalid cache option: {cache}")
    if bitmaps or skip_broken:
        from ..qcow2.bitmap import check_copy_args

        check_copy_args(len(srcs), out_fmt, skip_broken and not bitmaps)
    # qemu-img convert's default cache mode (unsafe) does not flush at the end.
    settings = _Settings(sparse_size, nworkers, out_of_order, flush=cache != "unsafe")
    sources: list[BlockDevice] = []
    target: BlockDevice | None = None
    signalled: int | None = None
    try:
        for src in srcs:
            sources.append(vdisk.open(src, format=fmt, readonly=True, force_share=force_share))
        if bitmaps:
            from ..qcow2.bitmap import copyable_bitmaps

            to_copy = copyable_bitmaps(sources[0], skip_broken, click.echo)
        # Raw sources as QEMU sizes them (whole sectors).
        inputs = [SectorPadded(s) if isinstance(s, RawDevice) else s for s in sources]
        total = sum(s.size for s in inputs)
        if not skip_create:
            _create_target(dst, out_fmt, options, total)
        target = vdisk.open(dst, format=out_fmt, readonly=False)
        if target.size < total:
            raise RequestError("output file is smaller than input file", path=dst)
        if bitmaps:
            from ..qcow2.bitmap import check_copy_target

            check_copy_target(target)
        show = Progress() if progress and not quiet else None
        if show is not None:
            show(0, total)
        _copy(inputs, target, dst, settings, not skip_create, show)
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


COMMANDS: tuple[click.Command, ...] = (convert_cmd,)
