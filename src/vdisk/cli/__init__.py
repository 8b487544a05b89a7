"""The ``vdisk`` command: qemu-img-compatible image tools plus the ublk and NBD servers.

This package only parses arguments; the work lives in the library. Every VdiskError (and any
OSError) becomes one line on stderr and a nonzero exit status, never a traceback.

The command tree is lazy: ``COMMAND_TABLE`` maps each command name to its module and one-line
help, so ``vdisk --help`` lists the commands without importing them and ``vdisk info`` imports
only ``cli/info.py``.
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import VdiskError

# name -> (module under vdisk.cli, attribute, one-line help shown by --help)
COMMAND_TABLE: dict[str, tuple[str, str, str]] = {
    "amend": (
        "amend",
        "amend_cmd",
        "Change the format-specific options of the image FILE, like qemu-img amend.",
    ),
    "bench": (
        "bench",
        "bench_cmd",
        "Run a simple I/O benchmark on FILE, like qemu-img bench.",
    ),
    "bitmap": (
        "bitmap",
        "bitmap_cmd",
        "Change the persistent dirty bitmaps of FILE, like qemu-img bitmap.",
    ),
    "check": (
        "check",
        "check_cmd",
        "Check a qcow2 image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 1 failed).",
    ),
    "commit": (
        "commit",
        "commit_cmd",
        "Commit the changes in FILE into its backing file (or BASE), like qemu-img commit.",
    ),
    "compare": (
        "compare",
        "compare_cmd",
        "Compare the contents of FILE1 and FILE2, like qemu-img compare (0 same, 1 differ).",
    ),
    "convert": (
        "convert",
        "convert_cmd",
        "Convert the source images (concatenated) into DST, like qemu-img convert.",
    ),
    "create": (
        "create",
        "create_cmd",
        "Create an image FILE of SIZE bytes (suffixes k, M, G, T, P, E).",
    ),
    "dd": (
        "dd",
        "dd_cmd",
        "Copy IN into a new image OUT (of format -O), like qemu-img dd.",
    ),
    "info": (
        "info",
        "info_cmd",
        "Show information about the image FILE, like qemu-img info.",
    ),
    "map": (
        "map",
        "map_cmd",
        "Print the allocation map of FILE (and its backing chain), like qemu-img map.",
    ),
    "measure": (
        "measure",
        "measure_cmd",
        "Print the size a new image needs, like qemu-img measure.",
    ),
    "nbd": (
        "nbd",
        "nbd_command",
        "Serve FILE(s) over NBD, as qemu-nbd does (several FILEs: several exports).",
    ),
    "rebase": (
        "rebase",
        "rebase_cmd",
        "Change the backing file of FILE, keeping its content (-u: the header only).",
    ),
    "resize": (
        "resize",
        "resize_cmd",
        "Resize FILE to SIZE, or by +SIZE / -SIZE, like qemu-img resize.",
    ),
    "snapshot": (
        "snapshot",
        "snapshot_cmd",
        "List, create, apply or delete internal snapshots of FILE, like qemu-img snapshot.",
    ),
    "ublk": (
        "ublk",
        "ublk_group",
        "Serve images as Linux block devices through ublk (/dev/ublkbN).",
    ),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when run (or asked for their help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_TABLE)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMAND_TABLE.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(f"{__name__}.{entry[0]}")
        command: click.Command = getattr(module, entry[1])
        from .options import add_secret_options  # --object, --image-opts on every command

        add_secret_options(cmd_name, command)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in COMMAND_TABLE and not args[0].startswith("-"):
            # qemu-img's words for an unknown command.
            raise click.UsageError(
                f"Command not found: {args[0]}\nTry 'vdisk --help' for more information"
            )
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMAND_TABLE[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
)
@click.version_option(
    __version__, "-V", "--version", prog_name="vdisk", message="%(prog)s version %(version)s"
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """vdisk: QCOW2 and raw images, exported over ublk and NBD."""
    if ctx.invoked_subcommand is None:
        # A bare qemu-img says what is missing and exits 1.
        raise click.UsageError("Not enough arguments\nTry 'vdisk --help' for more information")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning errors into one line and qemu-img's exit codes."""
    try:
        result = cli.main(args=argv, prog_name="vdisk", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vdisk: aborted", err=True)
        return 1
    except click.ClickException as exc:
        # qemu-img exits 1 on a bad flag; click's default would be 2.
        click.echo(f"vdisk: {exc.format_message()}", err=True)
        return 1
    except VdiskError as exc:
        click.echo(f"vdisk: {exc}", err=True)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"vdisk: {where}{exc.strerror or exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("vdisk: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())
