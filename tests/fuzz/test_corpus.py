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
KNOWN: dict[str, str] = {}


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
