"""A tap on the ``os`` functions through which vdisk changes its files (for crash and fault tests).

``FileTap`` replaces ``os.open``, ``os.close``, ``os.pwrite``, ``os.pwritev``, ``os.fsync``,
``os.fdatasync``, ``os.ftruncate``, ``os.truncate`` and ``os.posix_fallocate`` for the length of
a ``with`` block. Calls on the watched paths (and on the fds opened for them inside the block)
become ``FileCall`` values handed to ``before()`` and ``after()``; every other call goes straight
through. Interposing at the ``os`` level catches every call site, whichever module it lives in.

``Recorder`` keeps what reached the file: each write with its bytes, each flush, each size change,
plus ``mark()`` events a test adds (e.g. "this flush returned"). A fault injector subclasses
``FileTap`` and raises or shortens in ``before()``. Only the qcow2 layer's own calls are seen:
reads are not tapped, and libc calls made through ctypes are not.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

WRITE = "write"
FLUSH = "flush"
TRUNCATE = "truncate"
MARK = "mark"

_TAPPED = (
    "open",
    "close",
    "pwrite",
    "pwritev",
    "fsync",
    "fdatasync",
    "ftruncate",
    "truncate",
    "posix_fallocate",
)
# Frames of these functions are plumbing: the call site is the first frame outside them.
_PLUMBING = {"pwrite_full", "_pwritev_full", "write_zeroes_fd"}


@dataclass(frozen=True)
class FileCall:
    """One tapped call. ``offset`` is the write offset or the new size; ``data`` what is written."""

    kind: str
    path: str
    offset: int
    data: bytes
    site: str  # "module:function" of the vdisk code that asked for it
    label: str = ""


def call_site() -> str:
    """The innermost vdisk frame outside the I/O helpers, as 'module:function'."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module.startswith("vdisk.") and module != __name__ and name not in _PLUMBING:
            return f"{module}:{name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


class FileTap:
    """Interpose on ``os`` file calls for ``paths``; subclasses override before()/after()."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = {os.path.realpath(p) for p in paths}
        self.fds: dict[int, str] = {}
        self.lock = threading.RLock()
        self._saved: dict[str, Any] = {}

    # -- hooks --------------------------------------------------------------------------
    def before(self, call: FileCall) -> int | None:
        """Called before the real call; may raise OSError. For a write, a smaller byte count
        makes it a short write (only that many bytes reach the file)."""
        return None

    def after(self, call: FileCall) -> None:
        """Called after the real call succeeded (for a write, ``call.data`` is what landed)."""

    # -- plumbing -----------------------------------------------------------------------
    def __enter__(self) -> FileTap:
        for name in _TAPPED:
            self._saved[name] = getattr(os, name)
        real = self._saved

        def tapped_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            fd: int = real["open"](path, flags, mode, **kw)
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.realpath(os.fsdecode(path))
                if full in self.paths:
                    with self.lock:
                        self.fds[fd] = full
            return fd

        def tapped_close(fd: int) -> None:
            with self.lock:
                self.fds.pop(fd, None)
            real["close"](fd)

        def tapped_pwrite(fd: int, data: Any, offset: int) -> int:
            path = self.fds.get(fd)
            if path is None:
                return int(real["pwrite"](fd, data, offset))
            return self._write(path, fd, bytes(memoryview(data).cast("B")), offset)

        def tapped_pwritev(fd: int, buffers: Any, offset: int, *flags: int) -> int:
            path = self.fds.get(fd)
            if path is None:
                return int(real["pwritev"](fd, buffers, offset, *flags))
            data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            return self._write(path, fd, data, offset)

        def flusher(name: str) -> Callable[[int], None]:
            def tapped_flush(fd: int) -> None:
                path = self.fds.get(fd)
                if path is None:
                    real[name](fd)
                    return
                call = FileCall(FLUSH, path, 0, b"", call_site())
                with self.lock:
                    self.before(call)
                    real[name](fd)
                    self.after(call)

            return tapped_flush

        def tapped_ftruncate(fd: int, length: int) -> None:
            path = self.fds.get(fd)
            if path is None:
                real["ftruncate"](fd, length)
                return
            self._resize(path, length, lambda: real["ftruncate"](fd, length))

        def tapped_truncate(path: Any, length: int) -> None:
            if isinstance(path, int):
                tapped_ftruncate(path, length)
                return
            full = os.path.realpath(os.fsdecode(path))
            if full not in self.paths:
                real["truncate"](path, length)
                return
            self._resize(full, length, lambda: real["truncate"](path, length))

        def tapped_fallocate(fd: int, offset: int, length: int) -> None:
            path = self.fds.get(fd)
            if path is None:
                real["posix_fallocate"](fd, offset, length)
                return
            # Allocation changes no bytes; only a size change is visible after a crash.
            new_size = max(offset + length, os.fstat(fd).st_size)
            self._resize(path, new_size, lambda: real["posix_fallocate"](fd, offset, length))

        os.open = tapped_open  # type: ignore[assignment]
        os.close = tapped_close
        os.pwrite = tapped_pwrite
        os.pwritev = tapped_pwritev
        os.fsync = flusher("fsync")  # type: ignore[assignment]
        os.fdatasync = flusher("fdatasync")  # type: ignore[assignment]
        os.ftruncate = tapped_ftruncate
        os.truncate = tapped_truncate  # type: ignore[assignment]
        os.posix_fallocate = tapped_fallocate
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name, fn in self._saved.items():
            setattr(os, name, fn)
        self._saved.clear()

    def _write(self, path: str, fd: int, data: bytes, offset: int) -> int:
        call = FileCall(WRITE, path, offset, data, call_site())
        with self.lock:
            limit = self.before(call)
            if limit is not None and limit < len(data):
                data = data[:limit]
                call = FileCall(WRITE, path, offset, data, call.site)
            done = int(self._saved["pwrite"](fd, data, offset))
            if done < len(data):
                call = FileCall(WRITE, path, offset, data[:done], call.site)
            self.after(call)
            return done

    def _resize(self, path: str, length: int, do: Callable[[], None]) -> None:
        call = FileCall(TRUNCATE, path, length, b"", call_site())
        with self.lock:
            self.before(call)
            do()
            self.after(call)


class Recorder(FileTap):
    """Keeps every write, flush and size change that reached the watched files, in order."""

    def __init__(self, paths: Iterable[str]) -> None:
        super().__init__(paths)
        self.calls: list[FileCall] = []

    def after(self, call: FileCall) -> None:
        self.calls.append(call)

    def mark(self, label: str) -> None:
        """Add a test's own event (e.g. 'the flush returned') to the record."""
        with self.lock:
            self.calls.append(FileCall(MARK, "", 0, b"", "test", label))
