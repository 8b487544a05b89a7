"""What every bench of fresh vdisk processes does first: byte-compile vdisk, as an installed
package is. Under PYTHONDONTWRITEBYTECODE (or from a fresh editable install) each process would
otherwise compile vdisk's modules again, which costs more than the rest of a short command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "vdisk"


def compile_package() -> None:
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(PACKAGE)], check=True, capture_output=True
    )
