"""``qemu-img info`` data built from a device, and its two renderings (human and JSON).

The data is a plain dict keyed exactly as QEMU's ``ImageInfo`` QAPI type (``virtual-size``,
``format-specific``...), so the JSON rendering is just a dump. QEMU stores that object in a hash
table (QDict: 512 buckets, ``tdb_hash`` of the key, newest entry first within a bucket) and both
renderings walk it in bucket order; we sort keys the same way so that our output matches
``qemu-img info`` byte for byte, not just field for field.
"""

from __future__ import annotations

import os

from .errors import BackingChainError, VdiskError, from_oserror
from .filenames import resolve_backing
from .sizes import format_size, round_up_to_sector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from .block import BlockDevice
    from .qcow2.format import SnapshotEntry
    from .qcow2.summary import Qcow2Summary

Info = dict[str, "Any"]

_QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    """QEMU's QDict bucket hash (the old TDB hash), in 32-bit unsigned arithmetic."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(d: dict[str, Any]) -> list[str]:
    """Keys of ``d`` in the order QEMU iterates a QDict built by inserting them in dict order.

    Within a bucket QEMU inserts at the head, so later insertions come first.
    """
    index = {key: i for i, key in enumerate(d)}
    return sorted(d, key=lambda k: (_tdb_hash(k) % _QDICT_BUCKETS, -index[k]))


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif cp < 0x20 or cp >= 0x7F:
            # QEMU escapes everything outside printable ASCII, as UTF-16 code units.
            if cp >= 0x10000:
                cp -= 0x10000
                out.append(f"\\u{0xD800 | (cp >> 10):04X}\\u{0xDC00 | (cp & 0x3FF):04X}")
            else:
                out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(obj: Any, indent: int = 0) -> str:
    """Pretty JSON as QEMU's qobject_to_json_pretty writes it (4-space indent, QDict order)."""
    pad = " " * (4 * (indent + 1))
    end = " " * (4 * indent)
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, str):
        return _json_string(obj)
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + end + "}"
        items = [f"{pad}{_json_string(k)}: {to_json(obj[k], indent + 1)}" for k in qdict_order(obj)]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, list):
        if not obj:
            return "[\n" + end + "]"  # QEMU opens and closes even an empty list on two lines
        items = [f"{pad}{to_json(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    raise TypeError(f"cannot render {type(obj).__name__} as QEMU JSON")


def _dump_value(value: Any, indent: int, out: list[str]) -> None:
    if isinstance(value, dict):
        for key in qdict_order(value):
            _dump_entry(key.replace("-", " "), value[key], indent, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _dump_entry(f"[{i}]", item, indent, out)
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(str(value))


def _dump_entry(label: str, value: Any, indent: int, out: list[str]) -> None:
    composite = isinstance(value, dict | list)
    out.append(f"{' ' * (4 * indent)}{label}:{chr(10) if composite else ' '}")
    _dump_value(value, indent + 1, out)
    if not composite:
        out.append("\n")


def _snapshot_line(sn: Info | None) -> str:
    if sn is None:
        return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    import time  # not datetime: `vdisk info` starts faster without it

    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    clock_ns = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
    secs = clock_ns // 1_000_000_000
    clock = (
        f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
        f"{(clock_ns // 1_000_000) % 1000:03d}"
    )
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (
        f"{sn['id']:<9} {sn['name']:<16} {format_size(sn['vm-state-size']):>8}"
        f"{date:>20}{clock:>13}{icount:>11}"
    )


def to_human(info: Info) -> str:
    """One image's block of ``qemu-img info`` human output (ends with a newline)."""
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {'unavailable' if actual is None else format_size(actual)}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(_snapshot_line(None))
        lines.extend(_snapshot_line(sn) for sn in info["snapshots"])
    text = "\n".join(lines) + "\n"
    if "format-specific" in info:
        out: list[str] = []
        _dump_value(info["format-specific"]["data"], 1, out)
        text += "Format specific information:\n" + "".join(out)
    return text


def render(infos: list[Info], output: str, chain: bool) -> str:
    """The whole ``qemu-img info`` output for one image (or its chain with ``chain``)."""
    if output == "json":
        return to_json(infos if chain else infos[0]) + "\n"
    return "\n".join(to_human(info) for info in infos)


# -- building the data -------------------------------------------------------------------------


def _snapshot_info(sn: SnapshotEntry) -> Info:
    entry: Info = {
        "id": sn.id_str,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount is not None and sn.icount >= 0:  # -1: no icount recorded
        entry["icount"] = sn.icount
    return entry


def display_name(path: str) -> str:
    """The name qemu-img prints for ``path``: an NBD URI in QEMU's canonical form
    (``nbd://HOST:PORT[/EXPORT]``, ``nbd+unix://[/EXPORT]?socket=PATH``), a file as given."""
    from urllib.parse import parse_qs, urlsplit

    from . import is_uri

    if not is_uri(path):
        return path
    parts = urlsplit(path)
    export = parts.path.lstrip("/")
    if parts.scheme == "nbd+unix":
        socket = parse_qs(parts.query).get("socket", [""])[0]
        return f"nbd+unix://{'/' + export if export else ''}?socket={socket}"
    where = f"{parts.hostname or 'localhost'}:{parts.port or 10809}"
    return f"nbd://{where}{'/' + export if export else ''}"


def allocated_size(path: str) -> int | None:
    """Bytes the file occupies on the host (qemu-img's 'disk size')."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def device_info(
    device: BlockDevice | Qcow2Summary | RawFileSummary, filename: str, fmt: str
) -> Info:
    """The ImageInfo of an open device (its own layer only; the chain is walked apart)."""
    from . import is_uri

    if is_uri(filename):  # no file, no dirty flag: qemu-img shows a protocol's data as is
        return {"virtual-size": device.size, "filename": display_name(filename), "format": fmt}
    info: Info = {"virtual-size": device.size, "filename": filename, "format": fmt}
    actual = allocated_size(filename)
    if fmt != "qcow2":
        info["virtual-size"] = round_up_to_sector(device.size)  # as QEMU sizes a raw file
        if actual is not None:
            info["actual-size"] = actual
        info["dirty-flag"] = False
        return info
    from .qcow2.summary import Qcow2Summary

    if not isinstance(device, Qcow2Summary):
        from .qcow2 import Qcow2Image

        if not isinstance(device, Qcow2Image):
            raise VdiskError("not a qcow2 image", path=filename)
    header = device.header
    specific = device.specific_info()
    # qemu-img 7.2's disk size is the qcow2 file's alone, external data file or not.
    snapshots = device.snapshots
    if snapshots:
        info["snapshots"] = [_snapshot_info(sn) for sn in snapshots]
    info["cluster-size"] = device.cluster_size
    if header.crypt_method:
        info["encrypted"] = True
    if actual is not None:
        info["actual-size"] = actual
    info["format-specific"] = {"type": "qcow2", "data": specific}
    if header.backing_file:
        info["backing-filename"] = header.backing_file
        info["full-backing-filename"] = resolve_backing(filename, header.backing_file)
        if header.backing_format:
            info["backing-filename-format"] = header.backing_format
    info["dirty-flag"] = header.dirty
    return info


class RawFileSummary:
    """A raw image file open read-only and locked as a read-only RawDevice is: its size is all
    ``info`` reads, so the BlockDevice machinery (and its imports) stays unloaded."""

    def __init__(self, path: str, force_share: bool = False) -> None:
        import stat

        from . import locking

        mode = locking.mode_for("raw", readonly=True, force_share=force_share)
        self.fd = locking.open_locked(path, os.O_RDONLY, mode)
        st = os.fstat(self.fd)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size

    def close(self) -> None:
        os.close(self.fd)


def open_for_info(
    path: str, fmt: str | None, force_share: bool = False
) -> tuple[BlockDevice | Qcow2Summary | RawFileSummary, str]:
    """Open ``path`` read-only without its backing chain (like qemu-img info); return it and
    its format. A qcow2 image opens as a header-level summary and a raw file as its size
    (quick: no table machinery)."""
    import vdisk

    from . import is_uri, probe_format

    fmt = fmt or probe_format(path)
    if fmt == "qcow2" and not is_uri(path):
        from .qcow2.summary import Qcow2Summary

        return Qcow2Summary(path, force_share=force_share), fmt
    if fmt == "qcow2":
        from .qcow2 import Qcow2Image

        image = Qcow2Image.open(
            path, readonly=True, open_backing=False, force_share=force_share, unlock=False
        )
        return image, fmt
    if fmt == "raw" and not is_uri(path):
        return RawFileSummary(path, force_share), fmt
    return vdisk.open(path, format=fmt, readonly=True, force_share=force_share), fmt


def image_info(path: str, fmt: str | None = None, force_share: bool = False) -> Info:
    """The ImageInfo of the image at ``path`` (``fmt`` None probes the format)."""
    from . import is_uri

    if not is_uri(path) and not os.path.lexists(path):
        raise from_oserror(FileNotFoundError(2, "No such file or directory", path), path)
    device, fmt = open_for_info(path, fmt, force_share)
    try:
        return device_info(device, path, fmt)
    finally:
        device.close()


def chain_info(path: str, fmt: str | None = None, force_share: bool = False) -> Iterator[Info]:
    """ImageInfo of ``path`` and then of each backing file, as ``--backing-chain`` lists them."""
    seen: set[str] = set()
    filename: str | None = path
    while filename is not None:
        if filename in seen:
            raise BackingChainError(f"Backing file '{filename}' creates an infinite loop.")
        seen.add(filename)
        info = image_info(filename, fmt, force_share)
        yield info
        filename = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")


def report(
    path: str,
    fmt: str | None = None,
    output: str = "human",
    chain: bool = False,
    force_share: bool = False,
) -> str:
    """The whole ``qemu-img info`` output for ``path`` (and its backing chain with ``chain``)."""
    from . import check_format

    check_format(fmt, path)
    infos = (
        list(chain_info(path, fmt, force_share)) if chain else [image_info(path, fmt, force_share)]
    )
    return render(infos, output, chain)
