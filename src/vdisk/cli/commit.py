"""``vdisk commit``: qemu-img commit's flags and messages; the work is ``vdisk.commit``."""

from __future__ import annotations

import click


@click.command("commit")
@click.option("-f", "fmt", metavar="FMT", help="Image format (qcow2).")
@click.option("-b", "base", metavar="BASE", help="Commit into BASE, deeper in the chain (-d).")
@click.option("-d", "drop", is_flag=True, help="Do not empty FILE afterwards.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-r", "rate", metavar="RATE", help="Rate limit (bytes/s, suffixes allowed).")
@click.option(
    "-t",
    "cache",
    default="writeback",
    metavar="CACHE",
    help="Cache mode of the base (default writeback).",
)
@click.argument("file")
def commit_cmd(
    fmt: str | None,
    base: str | None,
    drop: bool,
    progress: bool,
    quiet: bool,
    rate: str | None,
    cache: str,
    file: str,
) -> int:
    """Commit the changes in FILE into its backing file (or BASE), like qemu-img commit."""
    import vdisk

    from .. import commit
    from .converting import check_cache_modes, check_rate
    from .progress import Progress

    vdisk.check_format(fmt, file)
    check_cache_modes(cache)
    settings = commit.CommitSettings(cache, check_rate(rate))
    show = Progress() if progress and not quiet else None
    if show is not None:
        show(0, 1)
    commit.commit(file, fmt, base, drop, show, settings)
    if show is not None:
        show.close()
    if not quiet:
        click.echo("Image committed.")
    return 0
