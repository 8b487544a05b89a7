"""``vdisk check``: qemu-img check's flags, report (human and JSON) and exit statuses; the
walk and the repair are ``vdisk.qcow2.check``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import RequestError
from .options import check_output

if TYPE_CHECKING:
    from ..qcow2.check import CheckResult

# qemu-img prints the check report's keys in the order of its QDict's hash buckets.
_CHECK_KEYS = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)
_ALWAYS = ("check-errors", "filename", "format")


def check_json(result: CheckResult) -> str:
    """The report as ``qemu-img check --output=json`` prints it (zero counts left out)."""
    import json

    lines = []
    for key in _CHECK_KEYS:
        value = getattr(result, key.replace("-", "_"))
        if value or key in _ALWAYS:
            lines.append(f"    {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def check_human(r: CheckResult) -> str:
    """The report as ``qemu-img check`` prints it."""
    out = []
    if r.clean:
        out.append("No errors were found on the image.\n")
    else:
        if r.corruptions:
            out.append(
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            out.append(
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            out.append(f"\n{r.check_errors} internal errors have occurred during the check.\n")
    if r.total_clusters and r.allocated_clusters:
        out.append(
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{r.allocated_clusters * 100.0 / r.total_clusters:0.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:0.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / r.allocated_clusters:0.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        out.append(f"Image end offset: {r.image_end_offset}\n")
    return "".join(out)


@click.command("check")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-r", "repair", metavar="leaks|all", help="Repair leaks, or everything.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print only errors.")
@click.option(
    "-T",
    "src_cache",
    metavar="CACHE",
    help="Cache mode of FILE (checked; reads use the page cache).",
)
@click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Force share: open read-only beside a writer (no write lock).",
)
@click.argument("file")
def check_cmd(
    fmt: str | None,
    output: str,
    repair: str | None,
    quiet: bool,
    src_cache: str | None,
    force_share: bool,
    file: str,
) -> int:
    """Check a qcow2 image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 1 failed)."""
    import vdisk

    from ..qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckFailed, check_and_repair
    from .converting import check_cache_modes

    check_output(output)
    check_cache_modes(None, src_cache)
    fix = 0
    if repair is not None:
        if repair not in ("leaks", "all"):
            raise RequestError(
                f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}"
            )
        fix = FIX_LEAKS if repair == "leaks" else FIX_LEAKS | FIX_ERRORS
    vdisk.check_format(fmt, file)
    kind = fmt or vdisk.probe_format(file)
    if kind != "qcow2":
        click.echo("vdisk: This image format does not support checks", err=True)
        return 63
    try:
        final, first = check_and_repair(file, fix, force_share)
    except CheckFailed as exc:
        click.echo(f"vdisk: Check failed: {exc.message}", err=True)
        return 1
    for passed in (first, final):
        if passed is not None and passed.messages:
            click.echo("\n".join(passed.messages), err=True)
    text = ""
    if first is not None and output == "human":
        text += (
            "The following inconsistencies were found and repaired:\n\n"
            f"    {first.leaks_fixed} leaked clusters\n"
            f"    {first.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    text += check_human(final) if output == "human" else check_json(final)
    if not quiet:
        click.echo(text, nl=False)
    if final.check_errors:
        click.echo("vdisk: Check failed", err=True)
        return 1
    if final.corruptions:
        return 2
    return 3 if final.leaks else 0


COMMANDS: tuple[click.Command, ...] = (check_cmd,)
