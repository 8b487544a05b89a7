"""qemu-img-compatible image tools: ``map``, ``compare``, ``check`` and ``convert``.

``map`` walks the backing chain one image at a time (each opened without its backing file), so
that depth, presence and file names come out exactly as qemu-img's ``get_block_status`` reports
them, then merges entries with qemu-img's rules. ``compare`` skips what both sides know to be
zero and compares the rest in large chunks, reporting the first differing 512-byte sector.
``check`` and ``convert`` parse flags and print; the work is in ``vdisk.qcow2.check`` and
``vdisk.convert``. Raw files are sized as QEMU sees them: rounded up to whole sectors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import click
import numpy as np

from ..block import BlockDevice, Extent
from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from ..sizes import parse_size

if TYPE_CHECKING:
    from ..convert import Source as _Source
    from ..qcow2.check import CheckResult

_FORMATS = ("qcow2", "raw")
_PROBE = 1 << 30  # qemu-img map probes up to 1 GiB at a time
SECTOR = 512


def _check_format(fmt: str | None, path: str) -> None:
    if fmt is not None and fmt not in _FORMATS:
        raise UnsupportedFeatureError(f"Unknown file format '{fmt}'", path=path)


def _path_combine(base: str, name: str) -> str:
    """A backing file name as QEMU resolves it: relative to the overlay's directory as spelled."""
    if os.path.isabs(name):
        return name
    cut = base.rfind("/")
    return base[: cut + 1] + name if cut >= 0 else name


# -- map -------------------------------------------------------------------------------------


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


class _Level:
    """One image of a backing chain, opened without its own backing file."""

    def __init__(self, dev: BlockDevice, name: str, raw: bool) -> None:
        self.dev = dev
        self.name = name
        self.raw = raw  # raw files have a host offset everywhere, holes included
        # QEMU sees a raw file's size rounded up to whole sectors (the tail reads as zeros).
        self.size = -(-dev.size // SECTOR) * SECTOR if raw else dev.size
        self.host: BlockDevice | None = None  # the qcow2 file itself, for host-level holes
        if not raw:
            self.host = _metadata_preallocated(dev, name)

    def close(self) -> None:
        self.dev.close()
        if self.host is not None:
            self.host.close()


def _metadata_preallocated(dev: BlockDevice, name: str) -> BlockDevice | None:
    """The image file as a raw device if QEMU would take the image for metadata-preallocated.

    QEMU's test: more clusters carry a refcount than the file has blocks allocated (by a
    margin of 10%, at least 2). For such images it asks the file system which data clusters
    are holes and reports those as zero."""
    from ..backends.raw import RawDevice
    from ..qcow2 import Qcow2Image

    assert isinstance(dev, Qcow2Image)
    st = os.fstat(dev.fd)
    cs = dev.cluster_size
    real = st.st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end = (st.st_size + cs - 1) // cs
    used = 0
    for cluster in range(end):
        used += dev.refcounts.get(cluster) > 0
        if used > threshold:
            return RawDevice(name, readonly=True)
    return None


def _split_by_host(level: _Level, e: Extent) -> list[Extent]:
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
        out.append(
            replace(
                e,
                offset=e.offset + inside,
                length=e.length - inside,
                zero=True,
                host_offset=pos + inside,
            )
        )
    return out


def _unallocated_offsets(dev: BlockDevice, e: Extent) -> list[tuple[int, int, int | None]]:
    """(start, length, host offset or None) pieces of an unallocated range of an extended-L2
    image: subclusters of a cluster that has a host cluster keep an offset in QEMU's map."""
    from ..qcow2 import Qcow2Image
    from ..qcow2 import format as qfmt

    assert isinstance(dev, Qcow2Image)
    cs, cb = dev.cluster_size, dev.cluster_bits
    l2_bits = dev.header.l2_bits
    out: list[tuple[int, int, int | None]] = []
    pos = e.offset
    while pos < e.end:
        gc = pos >> cb
        table = dev.map.l2_table(gc >> l2_bits)
        if table is None:
            stop = min(e.end, ((gc >> l2_bits) + 1) << (l2_bits + cb))
            out.append((pos, stop - pos, None))
            pos = stop
            continue
        stop = min(e.end, (gc + 1) << cb)
        entry = table[2 * (gc & ((1 << l2_bits) - 1))]
        host = entry & qfmt.L2E_OFFSET_MASK
        if entry & qfmt.OFLAG_COMPRESSED or not host:
            out.append((pos, stop - pos, None))
        else:
            out.append((pos, stop - pos, host + (pos & (cs - 1))))
        pos = stop
    return out


def open_chain(path: str, fmt: str | None) -> list[_Level]:
    """Open ``path`` and each backing file separately, top first."""
    import vdisk

    from ..qcow2 import Qcow2Image

    levels: list[_Level] = []
    name, cur_fmt = path, fmt
    try:
        while True:
            if len(levels) > 64:
                raise VdiskError("backing chain deeper than 64", path=path)
            kind = cur_fmt or vdisk.probe_format(name)
            _check_format(kind, name)
            if kind == "qcow2":
                img = Qcow2Image.open(name, readonly=True, open_backing=False)
                levels.append(_Level(img, name, raw=False))
                backing = img.header.backing_file
                if not backing:
                    break
                name, cur_fmt = _path_combine(name, backing), img.header.backing_format
            else:
                levels.append(_Level(vdisk.open(name, format="raw", readonly=True), name, True))
                break
    except BaseException:
        for level in levels:
            level.close()
        raise
    return levels


def _chain_entries(levels: list[_Level], d: int, offset: int, length: int) -> Iterator[MapEntry]:
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
        if e.present:
            parts = [e]
            if level.host is not None and e.data and not e.zero and e.host_offset is not None:
                parts = _split_by_host(level, e)
            for p in parts:
                host = p.offset if level.raw else p.host_offset
                name = level.name if host is not None else None
                yield MapEntry(p.offset, p.length, p.data, p.zero, True, d, host, name)
            continue
        inside = 0 if below is None else max(0, min(e.end, below.size) - e.offset)
        if inside:
            yield from _chain_entries(levels, d + 1, e.offset, inside)
        if e.length > inside:
            rest = replace(e, offset=e.offset + inside, length=e.length - inside)
            pieces: list[tuple[int, int, int | None]] = [(rest.offset, rest.length, None)]
            if not level.raw and getattr(level.dev, "_extended", False):
                pieces = _unallocated_offsets(level.dev, rest)
            for start, n, host_off in pieces:
                name = level.name if host_off is not None else None
                yield MapEntry(start, n, False, True, False, d, host_off, name)


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


def _parse_offset(text: str, what: str) -> int:
    try:
        value = parse_size(text)
    except VdiskError:
        raise RequestError(f"Invalid {what} specified") from None
    return value


@click.command("map")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-s", "--start-offset", "start_offset", metavar="N", help="First byte to map.")
@click.option("-l", "--max-length", "max_length", metavar="N", help="Bytes to map at most.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
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
    if output not in ("human", "json"):
        raise click.UsageError("--output must be used with human or json as argument.")
    start = 0 if start_offset is None else _parse_offset(start_offset, "start offset")
    limit = None if max_length is None else _parse_offset(max_length, "max length")
    _check_format(fmt, file)
    levels = open_chain(file, fmt)
    try:
        return _run_map(levels, output, start, limit)
    finally:
        for level in levels:
            level.close()


def _run_map(levels: list[_Level], output: str, start: int, limit: int | None) -> int:
    length = levels[0].size
    if limit is not None:
        length = min(start + limit, length)
    human = output == "human"
    out: list[str] = []

    def flush() -> None:
        if out:
            click.echo("".join(out), nl=False)
            out.clear()

    def dump(e: MapEntry, nxt: MapEntry | None) -> MapEntry | None:
        """Emit ``e``; returns ``nxt`` as the caller must continue with it."""
        if human:
            if e.data and e.offset is None:
                flush()
                raise VdiskError("File contains external, encrypted or compressed clusters.")
            if e.data and not e.zero:
                out.append(
                    f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                    f"{e.filename or ''}\n"
                )
            # The human format does not tell zero from unallocated: fold them for coalescing.
            if nxt is not None and (not nxt.data or nxt.zero):
                nxt = replace(nxt, data=False, zero=True)
        else:
            out.append(_json_entry(e) + (",\n" if nxt is not None else ""))
        if len(out) > 4096:
            flush()
        return nxt

    out.append(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n" if human else "[")
    cur = MapEntry(start, 0, False, False, False, 0)
    pos = start
    while pos < length:
        n = min(_PROBE, length - pos)
        for nxt in _chain_entries(levels, 0, pos, n):
            if _mergeable(cur, nxt):
                cur = replace(cur, length=cur.length + nxt.length)
                continue
            if cur.length > 0:
                folded = dump(cur, nxt)
                assert folded is not None
                nxt = folded
            cur = nxt
        pos += n
    dump(cur, None)
    if not human:
        out.append("]\n")
    flush()
    return 0


# -- compare ---------------------------------------------------------------------------------

_CHUNK = 4 << 20  # bytes compared per read


class _CompareExit(Exception):
    """Ends ``compare`` with qemu-img's exit status after printing its message."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _SectorPadded:
    """A raw file as QEMU sizes it: rounded up to whole sectors, the tail reading as zeros."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.size = -(-dev.size // SECTOR) * SECTOR

    def readinto(self, buf: memoryview, offset: int) -> int:
        view = memoryview(buf).cast("B")
        real = max(0, min(len(view), self.dev.size - offset))
        if real:
            self.dev.readinto(view[:real], offset)
        view[real:] = bytes(len(view) - real)
        return len(view)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        real = max(0, min(length, self.dev.size - offset))
        out = self.dev.block_status(offset, real) if real else []
        if real < length:
            tail = offset + real
            out.append(Extent(tail, length - real, data=False, zero=True, host_offset=tail))
        return out


def _zero_map(dev: _Source, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """(start, end, known_zero) runs of [offset, offset+length)."""
    runs: list[tuple[int, int, bool]] = []
    for e in dev.block_status(offset, length):
        z = e.zero and not e.data
        if runs and runs[-1][2] == z and runs[-1][1] == e.offset:
            runs[-1] = (runs[-1][0], e.end, z)
        else:
            runs.append((e.offset, e.end, z))
    return runs


def _first_diff(a: np.ndarray, b: np.ndarray | None) -> int:
    """Index of the first differing byte (``b`` None: the first nonzero one), or -1."""
    mask = a != b if b is not None else a != 0
    if not mask.any():
        return -1
    return int(np.argmax(mask))


def _sector_of(chunk_start: int, index: int) -> int:
    return chunk_start + index // SECTOR * SECTOR


@click.command("compare")
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option("-s", "strict", is_flag=True, help="Strict mode: sizes and allocation must match.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print nothing, only set the exit status.")
@click.option("-p", "progress", is_flag=True, help="Accepted (no progress bar).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.argument("file1")
@click.argument("file2")
def compare_cmd(
    fmt1: str | None,
    fmt2: str | None,
    strict: bool,
    quiet: bool,
    progress: bool,
    force_share: bool,
    file1: str,
    file2: str,
) -> int:
    """Compare the contents of FILE1 and FILE2, like qemu-img compare (0 same, 1 differ)."""
    import vdisk

    def say(text: str) -> None:
        if not quiet:
            click.echo(text)

    devs: list[BlockDevice] = []
    try:
        try:
            for path, fmt in ((file1, fmt1), (file2, fmt2)):
                _check_format(fmt, path)
                devs.append(vdisk.open(path, format=fmt, readonly=True))
        except (VdiskError, OSError) as exc:
            click.echo(f"vdisk: {exc}", err=True)
            return 2
        from ..backends.raw import RawDevice

        a, b = (_SectorPadded(d) if isinstance(d, RawDevice) else d for d in devs)
        return _compare(a, b, file1, file2, strict, say)
    except _CompareExit as done:
        return done.status
    finally:
        for dev in devs:
            dev.close()


def _compare(
    a: _Source,
    b: _Source,
    name1: str,
    name2: str,
    strict: bool,
    say: Callable[[str], None],
) -> int:
    size1, size2 = a.size, b.size
    if strict and size1 != size2:
        say("Strict mode: Image size mismatch!")
        return 1
    common = min(size1, size2)
    buf1 = bytearray(_CHUNK)
    buf2 = bytearray(_CHUNK)

    def status(dev: _Source, name: str, off: int, n: int) -> list[tuple[int, int, bool]]:
        try:
            return _zero_map(dev, off, n)
        except VdiskError as exc:
            click.echo(f"vdisk: Sector allocation test failed for {name}: {exc}", err=True)
            raise _CompareExit(3) from None

    def read(dev: _Source, name: str, buf: bytearray, off: int, n: int) -> np.ndarray:
        view = memoryview(buf)[:n]
        try:
            dev.readinto(view, off)
        except VdiskError as exc:
            click.echo(f"vdisk: Error while reading offset {off} of {name}: {exc}", err=True)
            raise _CompareExit(4) from None
        return np.frombuffer(view, dtype=np.uint8)

    if strict:
        mismatch = _strict_mismatch(a, b, common)
        if mismatch is not None:
            say(f"Strict mode: Offset {mismatch} block status mismatch!")
            return 1
    pos = 0
    while pos < common:
        window = min(_PROBE, common - pos)
        runs1 = status(a, name1, pos, window)
        runs2 = status(b, name2, pos, window)
        i = j = 0
        while pos < runs1[-1][1]:
            while runs1[i][1] <= pos:
                i += 1
            while runs2[j][1] <= pos:
                j += 1
            end = min(runs1[i][1], runs2[j][1])
            z1, z2 = runs1[i][2], runs2[j][2]
            if z1 and z2:
                pos = end
                continue
            while pos < end:
                n = min(_CHUNK, end - pos)
                d1 = None if z1 else read(a, name1, buf1, pos, n)
                d2 = None if z2 else read(b, name2, buf2, pos, n)
                if d1 is None:
                    assert d2 is not None
                    idx = _first_diff(d2, None)
                else:
                    idx = _first_diff(d1, d2)
                if idx >= 0:
                    say(f"Content mismatch at offset {_sector_of(pos, idx)}!")
                    return 1
                pos += n
    if size1 != size2:
        say("Warning: Image size mismatch!")
        over, name = (a, name1) if size1 > size2 else (b, name2)
        while pos < over.size:
            window = min(_PROBE, over.size - pos)
            for start, end, z in status(over, name, pos, window):
                if z:
                    continue
                off = start
                while off < end:
                    n = min(_CHUNK, end - off)
                    idx = _first_diff(read(over, name, buf1, off, n), None)
                    if idx >= 0:
                        say(f"Content mismatch at offset {_sector_of(off, idx)}!")
                        return 1
                    off += n
            pos += window
    say("Images are identical.")
    return 0


def _strict_mismatch(a: _Source, b: _Source, common: int) -> int | None:
    """First offset where the two images' block status flags differ (qemu-img compare -s)."""

    def runs(dev: _Source, off: int, n: int) -> list[tuple[int, int, tuple[bool, ...]]]:
        raw = isinstance(dev, _SectorPadded)
        out: list[tuple[int, int, tuple[bool, ...]]] = []
        for e in dev.block_status(off, n):
            has_offset = raw or e.host_offset is not None
            zero = e.zero or (not e.present and not e.data)
            at_eof = e.end == dev.size
            out.append((e.offset, e.end, (zero, e.data, e.present, has_offset, at_eof)))
        return out

    pos = 0
    while pos < common:
        window = min(_PROBE, common - pos)
        r1, r2 = runs(a, pos, window), runs(b, pos, window)
        i = j = 0
        while i < len(r1) and j < len(r2):
            if r1[i][2] != r2[j][2]:
                return pos
            end = min(r1[i][1], r2[j][1])
            pos = end
            if r1[i][1] == end:
                i += 1
            if r2[j][1] == end:
                j += 1
    return None


# -- check -----------------------------------------------------------------------------------

# qemu-img prints the check report's keys in the order of its QDict's hash buckets.
_CHECK_KEYS = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)
_ALWAYS = ("check-errors", "filename", "format")


def check_json(result: CheckResult) -> str:
    """The report as ``qemu-img check --output=json`` prints it (zero counts left out)."""
    import json

    lines = []
    for key in _CHECK_KEYS:
        value = getattr(result, key.replace("-", "_"))
        if value or key in _ALWAYS:
            lines.append(f"    {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def check_human(r: CheckResult) -> str:
    """The report as ``qemu-img check`` prints it."""
    out = []
    if r.clean:
        out.append("No errors were found on the image.\n")
    else:
        if r.corruptions:
            out.append(
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            out.append(
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            out.append(f"\n{r.check_errors} internal errors have occurred during the check.\n")
    if r.total_clusters and r.allocated_clusters:
        out.append(
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{r.allocated_clusters * 100.0 / r.total_clusters:0.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:0.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / r.allocated_clusters:0.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        out.append(f"Image end offset: {r.image_end_offset}\n")
    return "".join(out)


@click.command("check")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-r", "repair", metavar="leaks|all", help="Repair leaks, or everything.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print only errors.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.argument("file")
def check_cmd(
    fmt: str | None, output: str, repair: str | None, quiet: bool, force_share: bool, file: str
) -> int:
    """Check a qcow2 image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 1 failed)."""
    import vdisk

    from ..qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckFailed, check_and_repair

    if output not in ("human", "json"):
        raise click.UsageError("--output must be used with human or json as argument.")
    fix = 0
    if repair is not None:
        if repair not in ("leaks", "all"):
            raise RequestError(
                f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}"
            )
        fix = FIX_LEAKS if repair == "leaks" else FIX_LEAKS | FIX_ERRORS
    _check_format(fmt, file)
    kind = fmt or vdisk.probe_format(file)
    if kind != "qcow2":
        click.echo("vdisk: This image format does not support checks", err=True)
        return 63
    try:
        final, first = check_and_repair(file, fix)
    except CheckFailed as exc:
        click.echo(f"vdisk: Check failed: {exc.message}", err=True)
        return 1
    for passed in (first, final):
        if passed is not None and passed.messages:
            click.echo("\n".join(passed.messages), err=True)
    text = ""
    if first is not None and output == "human":
        text += (
            "The following inconsistencies were found and repaired:\n\n"
            f"    {first.leaks_fixed} leaked clusters\n"
            f"    {first.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    text += check_human(final) if output == "human" else check_json(final)
    if not quiet:
        click.echo(text, nl=False)
    if final.check_errors:
        click.echo("vdisk: Check failed", err=True)
        return 1
    if final.corruptions:
        return 2
    return 3 if final.leaks else 0


# -- convert ---------------------------------------------------------------------------------

_MAX_SPARSE = 32768 * SECTOR  # qemu-img's limit for -S (16 MiB)
_MAX_WORKERS = 16  # qemu-img's limit for -m
_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def _progress_printer() -> Callable[[int, int], None]:
    shown = [-1.0]

    def show(done: int, total: int) -> None:
        pct = 100.0 if total == 0 else done * 100.0 / total
        if pct - shown[0] >= 1.0 or (pct == 100.0 and shown[0] != 100.0):
            shown[0] = pct
            click.echo(f"    ({pct:.2f}/100%)\r", nl=False)

    return show


@click.command("convert")
@click.option("-f", "fmt", metavar="FMT", help="Source format (default: probe).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (raw, qcow2).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Output creation options.")
@click.option("-n", "skip_create", is_flag=True, help="Write into an existing target.")
@click.option("-S", "sparse", default="4k", metavar="SIZE", help="Zero run that stays sparse.")
@click.option("-W", "out_of_order", is_flag=True, help="Allow out-of-order writes.")
@click.option("-m", "workers", default="8", metavar="N", help="Parallel requests (1-16).")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-c", "compress", is_flag=True, help="Compress (not supported).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.option("-t", "cache", default="unsafe", metavar="CACHE", help="Target cache mode.")
@click.option("-T", "src_cache", metavar="CACHE", help="Accepted (source cache mode).")
@click.argument("files", nargs=-1)
def convert_cmd(
    fmt: str | None,
    out_fmt: str,
    options: tuple[str, ...],
    skip_create: bool,
    sparse: str,
    out_of_order: bool,
    workers: str,
    progress: bool,
    quiet: bool,
    compress: bool,
    force_share: bool,
    cache: str,
    src_cache: str | None,
    files: tuple[str, ...],
) -> int:
    """Convert the source images (concatenated) into DST, like qemu-img convert."""
    import vdisk

    from .. import convert as conv
    from .image import create_opts, parse_opts

    if compress:
        raise UnsupportedFeatureError("compression (-c) is not supported yet")
    try:
        sparse_size = parse_size(sparse)
    except VdiskError:
        sparse_size = -1
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size > _MAX_SPARSE:
        raise RequestError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            "up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        )
    try:
        nworkers = int(workers)
    except ValueError:
        nworkers = 0
    if not 1 <= nworkers <= _MAX_WORKERS:
        raise RequestError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        )
    if len(files) < 2:
        raise RequestError("Must specify image file name")
    *srcs, dst = files
    _check_format(fmt, srcs[0])
    _check_format(out_fmt, dst)
    if skip_create and options:
        raise RequestError("-o has no effect when skipping image creation")
    if cache not in _CACHE_MODES:
        raise RequestError(f"Invalid cache option: {cache}")
    sources: list[BlockDevice] = []
    target: BlockDevice | None = None
    try:
        from ..backends.raw import RawDevice

        for src in srcs:
            sources.append(vdisk.open(src, format=fmt, readonly=True))
        # Raw sources as QEMU sizes them (whole sectors).
        inputs = [_SectorPadded(s) if isinstance(s, RawDevice) else s for s in sources]
        total = sum(s.size for s in inputs)
        if not skip_create:
            opts = parse_opts(out_fmt, list(options), dst)
            if "backing_file" in opts or "backing_fmt" in opts:
                # qemu-img would then copy only what differs from the backing file.
                raise UnsupportedFeatureError(
                    "a backing file for the target (-B, -o backing_file) is not supported yet",
                    path=dst,
                )
            kwargs = {
                d.kwarg: opts[d.name].value
                for d in create_opts(out_fmt)
                if d.kwarg is not None and d.name in opts
            }
            vdisk.create(dst, total, format=out_fmt, **kwargs)
            if out_fmt == "raw" and total:
                # QEMU writes the first block of every raw file it creates (for its alignment
                # probing); do the same so that the output's allocation matches qemu-img's.
                with vdisk.open(dst, format="raw") as fresh:
                    fresh.write(bytes(min(fresh.size, 512 if total < 4096 else 4096)), 0)
        target = vdisk.open(dst, format=out_fmt, readonly=False)
        if target.size < total:
            raise RequestError("output file is smaller than input file", path=dst)
        show = _progress_printer() if progress and not quiet else None
        if show is not None:
            show(0, total)
        conv.convert(
            inputs,
            target,
            target_is_zero=not skip_create,
            sparse_size=sparse_size,
            workers=nworkers,
            out_of_order=out_of_order,
            progress=show,
            flush=cache != "unsafe",  # qemu-img convert's default: no flush at the end
        )
        if show is not None:
            click.echo("")
    finally:
        for dev in sources:
            dev.close()
        if target is not None:
            target.close()
    return 0


COMMANDS: tuple[click.Command, ...] = (map_cmd, compare_cmd, check_cmd, convert_cmd)
