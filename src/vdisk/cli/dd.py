"""``vdisk dd``, as ``qemu-img dd``: copy an image into a new one, with dd(1)-style operands.

qemu-img's quirks kept on purpose: ``count`` limits the input size *before* ``skip`` is taken
off it (so ``count=2 skip=1`` copies one block), a ``skip`` past the end only warns and leaves
an empty output (exit status 0), and new images are sized in whole 512-byte sectors, as QEMU
creates them. Raw inputs are sized as QEMU sees them: rounded up to whole sectors.
"""

from __future__ import annotations

import click

from ..block import BlockDevice, SectorPadded
from ..errors import RequestError, UnsupportedFeatureError
from ..sizes import round_up_to_sector
from .options import INT64_MAX, cvtnum

_INT_MAX = (1 << 31) - 1
_CHUNK = 1 << 20  # copy in large pieces: the bytes written are the same as bs-sized ones


@click.command("dd", context_settings={"ignore_unknown_options": False})
@click.option("-f", "fmt", metavar="FMT", help="Input format (default: probe).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (raw, qcow2).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
@click.argument("operands", nargs=-1, metavar="[bs=N] [count=N] [skip=N] if=IN of=OUT")
def dd_cmd(fmt: str | None, out_fmt: str, force_share: bool, operands: tuple[str, ...]) -> int:
    """Copy IN into a new image OUT (of format -O), like qemu-img dd."""
    import vdisk

    bs, count, skip = 512, None, None
    src = dst = None
    for operand in operands:
        key, eq, value = operand.partition("=")
        if not eq or key not in ("bs", "count", "if", "of", "skip"):
            raise RequestError(f"unrecognized operand {key}")
        if key == "bs":
            bs = cvtnum("bs", value, 1, _INT_MAX)
        elif key == "count":
            count = cvtnum("count", value)
        elif key == "skip":
            skip = cvtnum("skip", value)
        elif key == "if":
            src = value
        else:
            dst = value
    if src is None or dst is None:
        raise RequestError("Must specify both input and output files")
    if fmt is not None and fmt not in vdisk.FORMATS:
        raise UnsupportedFeatureError(f"Could not open '{src}': Unknown driver '{fmt}'")
    source = vdisk.open(src, format=fmt, readonly=True, force_share=force_share)
    try:
        from ..backends.raw import RawDevice

        inp: BlockDevice | SectorPadded = source
        if isinstance(source, RawDevice):
            inp = SectorPadded(source)
        if out_fmt not in vdisk.FORMATS:
            raise UnsupportedFeatureError("Unknown file format")
        size = inp.size
        if count is not None and count <= INT64_MAX // bs and count * bs < size:
            size = count * bs
        beyond = skip is not None and (skip > INT64_MAX // bs or size < skip * bs)
        start = size if beyond else (skip or 0) * bs
        out_size = size - start
        vdisk.create(dst, round_up_to_sector(out_size), format=out_fmt)
        with vdisk.open(dst, format=out_fmt) as target:
            if beyond:  # like dd(1): a warning and an empty output, not a failure
                click.echo(f"vdisk: {src}: cannot skip to specified offset", err=True)
            buf = bytearray(min(_CHUNK, max(out_size, 1)))
            pos = start
            while pos < size:
                n = min(len(buf), size - pos)
                view = memoryview(buf)[:n]
                inp.readinto(view, pos)
                target.write(view, pos - start)
                pos += n
            target.flush()
    finally:
        source.close()
    return 0


COMMANDS: tuple[click.Command, ...] = (dd_cmd,)
