"""NBD exports as qcow2 backing files: ``nbd://`` and ``nbd+unix://`` names, as QEMU takes them.

A backing file named by such a URI is opened read-only through our NBD client, so reads of
unallocated clusters and copy-on-write fetch the data from the remote export.
"""

from __future__ import annotations

from .. import is_uri
from ..block import BlockDevice
from ..errors import UnsupportedFeatureError, VdiskError

#: URI schemes of NBD over TLS, which our client does not speak.
TLS_SCHEMES = ("nbds://", "nbds+unix://")


def is_nbd_backing(name: str) -> bool:
    """Whether the backing name ``name`` is an NBD URI (TLS ones included, to refuse them)."""
    return is_uri(name) or name.startswith(TLS_SCHEMES)


def open_nbd_backing(name: str, backing_format: str | None) -> BlockDevice:
    """The export ``name`` as a read-only BlockDevice; a one-line refusal for what we lack."""
    if name.startswith(TLS_SCHEMES):
        raise UnsupportedFeatureError(
            f"backing file {name!r}: NBD over TLS (nbds://) is not supported"
        )
    if backing_format not in (None, "raw"):
        raise UnsupportedFeatureError(
            f"backing file {name!r}: format {backing_format!r} over NBD is not supported (only raw)"
        )
    from .client import NbdClient

    return NbdClient.from_uri(name, readonly=True)


def open_nbd_export(uri: str, readonly: bool = False) -> BlockDevice:
    """The export ``uri`` as a BlockDevice (``vdisk ublk add -t nbd URI``)."""
    if uri.startswith(TLS_SCHEMES):
        raise UnsupportedFeatureError(f"{uri!r}: NBD over TLS (nbds://) is not supported")
    if not is_uri(uri):
        raise VdiskError(f"-t nbd needs an nbd:// or nbd+unix:// URI, not {uri!r}")
    from .client import NbdClient

    return NbdClient.from_uri(uri, readonly=readonly)
