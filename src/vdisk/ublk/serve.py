"""Running a ublk server as a program: serve a backend (opened by the caller's opener) in the
foreground or as a background daemon that reports readiness (the /dev/ublkbN path) to its
parent."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..block import BlockDevice
from ..errors import VdiskError
from .device import Device, UblkParams
from .errors import UblkError

log = logging.getLogger("vdisk.ublk")

#: open_backend(kind, file, size, readonly): the BlockDevice that ``vdisk ublk add -t KIND -f
#: FILE`` serves (the CLI knows the formats; this package serves whatever it is given)
BackendOpener = Callable[[str, "str | None", "int | None", bool], BlockDevice]


Starter = Callable[[], Device]


def run(
    start: Starter,
    foreground: bool,
    announce: Callable[[str], None],
    metrics_port: int | None = None,
) -> int:
    """Start a device with ``start()`` (which creates and starts it) and serve until it is
    stopped or the process gets SIGINT/SIGTERM. In the background (``foreground`` False) the
    process forks first; the parent returns once the device is ready (after ``announce``).

    The server's SIGINT/SIGTERM handlers only set a flag, from before the start on: a start in
    progress finishes (it is bounded by timeouts, and undoes itself if it fails), then the
    device stops, drains, closes and is deleted. A signal can therefore never land between
    START_DEV and the handlers of ``serve_forever`` and leave a device without its server."""
    if foreground:
        stop = _stop_on_signals()
        dev = start()
        _after_start(dev, metrics_port, lambda: None if stop.is_set() else announce(dev.block_path))
        dev.serve_forever(stop)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ready "):
            announce(message[6:].strip())
            return 0
        os.waitpid(pid, 0)
        raise VdiskError(message.removeprefix("error ").strip() or "the server died starting")
    # The daemon.
    os.close(read_fd)
    status = 1
    try:
        stop = _stop_on_signals()
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        log_path = os.environ.get("VDISK_UBLK_LOG")
        if log_path:
            err_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(err_fd, 2)
        else:
            os.dup2(devnull, 2)

        def ready() -> None:
            os.write(write_fd, f"ready {dev.block_path}\n".encode())

        try:
            dev = start()
            _after_start(dev, metrics_port, ready)
        except (VdiskError, OSError) as exc:
            os.write(write_fd, f"error {_one_line(exc)}".encode())
            os.close(write_fd)
            os._exit(1)
        os.close(write_fd)
        dev.serve_forever(stop)
        status = 0
    except BaseException as exc:  # never return into the parent's code path
        try:
            print(f"vdisk ublk: {exc}", file=sys.stderr)
        except Exception:
            pass
    finally:
        os._exit(status)


def _after_start(dev: Device, metrics_port: int | None, announce: Callable[[], None]) -> None:
    """Metrics endpoint and announcement; the device is closed (deleted) if either fails."""
    try:
        if metrics_port is not None:
            from ..metrics import serve_prometheus

            serve_prometheus(metrics_port)
        announce()
    except BaseException:
        dev.close()
        raise


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM set the returned event (main thread only)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def _one_line(exc: VdiskError | OSError) -> str:
    """The error as the CLI prints it (an OSError as 'FILE: reason', not '[Errno N] ...')."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def describe(kind: str, file: str | None, size: int | None) -> dict[str, Any]:
    if file and kind != "nbd":  # a URI stays as it is
        file = os.path.abspath(file)
    return {"type": kind, "file": file or None, "backend_size": size}


def add(
    open_backend: BackendOpener, kind: str, file: str | None, params: UblkParams,
    size: int | None, readonly: bool,
) -> Device:
    """Open the backend, create and start the device; everything is undone on failure."""
    backend = open_backend(kind, file, size, readonly)
    try:
        dev = Device.create(backend, params, note=describe(kind, file, size))
    except BaseException:
        backend.close()
        raise
    try:
        dev.start()
    except BaseException:
        dev.close()  # start() already did, unless it was interrupted right at its end
        backend.close()
        raise
    _close_backend_on_close(dev)
    return dev


def recover(
    open_backend: BackendOpener, dev_id: int, kind: str | None, file: str | None
) -> Device:
    from .control import Control
    from .device import check_recoverable, read_note

    # Say what is wrong with the device itself before looking at its backend.
    with Control() as ctl:
        check_recoverable(dev_id, ctl)
    note = read_note(dev_id) or {}
    kind = kind or note.get("type")
    file = file or note.get("file")
    if not kind:
        raise UblkError(errno.EINVAL, f"recover ublk{dev_id}",
                        "no record of its backend: give -t TYPE and -f FILE")
    size = note.get("backend_size") or note.get("size")
    backend = open_backend(kind, file, size, False)
    try:
        dev = Device.recover(dev_id, backend, note=describe(kind, file, size))
    except BaseException:
        backend.close()
        raise
    _close_backend_on_close(dev)
    return dev


def _close_backend_on_close(dev: Device) -> None:
    dev.close_backend = True
