"""The ``vdisk`` command: qemu-img-compatible image tools plus the ublk and NBD servers.

This package only parses arguments; the work lives in the library. Every VdiskError (and any
OSError) becomes one line on stderr and a nonzero exit status, never a traceback.
"""

from __future__ import annotations

import sys

import click

from ..errors import VdiskError
from . import bench, check, compare, convert, create, dd, info, map, measure, nbd, resize, ublk


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vdisk")
def cli() -> None:
    """vdisk: QCOW2 and raw images, exported over ublk and NBD."""


for module in (create, info, nbd, ublk, map, compare, check, convert, dd, bench, resize, measure):
    for command in module.COMMANDS:
        cli.add_command(command)


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
