"""vdisk: a Python virtual-disk stack.

The front door: ``open()`` an image as a BlockDevice (probing its format) and ``create()`` one.
"""

from __future__ import annotations

from .errors import VdiskError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .block import BlockDevice, Extent

__all__ = [
    "BlockDevice",
    "Extent",
    "VdiskError",
    "check_format",
    "create",
    "open",
    "probe_format",
]
__version__ = "0.1.0"

FORMATS = ("qcow2", "raw")
URI_SCHEMES = ("nbd://", "nbd+unix://")
# The qcow2 magic (qcow2.format.MAGIC), here so that probing a raw file loads no qcow2 code.
QCOW2_MAGIC = b"QFI\xfb"


def __getattr__(name: str) -> Any:
    # BlockDevice and Extent load vdisk.block (typing, dataclasses) only when asked for, so
    # `vdisk --help` does not pay for them.
    if name in ("BlockDevice", "Extent"):
        from . import block

        return getattr(block, name)
    raise AttributeError(f"module 'vdisk' has no attribute {name!r}")


def check_format(fmt: str | None, path: str | None = None) -> None:
    """Refuse a format name vdisk does not know, with qemu-img's message."""
    if fmt is not None and fmt not in FORMATS:
        from .errors import UnsupportedFeatureError

        raise UnsupportedFeatureError(f"Unknown file format '{fmt}'", path=path)


def is_uri(path: str) -> bool:
    """Whether ``path`` names an NBD export (``nbd://`` or ``nbd+unix://``), not a file."""
    return path.startswith(URI_SCHEMES)


def probe_format(path: str) -> str:
    """Return 'qcow2' or 'raw' from the file's first bytes (an NBD export is raw data)."""
    import builtins

    if is_uri(path):
        return "raw"

    from .errors import from_oserror

    try:
        with builtins.open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def open(
    path: str,
    format: str | None = None,
    readonly: bool = False,
    force_share: bool = False,
    **options: Any,
) -> BlockDevice:
    """Open an image as a BlockDevice. ``format`` None probes it; options go to the format.

    The file is locked as QEMU locks it, so a VM or qemu-nbd using it keeps a writer out;
    ``force_share=True`` (qemu-img -U) opens read-only beside writers. See vdisk.locking.
    """
    if is_uri(path):
        from .nbd.client import NbdClient  # an NBD export (as raw data): the server locks

        return NbdClient.from_uri(path, readonly=readonly)
    fmt = format or probe_format(path)
    if fmt == "qcow2":
        from .qcow2 import Qcow2Image

        return Qcow2Image.open(path, readonly=readonly, force_share=force_share, **options)
    if fmt == "raw":
        from .backends.raw import RawDevice

        return RawDevice(path, readonly=readonly, force_share=force_share, **options)
    raise VdiskError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})", path=path)


def create(path: str, size: int, format: str = "qcow2", **options: Any) -> None:
    """Create an image file. Options are qemu-img's ``-o`` options for the format."""
    if format == "qcow2":
        from .qcow2 import create as create_qcow2

        create_qcow2(path, size, **options)
    elif format == "raw":
        from .backends.raw import create_raw

        create_raw(path, size, **options)
    else:
        raise VdiskError(
            f"unknown image format {format!r} (known: {', '.join(FORMATS)})", path=path
        )
