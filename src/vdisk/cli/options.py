"""Option parsing shared by the commands, as qemu-img spells and checks it.

``-o`` takes comma-separated ``key=value`` pairs (``,,`` is a literal comma), may repeat (later
values win), and ``-o help`` / ``-o ?`` lists the options. The ``Formatting ...`` line lists
options in QEMU's own order (the order of the format's option table followed by the host
file's), with QEMU's defaults filled in. Also here: ``cvtnum`` (qemu-img's size operands), the
``--output`` check and offset operands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import click

from ..errors import RequestError, VdiskError
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
    OptDesc("data_file", "str", "File name of an external data file", None, "data_file"),
    OptDesc(
        "data_file_raw",
        "bool",
        "The external data file must stay valid as a raw image",
        None,
        "data_file_raw",
    ),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off", "lazy_refcounts"),
    OptDesc(
        "refcount_bits", "num", "Width of a reference count entry in bits", "16", "refcount_bits"
    ),
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
FORMAT_OPTS = {"qcow2": _QCOW2_OPTS, "raw": _RAW_OPTS}

_TYPE_NAMES = {"size": "size", "num": "num", "bool": "bool (on/off)", "str": "str"}
_BOOL_VALUES = {"on": True, "yes": True, "true": True, "y": True,
                "off": False, "no": False, "false": False, "n": False}  # fmt: skip
_COMPAT_VALUES = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
QCOW2_PREALLOC = ("off", "metadata", "falloc", "full")
_RAW_PREALLOC = ("off", "falloc", "full")
_COMPRESSION_TYPES = ("zlib", "zstd")


def create_opts(fmt: str) -> tuple[OptDesc, ...]:
    """The merged option table for ``fmt``: the format's, then the host file's (no duplicates)."""
    table = list(FORMAT_OPTS[fmt])
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
    table = create_opts(fmt) if with_protocol else FORMAT_OPTS[fmt]
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


def validate_values(fmt: str, opts: dict[str, ParsedOpt], path: str) -> None:
    """Enumerated string options, rejected with QEMU's wording (after the Formatting line)."""
    if "compat" in opts and opts["compat"].raw not in _COMPAT_VALUES:
        raise RequestError(
            f"Parameter 'version' does not accept value '{opts['compat'].raw}'", path=path
        )
    allowed_prealloc = QCOW2_PREALLOC if fmt == "qcow2" else _RAW_PREALLOC
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


# -- other operands ------------------------------------------------------------------------------

INT64_MAX = (1 << 63) - 1
_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# qemu_strtosz: decimal (a fraction only with a suffix above bytes) or hex, one suffix letter.
_NUM_RE = re.compile(r"^\s*(?:(0x[0-9a-f]+)|(\d+(?:\.\d*)?|\.\d+))([bkmgtpe]?)$", re.IGNORECASE)


def cvtnum(name: str, text: str, low: int = 0, high: int = INT64_MAX) -> int:
    """A size operand as qemu-img's cvtnum_full parses it, with its error messages."""
    m = _NUM_RE.match(text)
    value: int | None = None
    if m is not None:
        hexa, dec, suffix = m.groups()
        shift = _SHIFTS[suffix.lower()] if suffix else 0
        if hexa is not None:
            value = int(hexa, 16) << shift
        elif "." not in dec:
            value = int(dec) << shift
        elif shift:  # qemu truncates the fractional bytes
            whole, _, frac = dec.partition(".")
            value = (int(whole or "0") << shift) + int(float("0." + (frac or "0")) * (1 << shift))
    if value is None:
        raise RequestError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    if not low <= value <= high:
        raise RequestError(f"Invalid {name} specified. Must be between {low} and {high}.")
    return value


def check_output(output: str) -> None:
    """``--output`` takes human or json."""
    if output not in ("human", "json"):
        raise click.UsageError("--output must be used with human or json as argument.")


def parse_offset(text: str, what: str) -> int:
    """An offset or length operand (``map -s/-l``), with qemu-img's message."""
    try:
        return parse_size(text)
    except VdiskError:
        raise RequestError(f"Invalid {what} specified") from None
