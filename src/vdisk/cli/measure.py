"""``vdisk measure``, as ``qemu-img measure``: the size a new image needs, from a size or
from an existing image; the arithmetic is ``vdisk.qcow2.measure``."""

from __future__ import annotations

from dataclasses import replace

import click

from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..sizes import parse_size, round_up_to_sector
from .options import QCOW2_PREALLOC, parse_opts


def _measure_opts(out_fmt: str, options: tuple[str, ...]) -> dict[str, object]:
    opts = {k: v.value for k, v in parse_opts(out_fmt, list(options), "").items()}
    if out_fmt != "qcow2":
        return opts
    cs = opts.get("cluster_size", 65536)
    assert isinstance(cs, int)
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise RequestError("Cluster size must be a power of two between 512 and 2048k")
    compat = opts.get("compat", "1.1")
    if compat not in ("0.10", "v2", "1.1", "v3"):
        raise RequestError(f"Invalid compatibility level: '{compat}'")
    bits = opts.get("refcount_bits", 16)
    assert isinstance(bits, int)
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise RequestError("Refcount width must be a power of two and may not exceed 64 bits")
    if compat in ("0.10", "v2") and bits != 16:
        raise RequestError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use compat=1.1 or greater)"
        )
    if opts.get("extended_l2") and cs < 16384:
        raise RequestError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    prealloc = opts.get("preallocation", "off")
    if prealloc not in QCOW2_PREALLOC:
        raise RequestError(f"invalid parameter value: {prealloc}")
    return opts


def _source_bitmaps(path: str) -> list[tuple[str, int]]:
    from ..qcow2.bitmap import read_directory

    return [(e.name, e.granularity) for e in read_directory(path)]


def _is_qcow2_v3(dev: object) -> bool:
    from ..qcow2 import Qcow2Image

    return isinstance(dev, Qcow2Image) and dev.header.version >= 3


@click.command("measure")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Target format (default: raw).")
@click.option(
    "-o", "options", multiple=True, metavar="OPTIONS", help="Target options key=value,..."
)
@click.option("--size", "size_text", metavar="SIZE", help="Measure a new image of SIZE bytes.")
@click.option("-f", "fmt", metavar="FMT", help="Input format (default: probe).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
@click.argument("files", nargs=-1)
def measure_cmd(
    output: str,
    out_fmt: str,
    options: tuple[str, ...],
    size_text: str | None,
    fmt: str | None,
    force_share: bool,
    files: tuple[str, ...],
) -> int:
    """Print the size a new image needs, like qemu-img measure."""
    import vdisk

    from ..qcow2 import measure as m

    if output not in ("human", "json"):
        raise click.UsageError("--output must be used with human or json as argument.")
    if len(files) > 1:
        raise click.UsageError(f"Unexpected argument: {files[1]}")
    path = files[0] if files else None
    if path is not None and size_text is not None:
        raise RequestError("--size N cannot be used together with a filename.")
    if path is None and fmt is not None:
        raise RequestError("--image-opts, -f, and -l require a filename argument.")
    if out_fmt not in vdisk.FORMATS:
        raise UnsupportedFeatureError(f"Block driver '{out_fmt}' does not support size measurement")
    vdisk.check_format(fmt, path)
    size = 0
    if size_text is not None:
        try:
            size = parse_size(size_text)
        except VdiskError:
            raise RequestError(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            ) from None
    opts = _measure_opts(out_fmt, options)
    if path is None and size_text is None:
        raise RequestError("Either --size N or one filename must be specified.")
    cs = opts.get("cluster_size", 65536)
    bits = opts.get("refcount_bits", 16)
    assert isinstance(cs, int) and isinstance(bits, int)
    v3 = opts.get("compat", "1.1") in ("1.1", "v3")
    data: int | None = None
    bitmaps: int | None = None
    if path is not None:
        kind = fmt or vdisk.probe_format(path)
        with vdisk.open(path, format=kind, readonly=True, force_share=force_share) as dev:
            # QEMU reports bitmaps only for a source that can hold persistent ones (qcow2 v3).
            source_has_bitmaps = _is_qcow2_v3(dev)
            # QEMU sees raw files rounded up to whole sectors.
            size = round_up_to_sector(dev.size) if kind == "raw" else dev.size
            if out_fmt == "qcow2":
                if opts.get("backing_file") is not None:
                    data = -(-size // cs) * cs
                else:
                    data = m.data_required(dev, dev.size, cs)
        if out_fmt == "qcow2" and v3 and source_has_bitmaps:
            bitmaps = m.bitmaps_size(_source_bitmaps(path), size, cs)
    if out_fmt == "qcow2":
        result = m.measure_qcow2(
            size,
            cluster_size=cs,
            refcount_bits=bits,
            extended_l2=bool(opts.get("extended_l2", False)),
            preallocation=str(opts.get("preallocation", "off")),
            required_data=data,
            bitmaps=bitmaps,
        )
        from ..qcow2.encryption import luks_area_size

        crypto = luks_area_size(opts, cs)
        if crypto:
            result = replace(
                result,
                required=result.required + crypto,
                fully_allocated=result.fully_allocated + crypto,
            )
    else:
        result = m.measure_raw(size)
    if output == "json":
        lines = []
        if result.bitmaps is not None:
            lines.append(f'    "bitmaps": {result.bitmaps}')
        lines.append(f'    "required": {result.required}')
        lines.append(f'    "fully-allocated": {result.fully_allocated}')
        click.echo("{\n" + ",\n".join(lines) + "\n}")
    else:
        click.echo(f"required size: {result.required}")
        click.echo(f"fully allocated size: {result.fully_allocated}")
        if result.bitmaps is not None:
            click.echo(f"bitmaps size: {result.bitmaps}")
    return 0


COMMANDS: tuple[click.Command, ...] = (measure_cmd,)
