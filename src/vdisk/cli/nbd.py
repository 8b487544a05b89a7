"""`vdisk nbd`: serve images over NBD with qemu-nbd's flags."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
from typing import Any

import click

from ..errors import VdiskError


@click.command("nbd")
@click.argument("files", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", default=None, help="image format (qcow2 or raw; probed by default)")
@click.option("-r", "--read-only", "readonly", is_flag=True, help="export read-only")
@click.option("-x", "--export-name", "names", multiple=True, help="export name (one per FILE)")
@click.option("-D", "--description", "descriptions", multiple=True, help="export description")
@click.option("-p", "--port", type=int, default=None, help="TCP port (default 10809)")
@click.option("-b", "--bind", "bind", default=None, help="address to listen on (default 0.0.0.0)")
@click.option("-k", "--socket", "socket_path", default=None, help="listen on this unix socket")
@click.option("-e", "--shared", type=int, default=1, show_default=True,
              help="clients served at once (0: unlimited)")
@click.option("--handshake-limit", type=float, default=10.0, show_default=True,
              help="seconds a client has to finish negotiation (0: no limit)")
@click.option("-t", "--persistent", is_flag=True, help="keep serving after the last client leaves")
@click.option("--cache", default="writeback", show_default=True,
              type=click.Choice(["none", "writeback", "writethrough", "directsync", "unsafe"]))
@click.option("--discard", default="ignore", show_default=True,
              type=click.Choice(["ignore", "unmap", "off", "on"]))
@click.option("--detect-zeroes", default="off", show_default=True,
              type=click.Choice(["off", "on", "unmap"]))
@click.option("-B", "--bitmap", "bitmaps", multiple=True,
              help="export this qcow2 persistent dirty bitmap as qemu:dirty-bitmap:NAME")
@click.option("-A", "--allocation-depth", is_flag=True, help="export qemu:allocation-depth")
@click.option("--tls-creds", default=None,
              help="directory with server-cert.pem, server-key.pem (and ca-cert.pem)")
@click.option("--pid-file", default=None, help="write the server's pid here")
@click.option("--fork", "fork", is_flag=True, help="run in the background once listening")
@click.option("-v", "--verbose", is_flag=True, help="log connections")
def nbd_command(files: tuple[str, ...], fmt: str | None, readonly: bool, names: tuple[str, ...],
                descriptions: tuple[str, ...], port: int | None, bind: str | None,
                socket_path: str | None, shared: int, handshake_limit: float, persistent: bool,
                cache: str, discard: str,
                detect_zeroes: str, bitmaps: tuple[str, ...], allocation_depth: bool,
                tls_creds: str | None, pid_file: str | None, fork: bool, verbose: bool) -> int:
    """Serve FILE(s) over NBD, as qemu-nbd does (several FILEs: several exports)."""
    import vdisk
    from vdisk import locking

    from ..nbd.server import Export, NbdServer, tls_context_from_dir

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="vdisk nbd: %(message)s")
    if names and len(names) != len(files):
        raise VdiskError(f"{len(files)} file(s) but {len(names)} export name(s): give one -x per file")
    if socket_path and (port is not None or bind is not None):
        raise VdiskError("-k cannot be combined with -p or -b")
    if shared < 0:
        raise VdiskError("-e must be at least 0")
    if handshake_limit < 0:
        raise VdiskError("--handshake-limit must be at least 0")
    if len(descriptions) > len(files):
        raise VdiskError("more descriptions (-D) than files")
    exports: list[Export] = []
    devices: list[Any] = []
    try:
        for i, path in enumerate(files):
            if names:
                name = names[i]
            elif len(files) == 1:
                name = ""
            else:
                name = os.path.basename(path)
            device = vdisk.open(path, format=fmt, readonly=readonly)
            devices.append(device)
            sources = []
            if bitmaps and i == 0:
                sources = [_export_bitmap(device, path, b) for b in bitmaps]
            locking.lock_for_export(device)  # as qemu-nbd: nobody resizes what we announced
            exports.append(Export(
                device, name=name, description=descriptions[i] if i < len(descriptions) else "",
                readonly=readonly or device.readonly, discard=discard,
                detect_zeroes=detect_zeroes, cache=cache, allocation_depth=allocation_depth,
                # One device object behind every connection: consistent across them, so
                # multi-conn is safe whenever the server takes more than one client.
                bitmaps=sources, multi_conn=shared != 1,
            ))
        _raise_nofile_limit()
        tls = tls_context_from_dir(tls_creds) if tls_creds else None
        server = NbdServer(exports, tls_context=tls, shared=shared, persistent=persistent,
                           handshake_limit=handshake_limit)
        if socket_path:
            server.listen_unix(socket_path)
        else:
            server.listen_tcp(bind or "0.0.0.0", 10809 if port is None else port)
        ready_fd = _daemonize() if fork else None
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        if ready_fd is not None:
            os.write(ready_fd, b"x")  # the parent exits now: we are listening, pid file written
            os.close(ready_fd)
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown(timeout=0))
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
            if pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(pid_file)
    finally:
        for device in devices:
            with contextlib.suppress(Exception):
                device.flush()
            device.close()
    return 0


def _export_bitmap(device: Any, path: str, name: str) -> Any:
    """The bitmap a -B export serves: the open image's own (it tracks this export's writes)."""
    from ..qcow2 import Qcow2Image
    from ..qcow2.bitmap import load_bitmap

    if isinstance(device, Qcow2Image):
        return device.bitmap(name)
    return load_bitmap(path, name)


def _raise_nofile_limit() -> None:
    """Lift the soft descriptor limit to the hard one: every connection, even one still
    negotiating, holds a descriptor, and running out would stall accept for real clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _daemonize() -> int:
    """Fork into the background; the parent exits once the child reports ready on the fd
    returned (sockets already listen, so clients can connect as soon as the parent is gone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return w


COMMANDS: list[click.Command] = [nbd_command]
