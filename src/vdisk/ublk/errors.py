"""The ublk server's error (which operation failed, with the kernel's errno), and the errno a
failed request is committed with."""

from __future__ import annotations

import errno as errno_codes
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


def errno_of(exc: BaseException) -> int:
    """The errno to fail a request with for ``exc`` (EIO when it carries none)."""
    if isinstance(exc, VdiskError | OSError) and exc.errno:
        return int(exc.errno)
    return errno_codes.EIO
