"""``vdisk amend``: qemu-img amend's flags, option checks and messages; the work is
``vdisk.qcow2.amend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import RequestError, UnsupportedFeatureError
from ..sizes import parse_size
from .options import split_opts

if TYPE_CHECKING:
    from ..qcow2.amend import AmendOptions

# qemu-img amend -o help for qcow2, in its order: (name, type shown, help).
_AMEND_OPTS = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    (
        "encrypt.new-secret",
        "str",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    ("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    ("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)
_AMEND_TYPES = {name: kind for name, kind, _ in _AMEND_OPTS}
# Options qemu-img create takes that amend refuses as creation-only.
_CREATE_ONLY = {
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.key-secret",
}
_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
_BOOLS = {"on": True, "off": False}


def amend_help() -> str:
    lines = ["Amend options for 'qcow2':"]
    for name, kind, text in _AMEND_OPTS:
        lines.append(f"{f'  {name}=<{kind}>':<24} - {text}")
    return "\n".join(lines)


def _bool(name: str, value: str) -> bool:
    if value not in _BOOLS:
        raise RequestError(f"Parameter '{name}' expects 'on' or 'off'")
    return _BOOLS[value]


def parse_amend_opts(options: tuple[str, ...]) -> dict[str, str]:
    """``-o`` strings -> name: value (later values win), refusing what qemu-img amend refuses."""
    values: dict[str, str] = {}
    for text in options:
        for item in split_opts(text):
            name, sep, value = item.partition("=")
            if name in _CREATE_ONLY:
                raise RequestError(
                    f"Invalid parameter '{name}'. This option is only supported for image creation"
                )
            if name not in _AMEND_TYPES:
                raise RequestError(f"Invalid parameter '{name}'")
            if not sep:
                value = "on" if _AMEND_TYPES[name].startswith("bool") else ""
            values[name] = value
    return values


def build_request(values: dict[str, str]) -> AmendOptions:
    """The library's AmendOptions from the parsed ``-o`` values."""
    from ..qcow2.amend import AmendOptions

    opts = AmendOptions()
    if "compat" in values:
        opts.compat = _COMPAT.get(values["compat"], values["compat"])
    if "lazy_refcounts" in values:
        opts.lazy_refcounts = _bool("lazy_refcounts", values["lazy_refcounts"])
    if "refcount_bits" in values:
        try:
            opts.refcount_bits = int(values["refcount_bits"], 0)
        except ValueError:
            raise RequestError("Parameter 'refcount_bits' expects a number") from None
    if "backing_file" in values:
        opts.backing_file = values["backing_file"] or None
    if "backing_fmt" in values:
        opts.backing_fmt = values["backing_fmt"]
    if "size" in values:
        opts.size = parse_size(values["size"])
    if "data_file" in values:
        opts.data_file = values["data_file"]
    if "data_file_raw" in values:
        opts.data_file_raw = _bool("data_file_raw", values["data_file_raw"])
    opts.encrypt = {k[len("encrypt.") :]: v for k, v in values.items() if k.startswith("encrypt.")}
    if opts.encrypt:
        from .options import SECRETS

        opts.secrets = SECRETS
    return opts


@click.command("amend")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Options to change.")
@click.option("-f", "fmt", metavar="FMT", help="Image format (qcow2).")
@click.option("--force", is_flag=True, help="Allow changes QEMU guards with --force.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-t", "cache", metavar="CACHE", help="Accepted (cache mode of FILE).")
@click.argument("file", required=False)
def amend_cmd(
    options: tuple[str, ...],
    fmt: str | None,
    force: bool,
    progress: bool,
    quiet: bool,
    cache: str | None,
    file: str | None,
) -> int:
    """Change the format-specific options of the image FILE, like qemu-img amend."""
    import vdisk

    from ..qcow2.amend import amend
    from .progress import Progress

    if not options:
        raise click.UsageError("Must specify options (-o)\nTry 'vdisk --help' for more information")
    vdisk.check_format(fmt, file)
    if any(item in ("help", "?") for text in options for item in split_opts(text)):
        if fmt not in (None, "qcow2"):
            raise UnsupportedFeatureError(
                f"Format driver '{fmt}' does not support option amendment"
            )
        click.echo(amend_help())
        return 0
    if file is None:
        raise click.UsageError(
            "Expecting one image file name\nTry 'vdisk --help' for more information"
        )
    image_fmt = fmt or vdisk.probe_format(file)
    if image_fmt != "qcow2" or vdisk.is_uri(file):
        raise UnsupportedFeatureError(
            f"Format driver '{image_fmt}' does not support option amendment"
        )
    request = build_request(parse_amend_opts(options))
    show = Progress() if progress and not quiet else None
    if show is not None:
        show(0, 1)
    amend(file, request, progress=show)
    if show is not None:
        show.close()
    return 0


COMMANDS: tuple[click.Command, ...] = (amend_cmd,)
