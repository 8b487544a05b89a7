"""``vdisk commit``: qemu-img commit's flags and messages; the work is ``vdisk.commit``."""

from __future__ import annotations

import click

from ..errors import RequestError, VdiskError
from ..sizes import parse_size


@click.command("commit")
@click.option("-f", "fmt", metavar="FMT", help="Image format (qcow2).")
@click.option("-b", "base", metavar="BASE", help="Commit into BASE, deeper in the chain (-d).")
@click.option("-d", "drop", is_flag=True, help="Do not empty FILE afterwards.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-r", "rate", metavar="RATE", help="Accepted (rate limit, bytes/s; not applied).")
@click.option("-t", "cache", metavar="CACHE", help="Accepted (cache mode).")
@click.argument("file")
def commit_cmd(
    fmt: str | None,
    base: str | None,
    drop: bool,
    progress: bool,
    quiet: bool,
    rate: str | None,
    cache: str | None,
    file: str,
) -> int:
    """Commit the changes in FILE into its backing file (or BASE), like qemu-img commit."""
    import vdisk

    from .. import commit
    from .progress import Progress

    vdisk.check_format(fmt, file)
    if rate is not None:
        try:
            parse_size(rate)
        except VdiskError:
            raise RequestError("Invalid rate limit specified") from None
    show = Progress() if progress and not quiet else None
    if show is not None:
        show(0, 1)
    commit.commit(file, fmt, base, drop, show)
    if show is not None:
        show.close()
    if not quiet:
        click.echo("Image committed.")
    return 0
