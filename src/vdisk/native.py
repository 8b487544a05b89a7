"""Optional compiled helpers: small C sources shipped beside the Python code, built with the
system's C compiler (``CC``, else ``cc``) on first use, cached per user and machine, and called
through ctypes, which releases the GIL for the whole call.

Each helper has a pure-Python fallback with the same outcome, used when its switch says ``0``,
when there is no compiler, or when the build fails; so a helper may only make things faster.
"""

from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

# Loading a built helper must stay cheap (``vdisk convert`` loads one): logging and the
# build's modules are imported only when they are needed, and the digest comes from CPython's
# own sha256 module rather than hashlib's OpenSSL.
try:
    from _sha256 import sha256  # type: ignore[import-not-found, unused-ignore]  # no OpenSSL
except ImportError:  # pragma: no cover - other versions name it otherwise
    from hashlib import sha256


def _log(message: str, *args: object) -> None:
    import logging

    logging.getLogger("vdisk.native").info(message, *args)


def _user_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vdisk")


def _temp_cache() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"vdisk-{os.getuid()}")


def load(source: str | Path, switch: str, optimize: str = "-O2") -> ctypes.CDLL | None:
    """``source`` built (once per content, flags, machine and user) and loaded; None when the
    environment variable ``switch`` is ``0``, or the source cannot be read or built."""
    if os.environ.get(switch, "1") == "0":
        return None
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    digest = sha256(text + f"{optimize} {os.uname().machine}".encode()).hexdigest()[:16]
    name = f"{os.path.splitext(os.path.basename(path))[0]}-{digest}.so"
    folders = [_user_cache()]
    lib = _open(os.path.join(folders[0], name))
    if lib is None:
        folders.append(_temp_cache())
        lib = _open(os.path.join(folders[1], name)) or _build(path, optimize, folders, name)
    if lib is None:
        _log("%s off (%s=0 silences this)", os.path.basename(path), switch)
    return lib


def _build(source: str, optimize: str, folders: list[str], name: str) -> ctypes.CDLL | None:
    """Compiles ``source`` into the first folder that takes it; None without a compiler or
    when the build fails."""
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        _log("%s: no C compiler", os.path.basename(source))
        return None
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run(
                [compiler, optimize, "-shared", "-fPIC", "-o", tmp, source],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            os.replace(tmp, os.path.join(folder, name))  # atomic: a concurrent build loads either
        except (OSError, subprocess.SubprocessError) as exc:
            _log("%s: building it failed: %s", os.path.basename(source), exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return None
        return _open(os.path.join(folder, name))
    return None


def _open(path: str) -> ctypes.CDLL | None:
    if not os.path.exists(path):
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None
