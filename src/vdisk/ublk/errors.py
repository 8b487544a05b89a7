"""The ublk server's error: which operation failed, with the kernel's errno."""

from __future__ import annotations

import os

from ..errors import VdiskError


class UblkError(VdiskError):
    """A ublk control or data-plane operation failed.

    ``operation`` names the step (``ADD_DEV``, ``START_DEV``, ``open /dev/ublkc3``...), ``errno``
    the reason; ``str()`` is one line suitable for the CLI.
    """

    def __init__(self, errno: int, operation: str, detail: str | None = None) -> None:
        reason = detail or os.strerror(errno) if errno else (detail or "failed")
        super().__init__(f"ublk {operation}: {reason}", errno=errno)
        self.operation = operation
