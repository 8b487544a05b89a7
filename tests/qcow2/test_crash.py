"""Kill -9 in the middle of writes: the image may leak clusters but is never corrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oracles import assert_check_clean, needs_qemu, qemu_check
from vdisk.qcow2 import Qcow2Image, create

pytestmark = needs_qemu

WRITER = r"""
import os, random, sys
from vdisk.qcow2 import Qcow2Image
img = Qcow2Image.open(sys.argv[1], l2_cache_size=4096, refcount_cache_size=4096)
rng = random.Random(int(sys.argv[2]))
size = img.size
print("ready", flush=True)
while True:
    off = rng.randrange(0, size - 300000)
    r = rng.random()
    if r < 0.6:
        img.write(os.urandom(rng.choice([512, 4096, 70000, 300000])), off)
    elif r < 0.75:
        img.discard(off, rng.choice([65536, 300000]))
    elif r < 0.85:
        img.write_zeroes(off, rng.choice([4096, 300000]), may_unmap=True)
    else:
        img.flush()
"""


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_kill_during_writes_only_leaks(tmp_path: Path, lazy: bool) -> None:
    for seed in range(3):
        img = tmp_path / f"k{seed}.qcow2"
        create(str(img), 32 << 20, cluster_size=4096, lazy_refcounts=lazy)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(img), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * seed)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = qemu_check(img)
        if lazy:
            # Dirty image: QEMU's check may repair in memory; what matters is our repair.
            with Qcow2Image.open(str(img)) as w:
                w.write(b"after", 0)
            assert_check_clean(img)
        else:
            assert report.get("corruptions", 0) == 0, json.dumps(report)
            assert report.get("check-errors", 0) == 0, json.dumps(report)
            with Qcow2Image.open(str(img)) as w:  # still usable as is
                w.write(b"after", 0)
            after = qemu_check(img)
            assert after.get("corruptions", 0) == 0, after
