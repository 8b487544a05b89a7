"""NBD: a server exporting any BlockDevice, and a small client.

``vdisk.nbd.serve(device_or_exports, ...)`` is the library entry point; see server.py.
"""

from __future__ import annotations

from .server import Export, NbdServer, serve

__all__ = ["Export", "NbdServer", "serve"]
