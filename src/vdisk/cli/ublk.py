"""`vdisk ublk`: serve images as /dev/ublkbN, in the manner of ublksrv's `ublk` tool.

    vdisk ublk add -t qcow2|raw|mem|null|zip -f FILE [-q N] [-d DEPTH] [-n ID] [--foreground]
    vdisk ublk add -t nbd URI   (a remote NBD export, as nbd-client without the nbd module)
    vdisk ublk list [-n ID] [--json]
    vdisk ublk del -n ID | -a
    vdisk ublk recover -n ID [-t TYPE -f FILE]
    vdisk ublk features
"""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import VdiskError
from ..sizes import parse_size

if TYPE_CHECKING:
    from ..block import BlockDevice

BACKEND_TYPES = ("qcow2", "raw", "mem", "null", "zip", "nbd")


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


def open_backend(
    kind: str, file: str | None, size: int | None = None, readonly: bool = False
) -> BlockDevice:
    """A BlockDevice for ``vdisk ublk add -t KIND -f FILE`` (and recover)."""
    if kind in ("qcow2", "raw", "zip") and not file:
        raise VdiskError(f"-t {kind} needs a file (-f FILE)")
    if kind == "nbd":
        from ..nbd.backing import open_nbd_export

        return open_nbd_export(file or "", readonly=readonly)
    if kind in ("qcow2", "raw"):
        import vdisk
        from vdisk import locking

        device = vdisk.open(file or "", format=kind, readonly=readonly)
        locking.lock_for_export(device)  # as qemu-nbd does: nobody resizes what we serve
        return device
    if kind == "zip":
        from ..backends.zipmember import ZipMemberDevice, split_member

        return ZipMemberDevice(*split_member(file or ""))
    if kind in ("mem", "null"):
        if not size:
            raise VdiskError(f"-t {kind} needs --size")
        if kind == "mem":
            from ..backends.memory import MemoryDevice

            return MemoryDevice(size, readonly=readonly)
        from ..backends.null import NullDevice

        return NullDevice(size, readonly=readonly)
    raise VdiskError(f"unknown ublk target type {kind!r} (known: {', '.join(BACKEND_TYPES)})")


@click.group("ublk")
def ublk_group() -> None:
    """Serve images as Linux block devices through ublk (/dev/ublkbN)."""


@ublk_group.command("add")
@click.option("-t", "--type", "kind", required=True,
              type=click.Choice(BACKEND_TYPES), help="backend type")
@click.option("-f", "--file", "file", default=None,
              help="image file (zip: ARCHIVE or ARCHIVE:MEMBER; nbd: URI)")
@click.argument("uri", required=False)
@click.option("-q", "--queues", type=int, default=1, show_default=True, help="hardware queues")
@click.option("-d", "--depth", type=int, default=128, show_default=True, help="queue depth")
@click.option("-n", "--number", "dev_id", type=int, default=-1,
              help="device id (default: the kernel picks)")
@click.option("--size", callback=_size, default=None,
              help="device size (mem and null; for files at most the file's size)")
@click.option("--foreground", is_flag=True, help="serve in this process instead of a daemon")
@click.option("--metrics-port", type=int, default=None,
              help="serve Prometheus metrics on 127.0.0.1:PORT")
@click.option("-r", "--recovery", is_flag=True,
              help="keep the device when the server dies, for `vdisk ublk recover`")
@click.option("--read-only", "readonly", is_flag=True, help="a read-only device")
@click.option("--logical-block-size", callback=_size, default="512", show_default=True)
@click.option("--physical-block-size", callback=_size, default="4096", show_default=True)
@click.option("--max-io-size", callback=_size, default="512k", show_default=True,
              help="largest request (and per-tag buffer)")
@click.option("--no-discard", is_flag=True, help="do not advertise discard/write-zeroes")
@click.option("--writethrough", is_flag=True,
              help="advertise no volatile cache (the kernel then sends no flushes)")
@click.option("--rotational", is_flag=True, help="advertise a rotational disk")
@click.option("--need-get-data", is_flag=True, help="use UBLK_F_NEED_GET_DATA for writes")
@click.option("-v", "--verbose", is_flag=True, help="log request errors and lifecycle")
def add_command(kind: str, file: str | None, uri: str | None, queues: int, depth: int, dev_id: int,
                size: int | None, foreground: bool, metrics_port: int | None, recovery: bool,
                readonly: bool, logical_block_size: int, physical_block_size: int,
                max_io_size: int, no_discard: bool, writethrough: bool, rotational: bool,
                need_get_data: bool, verbose: bool) -> int:
    """Create a ublk device serving FILE; print /dev/ublkbN once it is ready."""
    from ..ublk import serve
    from ..ublk.device import UblkParams

    _logging(verbose)
    if uri is not None:  # `-t nbd URI`: the export in place of -f FILE
        if file is not None:
            raise VdiskError(f"give either -f FILE or {uri!r}, not both")
        file = uri
    params = UblkParams(
        queues=queues, depth=depth, max_io_buf_bytes=max_io_size,
        logical_block_size=logical_block_size, physical_block_size=physical_block_size,
        discard=not no_discard, volatile_cache=not writethrough, rotational=rotational,
        dev_id=dev_id, user_recovery=recovery, need_get_data=need_get_data,
        readonly=True if readonly or kind == "zip" else None,
        size=size if kind not in ("mem", "null") else None,
    )
    return serve.run(
        lambda: serve.add(open_backend, kind, file, params, size, readonly),
        foreground, lambda path: click.echo(path), metrics_port,
    )


@ublk_group.command("recover")
@click.option("-n", "--number", "dev_id", type=int, required=True, help="device id")
@click.option("-t", "--type", "kind", default=None,
              type=click.Choice(BACKEND_TYPES),
              help="backend type (default: as recorded when the device was added)")
@click.option("-f", "--file", "file", default=None, help="image file (default: as recorded)")
@click.option("--foreground", is_flag=True, help="serve in this process instead of a daemon")
@click.option("--metrics-port", type=int, default=None)
@click.option("-v", "--verbose", is_flag=True)
def recover_command(dev_id: int, kind: str | None, file: str | None, foreground: bool,
                    metrics_port: int | None, verbose: bool) -> int:
    """Reattach a device whose server died (added with --recovery)."""
    from ..ublk import serve

    _logging(verbose)
    return serve.run(lambda: serve.recover(open_backend, dev_id, kind, file), foreground,
                     lambda path: click.echo(path), metrics_port)


@ublk_group.command("list")
@click.option("-n", "--number", "dev_id", type=int, default=None, help="only this device")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_command(dev_id: int | None, as_json: bool) -> int:
    """List ublk devices (GET_DEV_INFO, GET_PARAMS and the server's note)."""
    from ..ublk import uapi
    from ..ublk.control import Control, list_device_ids
    from ..ublk.device import read_note
    from ..ublk.errors import UblkError

    ids = [dev_id] if dev_id is not None else list_device_ids()
    rows: list[dict[str, Any]] = []
    with Control() as ctl:
        for i in ids:
            try:
                info = ctl.get_dev_info(i)
            except UblkError as exc:
                if exc.errno != errno.ENODEV:
                    raise
                if dev_id is None:
                    continue  # deleted while we looked
                raise UblkError(errno.ENODEV, f"list ublk{i}", "no such device") from None
            try:
                params: uapi.Params | None = ctl.get_params(i)
            except UblkError:
                params = None
            note = read_note(i) or {}
            rows.append({
                "dev_id": i,
                "state": info.state_name,
                "nr_hw_queues": info.nr_hw_queues,
                "queue_depth": info.queue_depth,
                "max_io_buf_bytes": info.max_io_buf_bytes,
                "pid": info.ublksrv_pid,
                "flags": uapi.feature_names(info.flags),
                "size": (params.basic.dev_sectors << 9) if params else None,
                "logical_block_size": (1 << params.basic.logical_bs_shift) if params else None,
                "type": note.get("type"),
                "file": note.get("file"),
            })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        click.echo(
            f"dev id {r['dev_id']}: nr_hw_queues {r['nr_hw_queues']} queue_depth "
            f"{r['queue_depth']} block size {r['logical_block_size']} dev_capacity "
            f"{(r['size'] or 0) >> 9}"
        )
        click.echo(
            f"\tmax rq size {r['max_io_buf_bytes']} daemon pid {r['pid']} "
            f"flags {','.join(r['flags']) or '-'} state {r['state']}"
        )
        click.echo(f"\ttype {r['type'] or '?'} file {r['file'] or '-'}")
        click.echo(f"\tblock /dev/ublkb{r['dev_id']} char /dev/ublkc{r['dev_id']}")
    return 0


@ublk_group.command("del")
@click.option("-n", "--number", "dev_id", type=int, default=None, help="device id")
@click.option("-a", "--all", "all_", is_flag=True, help="every ublk device")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="seconds to wait for the server to let go")
def del_command(dev_id: int | None, all_: bool, timeout: float) -> int:
    """Stop and delete device(s); their servers exit."""
    from ..ublk.control import Control, list_device_ids
    from ..ublk.device import delete
    from ..ublk.errors import UblkError

    if (dev_id is None) == (not all_):
        raise VdiskError("give exactly one of -n ID and -a")
    ids = list_device_ids() if all_ else [dev_id or 0]
    status = 0
    with Control(timeout=timeout) as ctl:
        for i in ids:
            try:
                delete(i, ctl, timeout)
            except UblkError as exc:
                if exc.errno == errno.ENODEV and all_:
                    continue
                click.echo(f"vdisk: {exc}", err=True)
                status = 1
    return status


@ublk_group.command("features")
@click.option("--json", "as_json", is_flag=True)
def features_command(as_json: bool) -> int:
    """Show what the kernel's ublk driver supports."""
    from ..ublk import uapi
    from ..ublk.control import Control, encoded_mode

    with Control() as ctl:
        mask = ctl.get_features()
        if mask is None:
            # Probe the opcode form with a harmless command on a device id that cannot exist.
            try:
                ctl.get_dev_info((1 << 20) - 1)
            except VdiskError:
                pass
    mode = {True: "ioctl-encoded", False: "legacy", None: "unknown"}[encoded_mode()]
    if as_json:
        click.echo(json.dumps({
            "features": None if mask is None else uapi.feature_names(mask),
            "mask": mask, "opcodes": mode,
        }))
        return 0
    if mask is None:
        click.echo("GET_FEATURES: not supported by this kernel (older ublk driver)")
    else:
        click.echo(f"features 0x{mask:x}: {' '.join(uapi.feature_names(mask))}")
    click.echo(f"opcodes: {mode}")
    return 0


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="vdisk ublk: %(message)s",
    )
    logging.Formatter.converter = time.gmtime


COMMANDS: list[click.Command] = [ublk_group]
