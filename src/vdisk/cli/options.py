"""Option parsing shared by the commands, as qemu-img spells and checks it.

``-o`` takes comma-separated ``key=value`` pairs (``,,`` is a literal comma), may repeat (later
values win), and ``-o help`` / ``-o ?`` lists the options. The ``Formatting ...`` line lists
options in QEMU's own order (the order of the format's option table followed by the host
file's), with QEMU's defaults filled in. Also here: ``cvtnum`` (qemu-img's size operands), the
``--output`` check and offset operands; ``--object secret,...`` and ``--image-opts`` /
``--target-image-opts`` (one parser each, added to every command that reads an image).
"""

from __future__ import annotations

import re
import sys
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
    OptDesc(
        "encryption",
        "bool",
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
        "encryption",
    ),
    OptDesc(
        "encrypt.format",
        "str",
        "Encrypt the image, format choices: 'aes', 'luks'",
        None,
        "encrypt_format",
    ),
    OptDesc(
        "encrypt.key-secret",
        "secret",
        "ID of secret providing qcow AES key or LUKS passphrase",
        None,
        "passphrase",
    ),
    OptDesc("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm", None, "cipher_alg"),
    OptDesc("encrypt.cipher-mode", "str", "Name of encryption cipher mode", None, "cipher_mode"),
    OptDesc("encrypt.ivgen-alg", "str", "Name of IV generator algorithm", None, "ivgen_alg"),
    OptDesc(
        "encrypt.ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
        None,
        "ivgen_hash_alg",
    ),
    OptDesc("encrypt.hash-alg", "str", "Name of encryption hash algorithm", None, "hash_alg"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds", None, "iter_time"),
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

_TYPE_NAMES = {
    "size": "size",
    "num": "num",
    "bool": "bool (on/off)",
    "str": "str",
    "secret": "str",
}
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
    secret = parsed.get("encrypt.key-secret")
    if secret is not None:
        # The new image opens with the same secret later in the command (convert's target).
        from ..qcow2.encryption import register_passphrase

        register_passphrase(path, secret.value)
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
    if desc.type == "secret":
        return secret(raw)
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
        elif desc.type in ("str", "secret"):
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


# -- secrets and --image-opts ----------------------------------------------------------------------

SECRETS: dict[str, bytes] = {}  # --object secret,id=ID,...: like QEMU's objects, per process


def parse_object(text: str) -> tuple[str, bytes]:
    """``secret,id=ID,data=D|file=PATH[,format=raw|base64]`` -> (ID, the secret's bytes)."""
    items = split_opts(text)
    if not items or items[0] != "secret":
        kind = items[0] if items else ""
        raise RequestError(f"Invalid object type '{kind}' (only 'secret' objects are supported)")
    props: dict[str, str] = {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise RequestError(f"Invalid object parameter '{item}': expected key=value")
        props[key.removeprefix("qom-type.")] = value
    ident = props.pop("id", None)
    if not ident:
        raise RequestError("Parameter 'id' is missing")
    data, path = props.pop("data", None), props.pop("file", None)
    form = props.pop("format", "raw")
    if props:
        raise RequestError(f"Invalid parameter '{sorted(props)[0]}'")
    if (data is None) == (path is None):
        raise RequestError("'file' and 'data' are mutually exclusive, and one is needed")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as exc:
            raise RequestError(f"Unable to read {path}: {exc.strerror}") from None
    else:
        assert data is not None
        raw = data.encode()
    if form == "base64":
        import base64
        import binascii

        try:
            raw = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise RequestError(f"secret {ident}: invalid base64 data") from None
    elif form != "raw":
        raise RequestError(f"Parameter 'format' does not accept value '{form}'")
    return ident, raw


def secret(ident: str) -> bytes:
    if ident not in SECRETS:
        raise RequestError(f"No secret with id '{ident}' found")
    return SECRETS[ident]


def parse_image_opts(text: str) -> tuple[str, str | None]:
    """``driver=qcow2,file.filename=F,encrypt.key-secret=ID``: (F, driver). The secret is
    registered for F, so that every open of F in this command uses it."""
    props: dict[str, str] = {}
    for item in split_opts(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise RequestError(f"Invalid image option '{item}': expected key=value")
        props[key] = value
    filename = props.pop("file.filename", None) or props.pop("filename", None)
    props.pop("file.driver", None)
    if not filename:
        raise RequestError(f"--image-opts '{text}': file.filename is missing")
    driver = props.pop("driver", None)
    ident = props.pop("encrypt.key-secret", None)
    if props:
        raise RequestError(f"--image-opts: unsupported option(s) {', '.join(sorted(props))}")
    if ident is not None:
        from ..qcow2.encryption import register_passphrase

        register_passphrase(filename, secret(ident))
    return filename, driver


# command -> (image parameter, which of its values are images, format parameters)
_IMAGE_PARAMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "bench": ("files", "first", ("fmt",)),
    "check": ("file", "one", ("fmt",)),
    "commit": ("file", "one", ("fmt",)),
    "compare": ("files2", "one", ("fmt1", "fmt2")),
    "convert": ("files", "all_but_last", ("fmt",)),
    "info": ("file", "one", ("fmt",)),
    "map": ("file", "one", ("fmt",)),
    "measure": ("files", "all", ("fmt",)),
    "rebase": ("file", "one", ("fmt",)),
    "resize": ("args", "first", ("fmt",)),
    "amend": ("file", "one", ("fmt",)),
    "dd": ("operands", "if_operand", ("fmt",)),  # the if=... operand
    "nbd": ("files", "all", ("fmt",)),
    "ublk add": ("file", "one", ()),  # -t names the driver; a driver= must agree with it
}


def add_secret_options(name: str, command: click.Command) -> None:
    """Give ``command`` qemu-img's ``--object`` and, where it reads images, ``--image-opts``
    (convert: ``--target-image-opts`` too). Idempotent."""
    if name == "ublk" and isinstance(command, click.Group):
        # The group takes no image; its ``add`` subcommand does.
        add_secret_options("ublk add", command.commands["add"])
        return
    if getattr(command, "_vdisk_secret_options", False) or command.callback is None:
        return
    command._vdisk_secret_options = True  # type: ignore[attr-defined]
    command.params.append(
        click.Option(["--object", "objects"], multiple=True, metavar="OBJECTDEF",
                     help="secret,id=ID,data=...|file=PATH[,format=raw|base64]")
    )  # fmt: skip
    spec = _IMAGE_PARAMS.get(name)
    if spec is not None:
        command.params.append(
            click.Option(["--image-opts", "image_opts"], is_flag=True,
                         help="Image operands are option strings (driver=...,file.filename=...).")
        )  # fmt: skip
    if name == "convert":
        command.params.append(
            click.Option(["--target-image-opts", "target_image_opts"], is_flag=True,
                         help="The target is an option string (needs -n).")
        )  # fmt: skip
    callback = command.callback

    def wrapped(**kwargs: Any) -> Any:
        # Secrets live for one command (main() may run several in one process).
        SECRETS.clear()
        loaded = sys.modules.get("vdisk.qcow2.encryption")
        if loaded is not None:
            loaded.forget_passphrases()
        for text in kwargs.pop("objects", ()):
            ident, value = parse_object(text)
            SECRETS[ident] = value
        image_opts = kwargs.pop("image_opts", False)
        target_opts = kwargs.pop("target_image_opts", False)
        if spec is not None and image_opts:
            drivers = _apply_image_opts(kwargs, spec)
            if name == "ublk add" and drivers and drivers[0] not in (None, kwargs["kind"]):
                raise RequestError(
                    f"--image-opts driver={drivers[0]} does not match -t {kwargs['kind']}"
                )
        if target_opts:
            *rest, dst = kwargs["files"]
            target, driver = parse_image_opts(dst)
            kwargs["files"] = (*rest, target)
            if driver is not None:
                kwargs["out_fmt"] = driver
        return callback(**kwargs)

    command.callback = wrapped


def _apply_image_opts(
    kwargs: dict[str, Any], spec: tuple[str, str, tuple[str, ...]]
) -> list[str | None]:
    """Replace the image operands in ``kwargs`` by their file names (registering their
    secrets); set the format parameters from ``driver=``. Returns the drivers given."""
    param, which, fmt_params = spec
    if any(kwargs.get(f) for f in fmt_params):
        raise RequestError("--image-opts and --format are mutually exclusive")
    names = [param] if param != "files2" else ["file1", "file2"]
    drivers: list[str | None] = []
    for name in names:
        value = kwargs[name]
        if value is None:  # ublk add without -f: open_backend says what is missing
            continue
        if isinstance(value, str):
            value, driver = parse_image_opts(value)
            drivers.append(driver)
        elif which == "if_operand":
            items = list(value)
            for i, item in enumerate(items):
                if item.startswith("if="):
                    filename, driver = parse_image_opts(item[len("if=") :])
                    items[i] = f"if={filename}"
                    drivers.append(driver)
            value = tuple(items)
        else:
            items = list(value)
            count = {"first": min(1, len(items)), "all": len(items)}.get(which, len(items) - 1)
            for i in range(count):
                items[i], driver = parse_image_opts(items[i])
                drivers.append(driver)
            value = tuple(items)
        kwargs[name] = value
    for f, driver in zip(fmt_params, drivers * len(fmt_params), strict=False):
        if driver is not None:
            kwargs[f] = driver
    return drivers
