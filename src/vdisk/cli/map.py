"""``vdisk map``: qemu-img map's flags and its two output formats; the walk is ``vdisk.map``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import VdiskError
from .options import check_output, parse_offset

if TYPE_CHECKING:
    from ..map import ChainLevel, MapEntry

_FLUSH_LINES = 4096  # print in batches: a large image has many entries


def _hex(n: int) -> str:
    return "0" if n == 0 else f"{n:#x}"  # C's %#x prints a bare 0


def _json_entry(e: MapEntry) -> str:
    def b(v: bool) -> str:
        return "true" if v else "false"

    text = (
        f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
        f' "present": {b(e.present)}, "zero": {b(e.zero)}, "data": {b(e.data)}'
    )
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


@click.command("map")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-s", "--start-offset", "start_offset", metavar="N", help="First byte to map.")
@click.option("-l", "--max-length", "max_length", metavar="N", help="Bytes to map at most.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
@click.argument("file")
def map_cmd(
    fmt: str | None,
    output: str,
    start_offset: str | None,
    max_length: str | None,
    force_share: bool,
    file: str,
) -> int:
    """Print the allocation map of FILE (and its backing chain), like qemu-img map."""
    import vdisk

    from ..map import close_chain, open_chain

    check_output(output)
    start = 0 if start_offset is None else parse_offset(start_offset, "start offset")
    limit = None if max_length is None else parse_offset(max_length, "max length")
    vdisk.check_format(fmt, file)
    levels = open_chain(file, fmt, force_share)
    try:
        end = levels[0].size if limit is None else min(start + limit, levels[0].size)
        _print_map(levels, start, end, human=output == "human")
    finally:
        close_chain(levels)
    return 0


def _print_map(levels: list[ChainLevel], start: int, end: int, human: bool) -> None:
    from ..map import map_entries

    out: list[str] = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n" if human else "["]

    def flush() -> None:
        if out:
            click.echo("".join(out), nl=False)
            out.clear()

    first = True
    for e in map_entries(levels, start, end, fold_unmapped=human):
        if human:
            if e.data and e.offset is None:
                flush()
                raise VdiskError("File contains external, encrypted or compressed clusters.")
            if e.data and not e.zero:
                out.append(
                    f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                    f"{e.filename or ''}\n"
                )
        else:
            out.append(("" if first else ",\n") + _json_entry(e))
        first = False
        if len(out) > _FLUSH_LINES:
            flush()
    if not human:
        out.append("]\n")
    flush()


COMMANDS: tuple[click.Command, ...] = (map_cmd,)
