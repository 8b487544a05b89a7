"""QCOW2 images: open with Qcow2Image.open(), make new ones with create().

The image and creation modules (and numpy with them) load on first use, so that importing
``vdisk.qcow2.format`` to probe or decode a header stays cheap.
"""

from __future__ import annotations

from .format import Header

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .create import create
    from .image import Qcow2Image

__all__ = ["Header", "Qcow2Image", "create"]


def __getattr__(name: str) -> Any:
    value: Any
    if name == "Qcow2Image":
        from .image import Qcow2Image as value
    elif name == "create":
        # Importing the submodule binds the package attribute "create" to the module: rebind it.
        from .create import create as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
