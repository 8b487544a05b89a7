"""Image file names as QEMU reads them: protocol names, and names relative to an image."""

from __future__ import annotations

import os


def has_protocol(name: str) -> bool:
    """True for names like ``nbd:...`` or ``json:{...}``: a colon before any slash (as QEMU)."""
    colon = name.find(":")
    slash = name.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def resolve_backing(image_path: str, backing_name: str) -> str:
    """Where the backing file ``backing_name`` of the image at ``image_path`` is, as QEMU says.

    An absolute name or a protocol name stands as it is; a relative one is taken relative to
    the directory of the image, as the image's path is spelled (not made absolute), so
    ``sub/top.qcow2`` with backing ``base.qcow2`` gives ``sub/base.qcow2`` from any cwd."""
    if os.path.isabs(backing_name) or has_protocol(backing_name):
        return backing_name
    # Keep the image path's protocol prefix or directory, whichever ends later.
    prefix = max(image_path.find(":") + 1, image_path.rfind("/") + 1)
    return image_path[:prefix] + backing_name
