"""The main job on an embedded default: create a qcow2 image, write, read back, show info."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import vdisk
from vdisk.cli import main as cli_main

SIZE = 64 << 20
PATTERN = hashlib.sha256(b"vdisk").digest() * (1 << 11)  # 64 KiB of non-repeating-looking data


def run(path: str) -> int:
    vdisk.create(path, SIZE, format="qcow2")
    with vdisk.open(path) as disk:
        for offset in (0, 5 << 20, SIZE - len(PATTERN)):
            disk.write(PATTERN, offset)
        disk.flush()
    with vdisk.open(path, readonly=True) as disk:
        for offset in (0, 5 << 20, SIZE - len(PATTERN)):
            back = bytearray(len(PATTERN))
            disk.readinto(back, offset)
            if back != PATTERN:
                print(f"demo: read-back mismatch at offset {offset}", file=sys.stderr)
                return 1
    print(f"wrote and read back 3 x {len(PATTERN)} bytes in {path}")
    return cli_main(["info", path])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(run(sys.argv[1]))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(run(os.path.join(tmp, "demo.qcow2")))
