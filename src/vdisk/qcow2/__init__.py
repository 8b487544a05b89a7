"""QCOW2 images (to be built): Qcow2Image and create()."""

from __future__ import annotations

from typing import Any

from ..block import BlockDevice
from ..errors import UnsupportedFeatureError


class Qcow2Image:
    @classmethod
    def open(cls, path: str, readonly: bool = False, **options: Any) -> BlockDevice:
        raise UnsupportedFeatureError("qcow2 is not implemented yet", path=path)


def create(path: str, size: int, **options: Any) -> None:
    raise UnsupportedFeatureError("qcow2 is not implemented yet", path=path)
