"""The ``qemu-img map`` engine: the allocation of an image and its backing chain, as entries.

The chain is opened one image at a time (each without its own backing file), so that depth,
presence and file names come out exactly as qemu-img's ``get_block_status`` reports them;
entries are then merged by qemu-img's rules. Devices are asked only through ``block_status``
and two named qcow2 queries (``metadata_preallocated``, ``reserved_host_runs``). Printing is
the CLI's (``vdisk.cli.map``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .block import BlockDevice, Extent
from .errors import VdiskError
from .filenames import resolve_backing
from .info import display_name
from .record import replace  # for Extent (a record) and MapEntry (a dataclass) alike
from .sizes import round_up_to_sector

if TYPE_CHECKING:
    from .qcow2 import Qcow2Image

PROBE = 1 << 30  # qemu-img map probes up to 1 GiB at a time
MAX_CHAIN = 64


@dataclass(frozen=True)
class MapEntry:
    """One ``qemu-img map`` entry."""

    start: int
    length: int
    data: bool
    zero: bool
    present: bool
    depth: int
    offset: int | None = None  # host offset, when QEMU has one (BDRV_BLOCK_OFFSET_VALID)
    filename: str | None = None


class ChainLevel:
    """One image of a backing chain, opened without its own backing file."""

    def __init__(
        self, dev: BlockDevice, name: str, image: Qcow2Image | None, force_share: bool = False
    ) -> None:
        self.dev = dev
        self.name = name
        self.image = image  # the qcow2 image, None for a raw file
        self.raw = image is None  # raw files have a host offset everywhere, holes included
        # QEMU sees a raw file's size rounded up to whole sectors (the tail reads as zeros).
        self.size = round_up_to_sector(dev.size) if self.raw else dev.size
        # A metadata-preallocated image's data clusters may be host holes: QEMU reports those
        # as zero, so keep the file itself at hand to ask it.
        self.host: BlockDevice | None = None
        data_file = image.data_file if image is not None else None
        if data_file is not None:  # data clusters are in the data file
            self.name = data_file
        if image is not None and image.metadata_preallocated():
            from .backends.raw import RawDevice

            self.host = RawDevice(self.name, readonly=True, force_share=force_share)

    def close(self) -> None:
        self.dev.close()
        if self.host is not None:
            self.host.close()


def open_chain(path: str, fmt: str | None, force_share: bool = False) -> list[ChainLevel]:
    """Open ``path`` and each backing file separately, top first (``force_share``: -U)."""
    import vdisk

    from .qcow2 import Qcow2Image

    levels: list[ChainLevel] = []
    name, cur_fmt = path, fmt
    try:
        while True:
            if len(levels) > MAX_CHAIN:
                raise VdiskError(f"backing chain deeper than {MAX_CHAIN}", path=path)
            kind = cur_fmt or vdisk.probe_format(name)
            vdisk.check_format(kind, name)
            if kind != "qcow2":
                dev = vdisk.open(name, format="raw", readonly=True, force_share=force_share)
                levels.append(ChainLevel(dev, display_name(name), None))
                break
            img = Qcow2Image.open(
                name, readonly=True, open_backing=False, force_share=force_share
            )
            levels.append(ChainLevel(img, name, img, force_share))
            backing = img.header.backing_file
            if not backing:
                break
            name, cur_fmt = resolve_backing(name, backing), img.header.backing_format
    except BaseException:
        close_chain(levels)
        raise
    return levels


def close_chain(levels: list[ChainLevel]) -> None:
    for level in levels:
        level.close()


def _split_by_host(level: ChainLevel, e: Extent) -> list[Extent]:
    """A data extent of a metadata-preallocated image, split where the host file has holes."""
    host = level.host
    assert host is not None and e.host_offset is not None
    out: list[Extent] = []
    pos, end = e.host_offset, e.host_offset + e.length
    inside = max(0, min(end, host.size) - pos)
    if inside:
        for h in host.block_status(pos, inside):
            zero = h.zero and not h.data
            start = e.offset + h.offset - e.host_offset
            out.append(replace(e, offset=start, length=h.length, zero=zero, host_offset=h.offset))
    if inside < e.length:  # past the end of the file: reads as zeros
        rest, tail = e.length - inside, e.offset + inside
        out.append(replace(e, offset=tail, length=rest, zero=True, host_offset=pos + inside))
    return out


def _present_entries(level: ChainLevel, d: int, e: Extent) -> Iterator[MapEntry]:
    parts = [e]
    if level.host is not None and e.data and not e.zero and e.host_offset is not None:
        parts = _split_by_host(level, e)
    for p in parts:
        host = p.offset if level.raw else p.host_offset
        name = level.name if host is not None else None
        yield MapEntry(p.offset, p.length, p.data, p.zero, True, d, host, name)


def _chain_entries(
    levels: list[ChainLevel], d: int, offset: int, length: int
) -> Iterator[MapEntry]:
    """Entries of [offset, offset+length) as seen from level ``d`` down."""
    level = levels[d]
    below = levels[d + 1] if d + 1 < len(levels) else None
    real = max(0, min(length, level.dev.size - offset))
    if real < length:  # a raw file's partial last sector: zeros, with a host offset
        tail = offset + real
        if real:
            yield from _chain_entries(levels, d, offset, real)
        yield MapEntry(tail, length - real, False, True, True, d, tail, level.name)
        return
    for e in level.dev.block_status(offset, length):
        if e.present or level.raw:  # raw data (a file, an NBD export) has no holes below it
            yield from _present_entries(level, d, e)
            continue
        inside = 0 if below is None else max(0, min(e.end, below.size) - e.offset)
        if inside:
            yield from _chain_entries(levels, d + 1, e.offset, inside)
        if e.length > inside:
            start, rest = e.offset + inside, e.length - inside
            pieces: list[tuple[int, int, int | None]] = [(start, rest, None)]
            if level.image is not None and level.image.header.extended_l2:
                pieces = level.image.reserved_host_runs(start, rest)
            for piece_start, n, host_off in pieces:
                name = level.name if host_off is not None else None
                yield MapEntry(piece_start, n, False, True, False, d, host_off, name)


def _mergeable(cur: MapEntry, nxt: MapEntry) -> bool:
    if cur.length == 0:
        return False
    if (cur.zero, cur.data, cur.depth, cur.present, cur.filename, cur.offset is None) != (
        nxt.zero,
        nxt.data,
        nxt.depth,
        nxt.present,
        nxt.filename,
        nxt.offset is None,
    ):
        return False
    return cur.offset is None or nxt.offset == cur.offset + cur.length


def map_entries(
    levels: list[ChainLevel], start: int, end: int, fold_unmapped: bool = False
) -> Iterator[MapEntry]:
    """Merged entries of [start, end) of the chain, in order; the last may be empty.

    ``fold_unmapped`` (the human format, which does not tell zero from unallocated) makes
    every entry after the first that is zero or holds no data a plain zero one, so that
    such runs coalesce as qemu-img's do."""
    cur = MapEntry(start, 0, False, False, False, 0)
    pos = start
    while pos < end:
        n = min(PROBE, end - pos)
        for nxt in _chain_entries(levels, 0, pos, n):
            if _mergeable(cur, nxt):
                cur = replace(cur, length=cur.length + nxt.length)
                continue
            if cur.length > 0:
                yield cur
                if fold_unmapped and (not nxt.data or nxt.zero):
                    nxt = replace(nxt, data=False, zero=True)
            cur = nxt
        pos += n
    yield cur
