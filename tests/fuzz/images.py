"""QEMU-made seed images, their metadata offsets, mutations, and a client for image_worker.

``seed_images(dir)`` makes a few small images with qemu-img and qemu-io (several cluster sizes,
extended L2, lazy refcounts left dirty, version 2). ``metadata_offsets`` lists the byte offsets
of their header fields and table entries, where a mutation hurts most. ``Worker`` keeps one
``image_worker.py`` child and restarts it when a job kills it or runs past the deadline.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

SEEDS = {
    "v3_64k": ("cluster_size=65536", ["write -P 0x11 0 192k", "write -P 0x22 3M 64k"]),
    "v3_4k": ("cluster_size=4096", ["write -P 0x33 0 40k", "write -P 0x44 2M 8k"]),
    "v3_512": ("cluster_size=512", ["write -P 0x55 0 6k", "write -P 0x66 1M 2k"]),
    "extl2_16k": ("cluster_size=16384,extended_l2=on", ["write -P 0x77 0 3k", "write 1M 20k"]),
    "lazy_dirty": ("cluster_size=4096,lazy_refcounts=on", ["write -P 0x88 0 12k", "sigraise 9"]),
    "v2_64k": ("compat=0.10", ["write -P 0x99 0 128k"]),
}
WORD_VALUES = [0, 1, 0x200, 0x10000, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF, 1 << 45]


def seed_images(where: Path) -> dict[str, Path]:
    out = {}
    for name, (options, commands) in SEEDS.items():
        path = where / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "4M"],
            check=True,
            capture_output=True,
        )
        args = ["qemu-io", "-f", "qcow2"]
        for command in commands:
            args += ["-c", command]
        subprocess.run([*args, str(path)], capture_output=True, check=False)
        out[name] = path
    return out


def metadata_offsets(data: bytes) -> list[int]:
    """Offsets of 8-byte words worth hitting: header fields, L1, refcount table, first
    refcount block and first L2 table entries (as far as the seed's header says)."""
    offsets = list(range(0, 104, 4))
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_offset, rt_offset = struct.unpack_from(">IQQ", data, 36)
    cs = 1 << cluster_bits
    offsets += [l1_offset + 8 * i for i in range(min(l1_size, 8))]
    offsets += [rt_offset + 8 * i for i in range(4)]
    refblock = struct.unpack_from(">Q", data, rt_offset)[0] & ~511
    if 0 < refblock < len(data):
        offsets += [refblock + 2 * i for i in range(0, 64, 4)]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    if 0 < l2 < len(data):
        offsets += [l2 + 8 * i for i in range(min(cs // 8, 16))]
    return [o for o in offsets if o + 8 <= len(data)]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (offset, kind, value) edits: kind 0 flips bit value%64 of the word at offset,
    kind 1 writes WORD_VALUES[value % len], kind 2 writes the value as a big-endian word."""
    buf = bytearray(data)
    for offset, kind, value in edits:
        word = struct.unpack_from(">Q", buf, offset)[0]
        if kind == 0:
            word ^= 1 << (value % 64)
        elif kind == 1:
            word = WORD_VALUES[value % len(WORD_VALUES)]
        else:
            word = value & 0xFFFFFFFFFFFFFFFF
        struct.pack_into(">Q", buf, offset, word)
    return bytes(buf)


class Worker:
    """One image_worker child; ``run`` answers a job or says how the child died."""

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.jobs = 0

    def _start(self) -> subprocess.Popen[str]:
        script = Path(__file__).with_name("image_worker.py")
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert json.loads(ready).get("ready"), ready
        return proc

    def run(self, path: Path, ops: list[str]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        self.jobs += 1
        proc.stdin.write(json.dumps({"path": str(path), "ops": ops}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            proc.wait()
            self.proc = None
            how = "hung" if not ready else f"died (exit {proc.returncode})"
            return {"outcome": "bug", "detail": f"worker {how}", "where": ""}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None
