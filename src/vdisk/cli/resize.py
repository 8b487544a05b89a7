"""``vdisk resize``, as ``qemu-img resize``.

The size is taken as the last argument even when it starts with '-' (a relative shrink), as
qemu-img does; raw files are resized in place, qcow2 images through ``vdisk.qcow2.resize``.
"""

from __future__ import annotations

import os

import click

from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..fileio import pwrite_full
from ..sizes import parse_size
from .options import QCOW2_PREALLOC

_SIZE_HELP = (
    "Parameter 'size' expects a non-negative number below 2^64\n"
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)
_SHRINK_WARNING = (
    "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
    "Before performing such an operation, make sure there is no important data there."
)


def _new_size(text: str, current: int) -> int:
    sign = text[:1] if text[:1] in "+-" else ""
    try:
        value = parse_size(text[1:] if sign else text)
    except VdiskError:
        raise RequestError(_SIZE_HELP) from None
    if value >= 1 << 64:
        raise RequestError(_SIZE_HELP)
    size = current + value if sign == "+" else current - value if sign == "-" else value
    if size <= 0:
        raise RequestError("New image size must be positive")
    return size


def _resize_raw(path: str, size_text: str, shrink: bool, prealloc: str) -> None:
    if prealloc == "metadata":
        raise UnsupportedFeatureError("Unsupported preallocation mode: metadata", path=path)
    from .. import locking

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        locking.lock(fd, path, locking.RAW_RESIZE)  # as qemu-img resize locks a raw file
        current = os.fstat(fd).st_size
        size = _new_size(size_text, current)
        if size < current and not shrink:
            click.echo(f"vdisk: {_SHRINK_WARNING}", err=True)
            raise RequestError("Use the --shrink option to perform a shrink operation.")
        if prealloc != "off" and size < current:
            raise RequestError("Preallocation can only be used for growing images", path=path)
        if prealloc == "falloc" and size > current:
            os.posix_fallocate(fd, current, size - current)
        elif prealloc == "full" and size > current:
            chunk = bytes(1 << 20)
            pos = current
            while pos < size:
                n = min(len(chunk), size - pos)
                pwrite_full(fd, chunk[:n], pos)
                pos += n
            os.fsync(fd)
        else:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _resize_export(uri: str, size_text: str, shrink: bool) -> None:
    """An NBD export keeps its size: only "resizing" to the same size succeeds, as in QEMU."""
    import vdisk

    with vdisk.open(uri, format="raw", readonly=True) as export:
        current = export.size
    size = _new_size(size_text, current)
    if size < current and not shrink:
        click.echo(f"vdisk: {_SHRINK_WARNING}", err=True)
        raise RequestError("Use the --shrink option to perform a shrink operation.")
    if size != current:
        raise UnsupportedFeatureError("Cannot resize NBD nodes")


def _resize_qcow2(path: str, size_text: str, shrink: bool, prealloc: str) -> None:
    from ..qcow2.image import Qcow2Image
    from ..qcow2.resize import resize, trim_file

    img = Qcow2Image.open(path)  # with its backing file, which the new area must hide
    try:
        old = img.size
        size = _new_size(size_text, old)
        if size < old and not shrink:
            click.echo(f"vdisk: {_SHRINK_WARNING}", err=True)
            raise RequestError("Use the --shrink option to perform a shrink operation.")
        resize(img, size, prealloc)
    finally:
        img.close()
    if size < old:
        trim_file(path)


@click.command(
    "resize",
    context_settings={"ignore_unknown_options": True},
)
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the end is lost).")
@click.option(
    "--preallocation",
    "prealloc",
    default="off",
    metavar="MODE",
    help="off, metadata (qcow2), falloc or full: how to allocate the new area.",
)
@click.option("-q", "quiet", is_flag=True, help="Quiet: print no success line.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def resize_cmd(
    fmt: str | None, shrink: bool, prealloc: str, quiet: bool, args: tuple[str, ...]
) -> int:
    """Resize FILE to SIZE, or by +SIZE / -SIZE, like qemu-img resize."""
    import vdisk

    if len(args) != 2:
        raise click.UsageError("Expecting image file name and size")
    path, size_text = args
    if prealloc not in QCOW2_PREALLOC:
        raise RequestError(f"Invalid preallocation mode '{prealloc}'")
    vdisk.check_format(fmt, path)
    kind = fmt or vdisk.probe_format(path)
    if vdisk.is_uri(path):
        _resize_export(path, size_text, shrink)
    elif kind == "raw":
        _resize_raw(path, size_text, shrink, prealloc)
    else:
        _resize_qcow2(path, size_text, shrink, prealloc)
    if not quiet:
        click.echo("Image resized.")
    return 0


COMMANDS: tuple[click.Command, ...] = (resize_cmd,)
