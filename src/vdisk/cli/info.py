"""``vdisk info``: qemu-img info's flags; the data and its renderings are ``vdisk.info``."""

from __future__ import annotations

import click

from .options import check_output


@click.command("info")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("--backing-chain", "chain", is_flag=True, help="Show every image of the chain.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
@click.argument("file")
def info_cmd(fmt: str | None, output: str, chain: bool, force_share: bool, file: str) -> int:
    """Show information about the image FILE, like qemu-img info."""
    from ..info import report

    check_output(output)
    click.echo(report(file, fmt, output, chain, force_share), nl=False)
    return 0


COMMANDS: tuple[click.Command, ...] = (info_cmd,)
