"""``vdisk convert``: qemu-img convert's flags, as click parses them; the work (checks,
messages, the copy, signals) is ``cli/converting.py``, which ``cli/quick.py`` calls directly
for the plain spellings."""

from __future__ import annotations

import click


@click.command("convert")
@click.option("-f", "fmt", metavar="FMT", help="Source format (default: probe).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (raw, qcow2).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Output creation options.")
@click.option("-B", "backing", metavar="BACKING", help="The target's backing file.")
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the -B backing file.")
@click.option("-n", "skip_create", is_flag=True, help="Write into an existing target.")
@click.option("-S", "sparse", default="4k", metavar="SIZE", help="Zero run that stays sparse.")
@click.option("-W", "out_of_order", is_flag=True, help="Allow out-of-order writes.")
@click.option("-m", "workers", default="8", metavar="N", help="Parallel requests (1-16).")
@click.option("--salvage", is_flag=True, help="Read errors: warn, write zeros, go on.")
@click.option("-r", "rate", metavar="RATE", help="Rate limit (bytes/s, suffixes allowed).")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-c", "compress", is_flag=True, help="Compress the target's clusters.")
@click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Force share: open read-only beside a writer (no write lock).",
)
@click.option(
    "-t",
    "cache",
    default="unsafe",
    metavar="CACHE",
    help="Target cache mode (default unsafe: no flush).",
)
@click.option(
    "-l",
    "snapshot",
    metavar="SNAPSHOT",
    help="Convert from an internal snapshot: snapshot.id=ID, snapshot.name=NAME or ID/NAME.",
)
@click.option(
    "-T",
    "src_cache",
    default="writeback",
    metavar="CACHE",
    help="Source cache mode (checked; reads use the page cache).",
)
@click.option("--bitmaps", "bitmaps", is_flag=True, help="Copy the persistent dirty bitmaps.")
@click.option(
    "--skip-broken-bitmaps", "skip_broken", is_flag=True, help="With --bitmaps: skip in-use ones."
)
@click.argument("files", nargs=-1)
def convert_cmd(
    fmt: str | None,
    out_fmt: str,
    options: tuple[str, ...],
    backing: str | None,
    backing_fmt: str | None,
    skip_create: bool,
    sparse: str,
    out_of_order: bool,
    workers: str,
    rate: str | None,
    salvage: bool,
    progress: bool,
    quiet: bool,
    compress: bool,
    force_share: bool,
    cache: str,
    src_cache: str,
    snapshot: str | None,
    bitmaps: bool,
    skip_broken: bool,
    files: tuple[str, ...],
) -> int:
    """Convert the source images (concatenated) into DST, like qemu-img convert."""
    from .converting import run

    return run(
        files,
        fmt=fmt,
        out_fmt=out_fmt,
        options=options,
        backing=backing,
        backing_fmt=backing_fmt,
        skip_create=skip_create,
        sparse=sparse,
        out_of_order=out_of_order,
        workers=workers,
        rate=rate,
        salvage=salvage,
        progress=progress,
        quiet=quiet,
        compress=compress,
        force_share=force_share,
        cache=cache,
        src_cache=src_cache,
        snapshot=snapshot,
        bitmaps=bitmaps,
        skip_broken=skip_broken,
    )


COMMANDS: tuple[click.Command, ...] = (convert_cmd,)
