"""Regression cases: every damaged image that once broke vdisk, kept under corpus/ (gzipped).

``repro_*`` are the probe's images (../shared/repro, see its README); ``fz_*`` were found by
test_images.py (named op_function_exception_seed). Each must end in success or a VdiskError for
every op, and writing to it must not make qemu-img check's verdict worse. A case whose bug is
still open is a strict xfail naming what fails; it turns red once the bug is fixed, so that the
mark is removed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from oracles import needs_qemu

from .test_images import OPS, never_worse, run_ops

pytestmark = needs_qemu

CORPUS = sorted(Path(__file__).with_name("corpus").glob("*.qcow2.gz"))

# file -> what fails today (ops: the op and the function at fault; worse: what writing did).
KNOWN: dict[str, str] = {
    "fz_worse_rw_v3_4k.qcow2.gz": (
        "a write in place through an L2 entry that points at an L2 table overwrites the table "
        "with guest data before the next write fails (image.py write, no metadata-overlap check "
        "on that path): qemu-img check goes from 2 to 1537 errors"
    ),
    "fz_check_pread_full_OverflowError_extl2_16k.qcow2.gz": (
        "check and check -r all: OverflowError in backends/raw.py pread_full (an offset >= 2**63 from a table entry reaches os.preadv; check.py does not bound it)"
    ),
    "fz_repair_pread_full_OverflowError_extl2_16k.qcow2.gz": (
        "check and check -r all: OverflowError in pread_full (offset >= 2**63 from a table entry, check.py)"
    ),
    "fz_repair_hang_worker_lazy_dirty.qcow2.gz": (
        "check -r all does not finish in 15 s (check.py repair of a dirty lazy image with a far entry)"
    ),
    "fz_ro__map_extended_OverflowError_extl2_16k.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in cluster.py _map_extended (read) and plan_write (write)"
    ),
    "fz_ro_map_range_OverflowError_lazy_dirty.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in cluster.py map_range; rw: MemoryError in cluster.py add_range (lazy repair)"
    ),
    "fz_ro_readinto_OverflowError_v2_64k.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in image.py readinto (fast path); rw: plan_write"
    ),
    "fz_rw_add_range_MemoryError_lazy_dirty.qcow2.gz": (
        "lazy-refcount repair on rw open: MemoryError (512 TiB array) in cluster.py add_range, sized by an entry not by the file"
    ),
    "fz_rw_count_references_MemoryError_lazy_dirty.qcow2.gz": (
        "lazy-refcount repair on rw open: MemoryError (4 GiB array) in cluster.py count_references, sized by an entry not by the file"
    ),
    "fz_rw_plan_write_OverflowError_extl2_16k.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in cluster.py _map_extended / plan_write"
    ),
    "repro_check_overflow_v3.qcow2.gz": (
        "write at 0 OR-s COPIED into refcount-table entry 0 before raising CorruptImageError: qemu-img check goes from 5 corruptions to internal errors"
    ),
    "repro_check_reftable_bit63_v3.qcow2.gz": (
        "check: OverflowError in pread_full (refcount-table entry with bit 63 set, check.py)"
    ),
    "repro_checkfix_hang_reftable_entry_far.qcow2.gz": (
        "check -r all does not finish in 15 s (quadratic _Stored.values() in check.py)"
    ),
    "repro_fz1_256_ext.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in cluster.py _map_extended / plan_write"
    ),
    "repro_header_clobber_refcount_order1.qcow2.gz": (
        "refcount_order 4 -> 1: an allocating write lands on host cluster 0 (refcount.py allocator, overlap check after the write); qemu then sees a raw file"
    ),
    "repro_l2_is_refblock_cs4k.qcow2.gz": (
        "the metadata cache hands a refcount block's uint16 array out as an L2 table: OverflowError in cluster.py map_range; rw: OverflowError in image.py write"
    ),
    "repro_l2_is_reftable_copied_cs4k.qcow2.gz": (
        "a write through an L1 entry that points at the refcount table makes qemu-img check go from 4 errors to internal errors (image.py write / cluster.py)"
    ),
    "repro_lazy_dirty_l2_far_memory.qcow2.gz": (
        "lazy-refcount repair on rw open: MemoryError (64 GiB array) in cluster.py count_references, sized by an L2 entry at 32 TiB"
    ),
}


def _case(path: Path) -> object:
    reason = KNOWN.get(path.name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(path, id=path.name.removesuffix(".qcow2.gz"), marks=marks)


@pytest.mark.parametrize("case", [_case(p) for p in CORPUS])
def test_corpus_case(case: Path, tmp_path: Path) -> None:
    data = gzip.decompress(case.read_bytes())
    problems = run_ops(data, tmp_path, OPS, tolerate=False)
    problems += never_worse(data, tmp_path, tolerate=False)
    assert not problems, "\n".join(problems)
