"""Whole-buffer file I/O on a descriptor: reads and writes that finish short transfers.

``os.pread``/``os.pwrite`` may move fewer bytes than asked (signals, large requests, the end of
the file); every layer that does positioned I/O on a file uses these instead. Errors are left
as ``OSError`` for the caller to turn into a ``VdiskError`` naming its file.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from typing_extensions import Buffer

IOV_MAX = 1024  # Linux's limit on buffers per preadv/pwritev call


def pread_full(fd: int, buf: Buffer, offset: int) -> int:
    """Fill ``buf`` from ``offset``; bytes past EOF read as zeros. Returns bytes from the file."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            break
        done += n
    return done


def pwrite_full(fd: int, buf: Buffer, offset: int) -> None:
    """Write all of ``buf`` at ``offset``."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def pwritev_full(fd: int, iov: list[Any], offset: int) -> None:
    """pwritev that finishes short writes and splits vectors longer than IOV_MAX."""
    if len(iov) == 1:
        done = os.pwritev(fd, iov, offset)
        if done == len(iov[0]):
            return
        iov = [memoryview(iov[0]).cast("B")[done:]]
        offset += done
    views = [memoryview(b).cast("B") for b in iov]
    while views:
        batch = views[:IOV_MAX]
        total = sum(len(v) for v in batch)
        done = os.pwritev(fd, batch, offset)
        offset += done
        if done == total:
            views = views[IOV_MAX:]
            continue
        # Drop what was written and go on from the first partly written buffer.
        while done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        views[0] = views[0][done:]
