"""``vdisk compare``: qemu-img compare's flags, messages and exit statuses (0 same, 1 differ,
2 an image failed to open, 3 block status failed, 4 a read failed); the work is
``vdisk.compare``."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..block import BlockDevice, SectorPadded
from ..errors import VdiskError
from .progress import Progress


@click.command("compare")
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option("-s", "strict", is_flag=True, help="Strict mode: sizes and allocation must match.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print nothing, only set the exit status.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Force share: open read-only beside a writer (no write lock).",
)
@click.argument("file1")
@click.argument("file2")
def compare_cmd(
    fmt1: str | None,
    fmt2: str | None,
    strict: bool,
    quiet: bool,
    progress: bool,
    force_share: bool,
    file1: str,
    file2: str,
) -> int:
    """Compare the contents of FILE1 and FILE2, like qemu-img compare (0 same, 1 differ)."""
    import vdisk

    from ..backends.raw import RawDevice
    from ..compare import compare

    devs: list[BlockDevice] = []
    show: Progress | None = None
    try:
        try:
            for path, fmt in ((file1, fmt1), (file2, fmt2)):
                vdisk.check_format(fmt, path)
                devs.append(vdisk.open(path, format=fmt, readonly=True, force_share=force_share))
        except (VdiskError, OSError) as exc:
            click.echo(f"vdisk: {exc}", err=True)
            return 2
        a, b = (SectorPadded(d) if isinstance(d, RawDevice) else d for d in devs)
        show = Progress(min_step=2.0, stepwise=True) if progress and not quiet else None
        if show is not None:
            show(0, max(a.size, b.size))
        result = compare(a, b, file1, file2, strict, show, None if quiet else _say(show))
    finally:
        for dev in devs:
            dev.close()
    if show is not None:
        show.close()  # qemu-img ends its progress output after the verdict
    if result.error is not None:
        click.echo(f"vdisk: {result.error}", err=True)
    return result.status


def _say(show: Progress | None) -> Callable[[str], None]:
    """Print a line of the outcome where it falls among the progress output."""

    def say(line: str) -> None:
        if show is not None:
            show.close_bar()
        click.echo(line)

    return say


COMMANDS: tuple[click.Command, ...] = (compare_cmd,)
