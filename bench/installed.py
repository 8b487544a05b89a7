"""What every bench of fresh vdisk processes shares: vdisk byte-compiled, as an installed package
is (under PYTHONDONTWRITEBYTECODE, or from a fresh editable install, each process would otherwise
compile vdisk's modules again, which costs more than the rest of a short command), and run as
users run it, through the console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "vdisk"


def compile_package() -> None:
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(PACKAGE)], check=True, capture_output=True
    )


def vdisk_command() -> list[str]:
    """The ``vdisk`` console script next to this interpreter (``python -m vdisk`` without one:
    that adds runpy's start-up)."""
    script = Path(sys.executable).with_name("vdisk")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vdisk"]
