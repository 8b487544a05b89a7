"""QCOW2 images: open with Qcow2Image.open(), make new ones with create()."""

from __future__ import annotations

from .create import create
from .format import Header
from .image import Qcow2Image

__all__ = ["Header", "Qcow2Image", "create"]
