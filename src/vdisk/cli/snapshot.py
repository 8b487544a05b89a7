"""``vdisk snapshot -l|-c|-a|-d NAME FILE``, as ``qemu-img snapshot`` (7.2).

Flags are read as qemu-img's getopt reads them (so ``-l -l`` is "Cannot mix", ``-f`` is
unknown); messages and exit codes are qemu-img's. The work is ``vdisk.qcow2.snapshot``.
"""

from __future__ import annotations

import errno as _errno
import getopt
import os

import click

from ..errors import VdiskError

_TRY = "\nTry 'vdisk --help' for more information"
_NAME_MAX = 255  # qemu-img copies the name into a 256-byte buffer


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message + _TRY)


def _parse(args: list[str]) -> tuple[str | None, str, str, bool]:
    """(action letter or None, snapshot name, file, force_share)."""
    try:
        opts, rest = getopt.gnu_getopt(args, "la:c:d:qU", ["force-share", "object=", "image-opts"])
    except getopt.GetoptError as exc:
        flag = f"-{exc.opt}" if len(exc.opt) == 1 else f"--{exc.opt}"
        if "requires argument" in exc.msg:
            raise _usage(f"missing argument for option '{flag}'") from None
        raise _usage(f"unrecognized option '{flag}'") from None
    action: str | None = None
    name = ""
    force_share = False
    for flag, value in opts:
        if flag in ("-l", "-a", "-c", "-d"):
            if action is not None:
                raise _usage("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = flag[1], value
        elif flag in ("-U", "--force-share"):
            force_share = True
        elif flag in ("--object", "--image-opts"):
            raise VdiskError(f"{flag} is not supported by vdisk snapshot")
    if len(rest) != 1:
        raise _usage("Expecting one image file name")
    return action, name, rest[0], force_share


def _list(path: str, force_share: bool) -> None:
    import vdisk

    from ..info import _snapshot_info, _snapshot_line

    with vdisk.open(path, readonly=True, force_share=force_share) as dev:
        snapshots = list(getattr(dev, "snapshots", []))
    if snapshots:
        lines = ["Snapshot list:", _snapshot_line(None)]
        lines += [_snapshot_line(_snapshot_info(sn)) for sn in snapshots]
        click.echo("\n".join(lines))


def _change(action: str, name: str, path: str, force_share: bool) -> None:
    import vdisk

    from ..qcow2 import Qcow2Image
    from ..qcow2.snapshot import SnapshotNotFoundError

    if force_share:
        raise VdiskError(
            f"Could not open '{path}': force-share=on can only be used with read-only images"
        )
    with vdisk.open(path, readonly=False) as dev:
        if action == "c":
            short = name.encode()[:_NAME_MAX].decode(errors="ignore")
            try:
                if not isinstance(dev, Qcow2Image):
                    raise VdiskError("no snapshots", errno=_errno.ENOTSUP)
                dev.create_snapshot(short)
            except VdiskError as exc:
                code = exc.errno
                raise VdiskError(
                    f"Could not create snapshot '{name}': -{code} ({os.strerror(code)})"
                ) from None
        elif action == "a":
            try:
                if not isinstance(dev, Qcow2Image):
                    raise VdiskError("Block driver does not support snapshots")
                dev.apply_snapshot(name)
            except SnapshotNotFoundError:
                raise VdiskError(
                    f"Could not apply snapshot '{name}': Failed to load snapshot: "
                    "No such file or directory"
                ) from None
            except VdiskError as exc:
                raise VdiskError(f"Could not apply snapshot '{name}': {exc.message}") from None
        else:
            try:
                if not isinstance(dev, Qcow2Image):
                    raise SnapshotNotFoundError("snapshot not found")
                # qemu-img deletes by name only (the first snapshot of that name).
                dev.delete_snapshot(name, by_id=False)
            except SnapshotNotFoundError:
                raise VdiskError(
                    f"Could not delete snapshot '{name}': snapshot not found"
                ) from None
            except VdiskError as exc:
                raise VdiskError(f"Could not delete snapshot '{name}': {exc.message}") from None


def convert_snapshot_key(spec: str) -> str | dict[str, str]:
    """``convert -l``'s argument as qemu-img reads it: options when it starts with
    'snapshot.' (snapshot.id, snapshot.name), otherwise an ID or name."""
    if not spec.startswith("snapshot."):
        return spec
    key: dict[str, str] = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        field = name.removeprefix("snapshot.") if name.startswith("snapshot.") else ""
        if field not in ("id", "name"):
            raise VdiskError(
                f"Invalid parameter '{name}'\nvdisk: Failed in parsing snapshot param '{spec}'"
            )
        key[field] = value
    return key


@click.command(
    "snapshot",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def snapshot_cmd(args: tuple[str, ...]) -> int:
    """List, create, apply or delete internal snapshots of FILE, like qemu-img snapshot.

    \b
    vdisk snapshot [-U] [-q] [-l | -a NAME | -c NAME | -d NAME] FILE
      -l        list the snapshots
      -c NAME   create a snapshot NAME
      -a NAME   apply (revert to) the snapshot with ID or name NAME
      -d NAME   delete the first snapshot named NAME
      -U        force share (with -l)
      -q        quiet
    """
    action, name, path, force_share = _parse(list(args))
    if action == "l":
        _list(path, force_share)
    elif action is not None:
        _change(action, name, path, force_share)
    else:
        import vdisk

        # qemu-img opens the image read-write and does nothing.
        vdisk.open(path, readonly=False, force_share=force_share).close()
    return 0


COMMANDS: tuple[click.Command, ...] = (snapshot_cmd,)
