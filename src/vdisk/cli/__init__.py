"""The ``vdisk`` command: qemu-img-compatible image tools plus the ublk and NBD servers.

This package only parses arguments; the work lives in the library. Every VdiskError (and any
OSError) becomes one line on stderr and a nonzero exit status, never a traceback.

Start-up is part of the interface: ``vdisk --version``, ``--help`` and plain ``info`` are
answered by ``quick`` without importing click (which costs more than the rest of ``vdisk info``
together). Everything else goes to the click command tree in ``app``, which is lazy too:
``COMMAND_TABLE`` maps each command name to its module and one-line help, so listing the
commands imports none of them and ``vdisk map`` imports only ``cli/map.py``.
"""

from __future__ import annotations

import sys

from ..errors import VdiskError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .app import cli

__all__ = ["COMMAND_TABLE", "DESCRIPTION", "cli", "main", "run"]

DESCRIPTION = "vdisk: QCOW2 and raw images, exported over ublk and NBD."

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


def __getattr__(name: str) -> object:
    if name == "cli":  # the click group, loaded only when a command needs it
        from .app import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"vdisk: {message}\n")
    sys.stderr.flush()
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning errors into one line and qemu-img's exit codes."""
    return _dispatch(sys.argv[1:] if argv is None else list(argv))[0]


def _dispatch(args: list[str]) -> tuple[int, bool]:
    """``main``'s work: the exit status, and whether a quick command (no click) answered."""
    quick = True
    try:
        from .quick import answer

        status = answer(args)
        if status is None:
            quick = False
            from .app import run_click

            status = run_click(args)
    except VdiskError as exc:
        return _fail(str(exc)), quick
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}"), quick
    except KeyboardInterrupt:
        return _fail("interrupted", 130), quick
    return status, quick


def run() -> None:
    status, quick = _dispatch(sys.argv[1:])
    if quick:
        # A quick command has closed its files and joined its threads: the process ends as a
        # C program's does, without the interpreter's teardown (freeing every module's objects
        # and a last garbage collection: some 20 M instructions after a convert).
        import os

        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            sys.exit(status)  # a closed pipe: let the interpreter report it, as it would
        os._exit(status)
    sys.exit(status)
