"""``qemu-img commit``'s engine: write what the images above a base allocate into the base.

The chain is opened level by level (``map.open_chain``); every range that any level above the
base allocates is read through the top image (its visible content) and written into the base
(zeros as ``write_zeroes``). Then, unless told not to, the top image is emptied as qemu-img
empties it when it has no snapshots: rebuilt as a fresh image with the same options and backing
file (made beside it, fsync'd, renamed over it: a crash leaves the old or the new file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .block import BlockDevice
from .errors import ReadOnlyError, RequestError, UnsupportedFeatureError
from .map import ChainLevel, close_chain, open_chain

CHUNK = 1 << 20  # bytes copied at a time


def _allocated_above(levels: list[ChainLevel], offset: int, length: int) -> list[tuple[int, int]]:
    """The ranges of [offset, offset+length) that a level of ``levels`` allocates, merged."""
    marks: list[tuple[int, int]] = []
    for level in levels:
        n = max(0, min(length, level.dev.size - offset))
        if n:
            marks += [(e.offset, e.end) for e in level.dev.block_status(offset, n) if e.present]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(marks):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class CommitSettings:
    """How the base is written: ``cache`` (qemu's mode names, as vdisk.convert.CACHE_MODES;
    qemu-img commit's default writeback flushes at the end, unsafe never) and ``rate``
    (bytes/s of data, None: no limit)."""

    cache: str = "writeback"
    rate: int | None = None


def _copy_into_base(
    top: BlockDevice,
    upper: list[ChainLevel],
    base: BlockDevice,
    progress: Callable[[int, int], None] | None,
    settings: CommitSettings,
) -> None:
    from .convert import CACHE_MODES, RateLimit

    flush, fua = CACHE_MODES[settings.cache]
    pace = RateLimit(settings.rate)
    size = top.size
    buf = bytearray(CHUNK)
    for pos in range(0, size, CHUNK):
        if progress is not None:
            progress(pos, size)
        for start, end in _allocated_above(upper, pos, min(CHUNK, size - pos)):
            view = memoryview(buf)[: end - start]
            top.readinto(view, start)
            if buf.count(0, 0, end - start) == end - start:
                base.write_zeroes(start, end - start)
            else:
                base.write(view, start, fua=fua)
                pace.account(end - start)
    if flush:
        base.flush()
    if progress is not None:
        progress(size, size)


def _grow(base: BlockDevice, size: int) -> None:
    from .backends.raw import RawDevice
    from .qcow2 import Qcow2Image
    from .qcow2.resize import resize

    if isinstance(base, Qcow2Image):
        resize(base, size)
    elif isinstance(base, RawDevice):
        base.resize(size)
    else:
        raise UnsupportedFeatureError("cannot grow the base to the image's size")


def find_base(levels: list[ChainLevel], base: str | None, path: str) -> int:
    """The index in ``levels`` of the base: ``base`` as named, else the top's backing file."""
    if len(levels) < 2:
        raise RequestError("Image does not have a backing file")
    if base is None:
        return 1
    wanted = os.path.realpath(base)
    for i, level in enumerate(levels[1:], 1):
        if level.name == base or os.path.realpath(level.name) == wanted:
            return i
    raise RequestError(f"Did not find '{base}' in the backing chain of '{path}'")


def _check_emptiable(path: str) -> None:
    from .qcow2 import Qcow2Image
    from .qcow2 import format as fmt

    # force_share: the commit holds the top's write lock itself (see commit()).
    with Qcow2Image.open(path, readonly=True, open_backing=False, force_share=True) as image:
        h = image.header
        if h.nb_snapshots or h.crypt_method or h.bitmaps or h.data_file:
            raise UnsupportedFeatureError(
                "emptying an image with snapshots, bitmaps, encryption or a data file is not "
                "supported; use -d",
                path=path,
            )
        if h.incompatible_features & ~(fmt.INCOMPAT_EXTL2 | fmt.INCOMPAT_COMPRESSION):
            raise UnsupportedFeatureError("cannot empty this image; use -d", path=path)


def empty_image(path: str) -> None:
    """Rebuild the qcow2 image at ``path`` with nothing allocated, options and backing kept."""
    from .qcow2 import Qcow2Image, create

    with Qcow2Image.open(path, readonly=True, open_backing=False, force_share=True) as image:
        h = image.header
        options: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "cluster_size": h.cluster_size,
            "refcount_bits": h.refcount_bits,
            "lazy_refcounts": bool(h.compatible_features & 1),
            "extended_l2": h.extended_l2,
            "compression_type": "zstd" if h.compression_type == 1 else "zlib",
            "backing_file": h.backing_file,
            "backing_fmt": h.backing_format,
        }
        size = h.size
    fresh = f"{path}.vdisk-commit.tmp"
    try:
        create(fresh, size, **{k: v for k, v in options.items() if v is not None})
        os.chmod(fresh, os.stat(path).st_mode & 0o7777)
        os.replace(fresh, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(fresh):
            os.unlink(fresh)
        raise


def commit(
    path: str,
    fmt: str | None = None,
    base: str | None = None,
    drop: bool = False,
    progress: Callable[[int, int], None] | None = None,
    settings: CommitSettings | None = None,
) -> None:
    """Commit the image at ``path`` into its backing file (or ``base``, deeper in its chain;
    ``base`` implies ``drop``); without ``drop`` the top image is emptied afterwards.
    ``settings``: the base's cache mode and a rate limit (``-t``, ``-r``)."""
    drop = drop or base is not None
    import vdisk

    if vdisk.is_uri(path):  # an export's data is raw: it has no backing file
        raise UnsupportedFeatureError("Image does not have a backing file")
    if fmt not in (None, "qcow2"):
        raise UnsupportedFeatureError(f"'{fmt}' images have no backing file to commit to")
    # As qemu-img commit: the top is held for writing and the base opened read-write, so no
    # one else may write either; the chain's read-only views inside this one operation share
    # (force_share) so that they do not lock each other out.
    guard = _lock_for_writing(path)
    try:
        _commit_locked(path, fmt, base, drop, progress, settings or CommitSettings())
        if not drop:
            empty_image(path)
    finally:
        os.close(guard)


def _commit_locked(
    path: str,
    fmt: str | None,
    base: str | None,
    drop: bool,
    progress: Callable[[int, int], None] | None,
    settings: CommitSettings,
) -> None:
    import vdisk

    levels: list[ChainLevel] = []
    top: BlockDevice | None = None
    target: BlockDevice | None = None
    try:
        levels = open_chain(path, fmt, force_share=True)
        bi = find_base(levels, base, path)
        if not drop:
            _check_emptiable(path)
        base_name = levels[bi].name
        base_fmt = "qcow2" if levels[bi].image is not None else "raw"
        top = vdisk.open(path, format="qcow2", readonly=True, force_share=True)
        target = vdisk.open(base_name, format=base_fmt, readonly=False)
        if target.readonly:  # a read-only NBD export: refused before any write, as qemu-img
            raise ReadOnlyError("Can't reopen read-only NBD mount as read/write")
        if settings.cache == "unsafe" and base_fmt == "qcow2":
            from .qcow2 import Qcow2Image

            if isinstance(target, Qcow2Image):
                target.durable = False
        if target.size < top.size:
            _grow(target, top.size)  # as qemu-img commit grows a smaller base
        _copy_into_base(top, levels[:bi], target, progress, settings)
    finally:
        for dev in (target, top):
            if dev is not None:
                dev.close()
        close_chain(levels)


def _lock_for_writing(path: str) -> int:
    """A descriptor of ``path`` holding a qcow2 writer's image locks (closing it unlocks)."""
    from . import locking

    return locking.open_locked(path, os.O_RDONLY, locking.mode_for("qcow2", readonly=False))
