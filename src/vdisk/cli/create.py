"""``vdisk create``: qemu-img create's flags, checks, messages and ``Formatting`` line.

Options are parsed in ``cli.options``; the image is made by ``vdisk.create``.
"""

from __future__ import annotations

import click

from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..filenames import resolve_backing
from ..sizes import parse_size
from .converting import write_first_block
from .options import (
    FORMAT_OPTS,
    INT64_MAX,
    ParsedOpt,
    create_opts,
    formatting_line,
    options_help,
    parse_opts,
    validate_values,
    wants_help,
)


def _backing_size(path: str, backing: str, backing_fmt: str) -> int:
    """Open the backing file as the new image will see it; its size (QEMU checks it opens)."""
    import vdisk

    try:
        with vdisk.open(
            resolve_backing(path, backing), format=backing_fmt, readonly=True
        ) as parent:
            return parent.size
    except VdiskError as exc:
        raise type(exc)(f"{exc}; Could not open backing image.", path=path) from None


def _positional_size(opts: dict[str, ParsedOpt], text: str, path: str) -> None:
    """The SIZE argument, which may not repeat ``-o size``."""
    if "size" in opts:
        raise RequestError("The image size must be specified only once", path=path)
    try:
        size = parse_size(text)
    except VdiskError:
        raise RequestError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if size > INT64_MAX:
        # qemu-img refuses before its "Formatting" line.
        raise RequestError(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    opts["size"] = ParsedOpt(text, size)


def _backing_flags(
    opts: dict[str, ParsedOpt], fmt: str, backing: str | None, backing_fmt: str | None, path: str
) -> None:
    """``-b`` and ``-F``: the same as ``-o backing_file`` / ``-o backing_fmt`` (qcow2 only)."""
    for key, value in (("backing_file", backing), ("backing_fmt", backing_fmt)):
        if value is None:
            continue
        if fmt != "qcow2":
            raise UnsupportedFeatureError(
                f"Backing file not supported for file format '{fmt}'", path=path
            )
        opts[key] = ParsedOpt(value, value)


def _size_from_backing(opts: dict[str, ParsedOpt], unsafe: bool, path: str) -> None:
    """A backing file needs its format; unless ``-u``, it must open, and gives the size."""
    if "backing_file" not in opts:
        return
    if "backing_fmt" not in opts:
        raise RequestError("Backing file specified without backing format", path=path)
    if unsafe:
        return
    parent_size = _backing_size(path, opts["backing_file"].value, opts["backing_fmt"].value)
    if "size" not in opts:
        opts["size"] = ParsedOpt(str(parent_size), parent_size)


@click.command("create", context_settings={"ignore_unknown_options": False})
@click.option("-f", "fmt", default="raw", metavar="FMT", help="Image format (default: raw).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="key=value[,...] (-o help).")
@click.option("-b", "backing", metavar="BACKING", help="Backing file.")
@click.option("-F", "backing_fmt", metavar="FMT", help="Backing file format.")
@click.option("-u", "unsafe", is_flag=True, help="Do not open the backing file.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print no success line.")
@click.argument("args", nargs=-1)
def create_cmd(
    fmt: str,
    options: tuple[str, ...],
    backing: str | None,
    backing_fmt: str | None,
    unsafe: bool,
    quiet: bool,
    args: tuple[str, ...],
) -> int:
    """Create an image FILE of SIZE bytes (suffixes k, M, G, T, P, E)."""
    import vdisk

    if fmt not in FORMAT_OPTS:
        raise UnsupportedFeatureError(
            f"Unknown file format '{fmt}'", path=args[0] if args else None
        )
    if wants_help(list(options)):
        click.echo(options_help(fmt, with_protocol=bool(args)), nl=False)
        return 0
    if not args:
        raise click.UsageError("Expecting image file name")
    if len(args) > 2:
        raise click.UsageError(f"Unexpected argument: {args[2]}")
    path = args[0]
    opts = parse_opts(fmt, list(options), path)
    if len(args) == 2:
        _positional_size(opts, args[1], path)
    _backing_flags(opts, fmt, backing, backing_fmt, path)
    _size_from_backing(opts, unsafe, path)
    if "size" not in opts:
        raise RequestError("Image creation needs a size parameter", path=path)
    if not quiet:
        click.echo(formatting_line(path, fmt, opts))
    validate_values(fmt, opts, path)
    kwargs = {
        desc.kwarg: opts[desc.name].value
        for desc in create_opts(fmt)
        if desc.kwarg is not None and desc.name in opts
    }
    size = opts["size"].value
    if vdisk.is_uri(path):
        _create_on_export(path, fmt, size)
        return 0
    if fmt == "raw":
        size = -(-size // 512) * 512  # QEMU's raw files are whole sectors
    vdisk.create(path, size, format=fmt, **kwargs)
    if fmt == "raw":
        write_first_block(path, size)
    return 0


def _create_on_export(uri: str, fmt: str, size: int) -> None:
    """An NBD export exists already: a raw "image" on it is the export itself (QEMU checks
    that it opens); formatting one as qcow2 is not supported here."""
    import vdisk

    if fmt != "raw":
        raise UnsupportedFeatureError(
            f"creating a {fmt} image on an NBD export is not supported", path=uri
        )
    with vdisk.open(uri, format="raw", readonly=True):
        pass


COMMANDS: tuple[click.Command, ...] = (create_cmd,)
