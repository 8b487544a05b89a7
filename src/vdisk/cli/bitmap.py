"""``vdisk bitmap``: qemu-img bitmap's actions, checks, messages and exit codes.

Actions run in command-line order on one read-write open of FILE, each stored durably before
the next; the work is ``Qcow2Image``'s bitmap methods (``vdisk.qcow2.bitmap``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import RequestError, VdiskError
from ..sizes import parse_size

_GRANULARITY_HELP = (
    "Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n"
    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


_F = TypeVar("_F", bound=Callable[..., Any])


def _record(action: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that appends (action, value) to the ordered action list."""

    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value:
            ctx.meta.setdefault("bitmap_actions", []).extend(
                (action, v) for v in (value if isinstance(value, tuple) else (value,))
            )
        return value

    return callback


def _flag(name: str, text: str) -> Callable[[_F], _F]:
    return click.option(
        f"--{name}", is_flag=True, expose_value=False, callback=_record(name), help=text
    )


@click.command("bitmap")
@_flag("add", "Add bitmap NAME (enabled unless --disable follows).")
@_flag("remove", "Remove bitmap NAME.")
@_flag("clear", "Clear every bit of NAME.")
@_flag("enable", "Make NAME track writes.")
@_flag("disable", "Stop NAME tracking writes.")
@click.option(
    "--merge",
    "merge",
    multiple=True,
    metavar="SOURCE",
    expose_value=False,
    callback=_record("merge"),
    help="Merge bitmap SOURCE (of FILE, or of -b IMG) into NAME.",
)
@click.option("-g", "granularity", metavar="SIZE", help="Granularity of a new bitmap (--add).")
@click.option("-b", "source_file", metavar="IMG", help="Image holding the --merge source.")
@click.option("-F", "source_fmt", metavar="FMT", help="Format of -b IMG.")
@click.option("-f", "fmt", metavar="FMT", help="Format of FILE.")
@click.argument("args", nargs=-1)
@click.pass_context
def bitmap_cmd(
    ctx: click.Context,
    granularity: str | None,
    source_file: str | None,
    source_fmt: str | None,
    fmt: str | None,
    args: tuple[str, ...],
) -> int:
    """Change the persistent dirty bitmaps of FILE, like qemu-img bitmap."""
    import vdisk

    actions: list[tuple[str, Any]] = ctx.meta.get("bitmap_actions", [])
    if not actions:
        raise RequestError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    names = {a for a, _v in actions}
    size = _granularity(granularity)
    if size and "add" not in names:
        raise RequestError("granularity only supported with --add")
    if source_fmt and not source_file:
        raise RequestError("-F only supported with -b")
    if source_file and "merge" not in names:
        raise RequestError("Merge bitmap source file only supported with --merge")
    if len(args) != 2:
        raise RequestError("Expecting filename and bitmap name")
    path, name = args
    vdisk.check_format(fmt, path)
    vdisk.check_format(source_fmt, source_file)
    device = _open(path, fmt, readonly=False)
    source = None
    try:
        if source_file:
            source = _open(source_file, source_fmt, readonly=True)
        for action, value in actions:
            try:
                _run(device, source, action, value, name, size or None)
            except VdiskError as exc:
                raise VdiskError(
                    f"Operation {action} on bitmap {name} failed: {exc.message}", errno=exc.errno
                ) from None
    finally:
        if source is not None:
            source.close()
        device.close()
    return 0


def _open(path: str, fmt: str | None, readonly: bool) -> Any:
    """Open as qemu-img reports a file it cannot open (its words twice, as it prints them)."""
    import vdisk

    try:
        return vdisk.open(path, format=fmt, readonly=readonly)
    except VdiskError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
            text = f"Could not open '{path}': {os.strerror(exc.errno)}"
            raise VdiskError(f"Could not open '{path}': {text}", errno=exc.errno) from None
        raise


def _granularity(text: str | None) -> int:
    if text is None:
        return 0
    try:
        return parse_size(text)
    except VdiskError:
        raise RequestError(_GRANULARITY_HELP) from None


def _run(
    device: Any, source: Any, action: str, value: Any, name: str, granularity: int | None
) -> None:
    from ..qcow2 import Qcow2Image

    if not isinstance(device, Qcow2Image):
        if action == "add":
            raise VdiskError(
                f"Can't store persistent bitmaps to {device.name}: Operation not supported"
            )
        missing = value if action == "merge" else name
        raise VdiskError(f"Dirty bitmap '{missing}' not found")
    if action == "add":
        device.add_bitmap(name, granularity)
    elif action == "remove":
        device.remove_bitmap(name)
    elif action == "clear":
        device.clear_bitmap(name)
    elif action in ("enable", "disable"):
        device.enable_bitmap(name, action == "enable")
    elif source is None:
        device.merge_bitmap(name, value)
    elif isinstance(source, Qcow2Image):
        device.merge_bitmap(name, value, source)
    else:
        raise VdiskError(f"Dirty bitmap '{value}' not found")
