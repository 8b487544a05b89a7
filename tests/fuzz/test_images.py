"""Whole-image fuzzing: mutated QEMU-made images through open, read, write and check.

Each input runs in image_worker (capped address space, per-job alarm) and must end in success
or a one-line VdiskError. Known bugs in qcow2 internals are recognised by the function and the
exception (KNOWN), counted, and kept as strict-xfail corpus cases in test_corpus.py; anything
else fails here with the input saved under the test's tmp dir, ready to become a corpus file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crash.explore import qemu_corruption
from oracles import needs_qemu, qemu_check

from .images import SEEDS, Worker, metadata_offsets, mutate, seed_images

pytestmark = needs_qemu

SOAK = os.environ.get("VDISK_SOAK") == "1"
FUZZ = settings(
    max_examples=int(os.environ.get("VDISK_FUZZ_EXAMPLES", "400" if SOAK else "40")),
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=list(HealthCheck),
)
OPS = ["ro", "check", "rw", "repair"]

# (function at fault, exception) -> the bug, one line. Core-write / core-check own the code.
KNOWN: dict[tuple[str, str], str] = {}
FIGURES: dict[str, int] = {"examples": 0, "jobs": 0, "known-bug hits": 0, "never-worse checks": 0}

_state: dict[str, Any] = {}


def _seeds() -> dict[str, bytes]:
    if "seeds" not in _state:
        where = Path(tempfile.mkdtemp(prefix="vdisk-fuzz-seeds-"))
        _state["seeds"] = {n: p.read_bytes() for n, p in seed_images(where).items()}
        shutil.rmtree(where)
    seeds: dict[str, bytes] = _state["seeds"]
    return seeds


def _worker() -> Worker:
    if "worker" not in _state:
        _state["worker"] = Worker()
    worker: Worker = _state["worker"]
    return worker


def known(answer: dict[str, Any]) -> str | None:
    function = answer["where"].rpartition(":")[2]
    kind = answer["detail"].split(":")[0].split()[0]
    return KNOWN.get((function, kind))


def run_ops(data: bytes, where: Path, ops: list[str], tolerate: bool = True) -> list[str]:
    """Each op on a fresh copy of ``data``: the failures (known bugs too unless tolerated)."""
    problems = []
    path = where / "fuzz.qcow2"
    for op in ops:
        path.write_bytes(data)
        answer = _worker().run(path, [op])
        FIGURES["jobs"] += 1
        if answer["outcome"] == "bug":
            if tolerate and known(answer):
                FIGURES["known-bug hits"] += 1
                continue
            saved = where / f"unexplained-{FIGURES['jobs']}.qcow2"
            saved.write_bytes(data)
            problems.append(f"{op}: {answer['detail']} in {answer['where']} [input {saved}]")
    return problems


edits_strategy = st.lists(
    st.tuples(st.integers(0, 1 << 20), st.integers(0, 2), st.integers(0, (1 << 64) - 1)),
    min_size=1,
    max_size=3,
)


def _mutated(seed: str, edits: list[tuple[int, int, int]]) -> bytes:
    data = _seeds()[seed]
    offsets = metadata_offsets(data)
    return mutate(data, [(offsets[o % len(offsets)], k, v) for o, k, v in edits])


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), edits_strategy)
def test_mutated_image_ends_in_success_or_vdisk_error(
    seed: str, edits: list[tuple[int, int, int]]
) -> None:
    FIGURES["examples"] += 1
    where = Path(tempfile.mkdtemp(prefix="vdisk-fuzz-"))
    problems = run_ops(_mutated(seed, edits), where, OPS)
    assert not problems, "\n".join(problems)
    shutil.rmtree(where)


def _damage(report: dict[str, Any]) -> int:
    return int(report.get("corruptions", 0)) + int(report.get("check-errors", 0))


def _qemu_rw_size(data: bytes, where: Path) -> int:
    """The file size after QEMU opened the same image read-write and wrote one sector (QEMU
    repairs a dirty lazy-refcounts image on that open, and may grow the file as much), plus
    room for the clusters vdisk's writes allocate."""
    ref = where / "qemu-rw.qcow2"
    ref.write_bytes(data)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 512", str(ref)],
        capture_output=True,
        timeout=60,
    )
    size = ref.stat().st_size
    ref.unlink()
    return size + (64 << 20)


def never_worse(data: bytes, where: Path, tolerate: bool = True) -> list[str]:
    """qemu-img check before; vdisk opens read-write, writes, closes; qemu-img check after."""
    path = where / "damaged.qcow2"
    path.write_bytes(data)
    before = qemu_check(path)
    if "unparsable" in before:
        return []  # qemu cannot read it either: nothing to make worse
    answer = _worker().run(path, ["rw"])
    FIGURES["never-worse checks"] += 1
    if tolerate and answer["outcome"] == "bug" and known(answer):
        FIGURES["known-bug hits"] += 1
        return []
    after = qemu_check(path)
    problems = []
    with path.open("rb") as f:
        if f.read(4) != b"QFI\xfb":
            problems.append("the header was overwritten")
    if "File too large" in str(after.get("unparsable", "")):
        problems.append("qemu-img check: File too large")
    elif "unparsable" in after or _damage(after) > _damage(before):
        problems.append(f"qemu-img check before {before}, after {after}")
    size = path.stat().st_size
    if size > max(2 * len(data), len(data) + (64 << 20)) and size > _qemu_rw_size(data, where):
        problems.append(f"file grew from {len(data)} to {size} bytes")
    if answer["outcome"] == "bug":
        problems.append(f"rw: {answer['detail']} in {answer['where']}")
    if problems:
        saved = where / "worse-input.qcow2"
        saved.write_bytes(data)
        problems.append(f"[input {saved}]")
    return problems


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), edits_strategy)
def test_writing_never_makes_a_damaged_image_worse(
    seed: str, edits: list[tuple[int, int, int]]
) -> None:
    where = Path(tempfile.mkdtemp(prefix="vdisk-worse-"))
    problems = never_worse(_mutated(seed, edits), where)
    assert not problems, "\n".join(problems)
    shutil.rmtree(where)


def test_seed_images_are_clean() -> None:
    """The seeds are what QEMU made: vdisk handles every one (the dirty one by repairing)."""
    where = Path(tempfile.mkdtemp(prefix="vdisk-fuzz-"))
    for name, data in _seeds().items():
        assert not run_ops(data, where, OPS), name
        (where / "s.qcow2").write_bytes(data)
        if name != "lazy_dirty":
            assert qemu_corruption(where / "s.qcow2") is None, name
    shutil.rmtree(where)
