"""A child process that runs vdisk on damaged images, one JSON job per line, under limits.

Run as ``python image_worker.py``; each stdin line is ``{"path": ..., "ops": [...]}`` and each
answer a line ``{"outcome": "ok"|"vdisk"|"bug", "detail": ..., "where": ...}``. The address
space is capped (RLIMIT_AS) and every job runs under an alarm, so an unbounded allocation is a
MemoryError ("bug") and a hang is a TimeoutError ("bug") instead of a stuck test. ``where`` is
the innermost vdisk function the exception came through.

Ops: "ro" (open read-only: reads, block_status), "rw" (open read-write: writes, zeroes,
discard, flush, close), "check" (vdisk check, no repair), "repair" (check -r all).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback
from types import FrameType
from typing import Any

MEMORY_LIMIT = int(os.environ.get("VDISK_FUZZ_MEMORY", str(1536 << 20)))
TIME_LIMIT = int(os.environ.get("VDISK_FUZZ_SECONDS", "5"))


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"job took more than {TIME_LIMIT} s")


def _probe_offsets(size: int) -> list[int]:
    if size <= 0:
        return []
    return sorted({0, size // 3 & ~511, size // 2 & ~511, max(0, size - 65536) & ~511})


def op_ro(path: str) -> None:
    from vdisk.qcow2 import Qcow2Image

    with Qcow2Image.open(path, readonly=True, open_backing=False) as img:
        for off in _probe_offsets(img.size):
            img.pread(min(65536, img.size - off), off)
        img.block_status(0, min(img.size, 1 << 30))


def op_rw(path: str) -> None:
    from vdisk.qcow2 import Qcow2Image

    img = Qcow2Image.open(path, open_backing=False)
    try:
        size = img.size
        for off in _probe_offsets(size):
            n = min(4096, size - off)
            img.write(b"\xa5" * n, off)
            img.pread(n, off)
        if size >= 1 << 17:
            img.write_zeroes(size // 4 & ~511, 65536)
            img.discard(size // 5 & ~511, 65536)
        img.flush()
    finally:
        img.close()


def op_check(path: str) -> None:
    from vdisk.qcow2.check import check

    check(path)


def op_repair(path: str) -> None:
    from vdisk.qcow2.check import FIX_ERRORS, FIX_LEAKS, check_and_repair

    check_and_repair(path, FIX_LEAKS | FIX_ERRORS)


OPS = {"ro": op_ro, "rw": op_rw, "check": op_check, "repair": op_repair}


def run_job(job: dict[str, Any]) -> dict[str, str]:
    from vdisk.errors import VdiskError

    signal.alarm(TIME_LIMIT)
    try:
        for name in job["ops"]:
            OPS[name](job["path"])
        return {"outcome": "ok", "detail": "", "where": ""}
    except VdiskError as exc:
        text = str(exc)
        outcome = "vdisk" if "\n" not in text else "bug"
        return {"outcome": outcome, "detail": f"errno {exc.errno}: {text}", "where": ""}
    except (Exception, MemoryError) as exc:
        where = ""
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            module = frame.f_globals.get("__name__", "")
            if module.startswith("vdisk."):
                where = f"{module}:{frame.f_code.co_name}"
        detail = f"{type(exc).__name__}: {exc}"[:300]
        return {"outcome": "bug", "detail": detail, "where": where}
    finally:
        signal.alarm(0)


def main() -> None:
    import numpy  # noqa: F401  (imported before the cap: its own mappings are not the target)

    import vdisk.qcow2
    import vdisk.qcow2.check  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_job(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
