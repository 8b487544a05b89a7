"""Coverage-guided fuzzing (atheris) of whole images: open, read, write and check.

Run by hand: ``python tests/fuzz/atheris_images.py -atheris_runs=2000 -rss_limit_mb=2048
-timeout=10`` (libFuzzer flags: the RSS limit and timeout bound memory and time per input), or
through scripts/soak. Each input is a list of 8-byte word edits applied at the metadata offsets
of a QEMU-made seed image; the mutated image goes through read-only open/read/block_status,
check, and read-write open/write/close. Anything other than VdiskError is a finding.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from vdisk.errors import VdiskError
    from vdisk.qcow2 import Qcow2Image
    from vdisk.qcow2.check import check

from fuzz.image_worker import op_check, op_ro, op_rw
from fuzz.images import metadata_offsets, mutate, seed_images

WHERE = Path(tempfile.mkdtemp(prefix="vdisk-atheris-"))
SEEDS = [p.read_bytes() for p in seed_images(WHERE).values()]
OFFSETS = [metadata_offsets(s) for s in SEEDS]
TARGET = WHERE / "fuzz.qcow2"
_ = (Qcow2Image, check)


def one_input(data: bytes) -> None:
    if len(data) < 1:
        return
    seed = data[0] % len(SEEDS)
    offsets = OFFSETS[seed]
    edits = []
    for pos in range(1, len(data) - 9, 10):
        where, kind = data[pos], data[pos + 1] % 3
        (value,) = struct.unpack_from(">Q", data, pos + 2)
        edits.append((offsets[where % len(offsets)], kind, value))
    image = mutate(SEEDS[seed], edits[:4])
    for op in (op_ro, op_check, op_rw):
        TARGET.write_bytes(image)
        try:
            op(str(TARGET))
        except VdiskError:
            pass


def main() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
