"""``vdisk rebase``: qemu-img rebase's flags and messages; the work is ``vdisk.rebase``."""

from __future__ import annotations

import click

from ..errors import RequestError


@click.command("rebase")
@click.option("-f", "fmt", metavar="FMT", help="Image format (qcow2).")
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the new backing file.")
@click.option("-b", "backing", metavar="BACKING", help='New backing file ("" for none).')
@click.option("-u", "unsafe", is_flag=True, help="Unsafe: change only the header.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-t", "cache", metavar="CACHE", help="Accepted (cache mode of FILE).")
@click.option("-T", "src_cache", metavar="CACHE", help="Accepted (cache mode of the backings).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (not applied: rebase opens the image read-write).")
@click.argument("file")
def rebase_cmd(
    fmt: str | None,
    backing_fmt: str | None,
    backing: str | None,
    unsafe: bool,
    progress: bool,
    quiet: bool,
    cache: str | None,
    src_cache: str | None,
    force_share: bool,
    file: str,
) -> int:
    """Change the backing file of FILE, keeping its content (-u: the header only)."""
    import vdisk

    from .. import rebase
    from .progress import Progress

    if backing is None and not unsafe:
        raise click.UsageError(
            "Must specify backing file (-b) or use unsafe mode (-u)\n"
            "Try 'vdisk --help' for more information"
        )
    vdisk.check_format(fmt, file)
    vdisk.check_format(backing_fmt, backing)
    if backing and not backing_fmt:
        raise RequestError(
            f"Could not change the backing file to '{backing}': backing format must be specified"
        )
    show = Progress() if progress and not quiet else None
    if show is not None:
        show(0, 1)
    rebase.rebase(file, backing or "", backing_fmt, unsafe=unsafe, progress=show)
    if show is not None:
        show.close()
    return 0
