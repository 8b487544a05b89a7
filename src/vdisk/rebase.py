"""``qemu-img rebase``'s engine: give a qcow2 image a new backing file (or none) while its
visible content stays the same.

Safe mode reads, for every range the image itself does not allocate, the old backing chain and
the new one; where they differ, the old content is written into the image, in whole allocation
units (a cluster, or a subcluster with extended L2) that the image did not allocate, so no
copy-on-write ever fills a partial unit from the wrong backing. Then the header is changed
(``qcow2.amend``). Unsafe mode (``-u``) changes only the header.
"""

from __future__ import annotations

from collections.abc import Callable

from .block import BlockDevice
from .errors import VdiskError
from .filenames import resolve_backing

CHUNK = 1 << 20  # bytes compared at a time


def _read(dev: BlockDevice | None, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of dev, zeros past its end (or everywhere when None)."""
    if dev is None or offset >= dev.size:
        return bytes(length)
    buf = bytearray(length)  # the tail past dev's end stays zero
    dev.readinto(memoryview(buf)[: min(length, dev.size - offset)], offset)
    return bytes(buf)


def _copy_differences(
    image: BlockDevice,
    old: BlockDevice | None,
    new: BlockDevice | None,
    unit: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    size = image.size
    for extent in image.block_status(0, size):
        if progress is not None:
            progress(extent.offset, size)
        if extent.present:
            continue
        pos = extent.offset
        while pos < extent.end:
            n = min(CHUNK, extent.end - pos)
            before, after = _read(old, pos, n), _read(new, pos, n)
            if before != after:
                _write_differing_units(image, before, after, pos, unit)
            pos += n
    if progress is not None:
        progress(size, size)


def _write_differing_units(
    image: BlockDevice, before: bytes, after: bytes, pos: int, unit: int
) -> None:
    """Write ``before`` where it differs from ``after``, unit by unit, in contiguous runs."""
    run_start: int | None = None
    n = len(before)
    i = 0
    while i <= n:
        differs = i < n and before[i : i + unit] != after[i : i + unit]
        if differs and run_start is None:
            run_start = i
        elif not differs and run_start is not None:
            image.write(before[run_start:i], pos + run_start)
            run_start = None
        i += unit if i < n else 1


def rebase(
    path: str,
    backing_file: str,
    backing_format: str | None,
    unsafe: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Make ``backing_file`` ("" for none) the backing file of the qcow2 image at ``path``."""
    import vdisk

    from .qcow2 import Qcow2Image
    from .qcow2.amend import set_backing

    if not unsafe:
        image = Qcow2Image.open(path, readonly=False, open_backing=False)
        old: BlockDevice | None = None
        new: BlockDevice | None = None
        try:
            header = image.header
            if header.backing_file:
                old = vdisk.open(
                    resolve_backing(path, header.backing_file),
                    format=header.backing_format,
                    readonly=True,
                )
            if backing_file:
                new = vdisk.open(
                    resolve_backing(path, backing_file), format=backing_format, readonly=True
                )
            unit = image.cluster_size // (32 if header.extended_l2 else 1)
            _copy_differences(image, old, new, unit, progress)
            image.flush()
        finally:
            for dev in (new, old, image):
                if dev is not None:
                    dev.close()
    try:
        set_backing(path, backing_file or None, backing_format)
    except VdiskError as exc:
        raise type(exc)(
            f"Could not change the backing file to '{backing_file}': {exc.message}"
        ) from None
