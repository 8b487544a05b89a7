"""A ublk server: serve any BlockDevice as /dev/ublkbN (Linux 6.0+, CONFIG_BLK_DEV_UBLK).

``Device.create(backend, params)`` -> ``start()`` -> ``stop()`` -> ``close()``; see ``device``.
"""

from .errors import UblkError

__all__ = ["UblkError"]
