"""qemu-img-compatible image commands: ``create`` and ``info``.

Option syntax follows qemu-img: ``-o`` takes comma-separated ``key=value`` pairs (``,,`` is a
literal comma), may repeat (later values win), and ``-o help`` / ``-o ?`` lists the options.
The ``Formatting ...`` line lists options in QEMU's own order (the order of the format's option
table followed by the host file's), with QEMU's defaults filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from ..block import resolve_backing
from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..sizes import parse_size

# -- option tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptDesc:
    """One ``-o`` option: its type as QemuOpts knows it, its default and its help line."""

    name: str
    type: str  # "size", "num", "bool" or "str"
    help: str
    default: str | None = None
    kwarg: str | None = None  # the library's keyword (None: accepted but not passed on)


_QCOW2_OPTS = (
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536", "cluster_size"),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off", "extended_l2"),
    OptDesc(
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
        None,
        "preallocation",
    ),
    OptDesc(
        "compression_type",
        "str",
        "Compression method used for image cluster compression",
        "zlib",
        "compression_type",
    ),
    OptDesc("size", "size", "Virtual disk size"),
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])", None, "compat"),
    OptDesc("backing_file", "str", "File name of a base image", None, "backing_file"),
    OptDesc("backing_fmt", "str", "Image format of the base image", None, "backing_fmt"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off", "lazy_refcounts"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16", "refcount_bits"),
)
_RAW_OPTS = (OptDesc("size", "size", "Virtual disk size"),)
# The host file's own options (QEMU's "file" protocol driver), appended after the format's.
_FILE_OPTS = (
    OptDesc(
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, falloc, full)",
        None,
        "preallocation",
    ),
)
_FORMAT_OPTS = {"qcow2": _QCOW2_OPTS, "raw": _RAW_OPTS}

_TYPE_NAMES = {"size": "size", "num": "num", "bool": "bool (on/off)", "str": "str"}
_BOOL_VALUES = {"on": True, "yes": True, "true": True, "y": True,
                "off": False, "no": False, "false": False, "n": False}  # fmt: skip
_COMPAT_VALUES = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
_QCOW2_PREALLOC = ("off", "metadata", "falloc", "full")
_RAW_PREALLOC = ("off", "falloc", "full")
_COMPRESSION_TYPES = ("zlib", "zstd")


def create_opts(fmt: str) -> tuple[OptDesc, ...]:
    """The merged option table for ``fmt``: the format's, then the host file's (no duplicates)."""
    table = list(_FORMAT_OPTS[fmt])
    names = {d.name for d in table}
    table.extend(d for d in _FILE_OPTS if d.name not in names)
    return tuple(table)


def split_opts(text: str) -> list[str]:
    """Split a QemuOpts string on single commas; ``,,`` stands for a literal comma."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    return [item for item in items if item]


def wants_help(options: list[str]) -> bool:
    return any(item in ("help", "?") for text in options for item in split_opts(text))


def options_help(fmt: str, with_protocol: bool) -> str:
    """``-o help`` text: the format's options, plus the host file's when a file is named."""
    table = create_opts(fmt) if with_protocol else _FORMAT_OPTS[fmt]
    lines = []
    for desc in sorted(table, key=lambda d: f"{d.name}=<{_TYPE_NAMES[d.type]}>"):
        text = f"  {desc.name}=<{_TYPE_NAMES[desc.type]}>"
        lines.append(f"{text:<24} - {desc.help}")
    head = "Supported options:" if with_protocol else f"Supported {fmt} options:"
    body = head + "\n" + "\n".join(lines) + "\n"
    if not with_protocol:
        body += (
            "\nThe protocol level may support further options.\n"
            "Specify the target filename to include those options.\n"
        )
    return body


@dataclass
class ParsedOpt:
    raw: str  # as written (printed for strings and bools)
    value: Any  # parsed (int for sizes and numbers, bool for bools, str otherwise)


def parse_opts(fmt: str, options: list[str], path: str) -> dict[str, ParsedOpt]:
    """Parse every ``-o`` string into typed values, with QEMU's messages on bad input."""
    table = {d.name: d for d in create_opts(fmt)}
    parsed: dict[str, ParsedOpt] = {}
    for text in options:
        for item in split_opts(text):
            key, sep, raw = item.partition("=")
            if not sep:
                raw = "on"  # a bare key is a boolean switched on
            desc = table.get(key)
            if desc is None:
                raise RequestError(f"Invalid parameter '{key}'", path=path)
            parsed[key] = ParsedOpt(raw, _parse_value(desc, raw, path))
    return parsed


def _parse_value(desc: OptDesc, raw: str, path: str) -> Any:
    if desc.type == "size":
        try:
            value = parse_size(raw)
        except VdiskError:
            raise RequestError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64", path=path
            ) from None
        if value >= 1 << 64:
            raise RequestError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64", path=path
            )
        return value
    if desc.type == "num":
        try:
            return int(raw, 0)
        except ValueError:
            raise RequestError(f"Parameter '{desc.name}' expects a number", path=path) from None
    if desc.type == "bool":
        if raw not in _BOOL_VALUES:
            raise RequestError(f"Parameter '{desc.name}' expects 'on' or 'off'", path=path)
        return _BOOL_VALUES[raw]
    return raw


def formatting_line(path: str, fmt: str, opts: dict[str, ParsedOpt]) -> str:
    """qemu-img create's ``Formatting 'FILE', fmt=... ...`` line, options in QEMU's order."""
    parts = [f"Formatting '{path}', fmt={fmt}"]
    for desc in create_opts(fmt):
        opt = opts.get(desc.name)
        if opt is None:
            if desc.default is None:
                continue
            parts.append(f"{desc.name}={desc.default}")
        elif desc.type in ("size", "num"):
            parts.append(f"{desc.name}={opt.value}")
        elif desc.type == "str":
            parts.append(f"{desc.name}={opt.raw.replace(',', ',,')}")
        else:
            parts.append(f"{desc.name}={opt.raw}")
    return " ".join(parts)


def _validate_values(fmt: str, opts: dict[str, ParsedOpt], path: str) -> None:
    """Enumerated string options, rejected with QEMU's wording (after the Formatting line)."""
    if "compat" in opts and opts["compat"].raw not in _COMPAT_VALUES:
        raise RequestError(f"Parameter 'version' does not accept value '{opts['compat'].raw}'", path=path)
    allowed_prealloc = _QCOW2_PREALLOC if fmt == "qcow2" else _RAW_PREALLOC
    if "preallocation" in opts and opts["preallocation"].raw not in allowed_prealloc:
        raise RequestError(
            f"Parameter 'preallocation' does not accept value '{opts['preallocation'].raw}'",
            path=path,
        )
    ctype = opts.get("compression_type")
    if ctype is not None and ctype.raw not in _COMPRESSION_TYPES:
        raise RequestError(
            f"Parameter 'compression-type' does not accept value '{ctype.raw}'", path=path
        )


def _backing_size(path: str, backing: str, backing_fmt: str) -> int:
    """Open the backing file as the new image will see it; its size (QEMU checks it opens)."""
    import vdisk

    resolved = resolve_backing(path, backing)
    try:
        with vdisk.open(resolved, format=backing_fmt, readonly=True) as parent:
            return parent.size
    except VdiskError as exc:
        raise type(exc)(f"{exc}; Could not open backing image.", path=path) from None


# -- commands ------------------------------------------------------------------------------------


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

    if fmt not in _FORMAT_OPTS:
        raise UnsupportedFeatureError(f"Unknown file format '{fmt}'", path=args[0] if args else None)
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
        if "size" in opts:
            raise RequestError("The image size must be specified only once", path=path)
        try:
            size = parse_size(args[1])
        except VdiskError:
            raise RequestError(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            ) from None
        opts["size"] = ParsedOpt(args[1], size)
    if backing is not None:
        if fmt != "qcow2":
            raise UnsupportedFeatureError(
                f"Backing file not supported for file format '{fmt}'", path=path
            )
        opts["backing_file"] = ParsedOpt(backing, backing)
    if backing_fmt is not None:
        if fmt != "qcow2":
            raise UnsupportedFeatureError(
                f"Backing file not supported for file format '{fmt}'", path=path
            )
        opts["backing_fmt"] = ParsedOpt(backing_fmt, backing_fmt)
    backing_file = opts["backing_file"].value if "backing_file" in opts else None
    if backing_file is not None:
        if "backing_fmt" not in opts:
            raise RequestError("Backing file specified without backing format", path=path)
        if not unsafe:
            parent_size = _backing_size(path, backing_file, opts["backing_fmt"].value)
            if "size" not in opts:
                opts["size"] = ParsedOpt(str(parent_size), parent_size)
    if "size" not in opts:
        raise RequestError("Image creation needs a size parameter", path=path)
    if not quiet:
        click.echo(formatting_line(path, fmt, opts))
    _validate_values(fmt, opts, path)
    kwargs = {
        desc.kwarg: opts[desc.name].value
        for desc in create_opts(fmt)
        if desc.kwarg is not None and desc.name in opts
    }
    vdisk.create(path, opts["size"].value, format=fmt, **kwargs)
    return 0


@click.command("info")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("--backing-chain", "chain", is_flag=True, help="Show every image of the chain.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.argument("file")
def info_cmd(fmt: str | None, output: str, chain: bool, force_share: bool, file: str) -> int:
    """Show information about the image FILE, like qemu-img info."""
    from .. import info

    if output not in ("human", "json"):
        raise click.UsageError("--output must be used with human or json as argument.")
    if fmt is not None and fmt not in _FORMAT_OPTS:
        raise UnsupportedFeatureError(f"Unknown file format '{fmt}'", path=file)
    infos = list(info.chain_info(file, fmt)) if chain else [info.image_info(file, fmt)]
    click.echo(info.render(infos, output, chain), nl=False)
    return 0


COMMANDS: list[click.Command] = [create_cmd, info_cmd]
