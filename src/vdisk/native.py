"""Optional compiled helpers: small C sources shipped beside the Python code, built with the
system's C compiler (``CC``, else ``cc``) on first use, cached per user and machine, and called
through ctypes, which releases the GIL for the whole call.

Each helper has a pure-Python fallback with the same outcome, used when its switch says ``0``,
when there is no compiler, or when the build fails; so a helper may only make things faster.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("vdisk.native")


def _cache_dirs() -> list[Path]:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "vdisk", Path(tempfile.gettempdir()) / f"vdisk-{os.getuid()}"]


def load(source: Path, switch: str, optimize: str = "-O2") -> ctypes.CDLL | None:
    """``source`` built (once per content, flags, machine and user) and loaded; None when the
    environment variable ``switch`` is ``0``, or the source cannot be read or built."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        text = source.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(text + f"{optimize} {platform.machine()}".encode()).hexdigest()[:16]
    name = f"{source.stem}-{digest}.so"
    for folder in _cache_dirs():
        lib = _open(folder / name)
        if lib is not None:
            return lib
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("%s off: no C compiler (%s=0 silences this)", source.name, switch)
        return None
    for folder in _cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run([compiler, optimize, "-shared", "-fPIC", "-o", tmp, str(source)],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, folder / name)  # atomic: a concurrent builder loads either copy
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("%s off: building it failed: %s", source.name, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return None
        return _open(folder / name)
    return None


def _open(path: Path) -> ctypes.CDLL | None:
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None
