"""Hypothesis on the LUKS1 header codec (qcow2/luks.py): any bytes decode or raise
FormatError; a mutated real header that still decodes re-encodes to the same values, reports
itself (info) without error, and unlocking it fails cleanly or yields the master key."""

from __future__ import annotations

import os
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.crypto import CipherSpec
from vdisk.errors import VdiskError
from vdisk.qcow2 import luks

EXAMPLES = 2000 if os.environ.get("VDISK_SOAK") == "1" else 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
UNLOCK_EXAMPLES = 30  # each unlock runs PBKDF2 and the AF merge


@cache
def real_area() -> tuple[bytes, bytes]:
    """A LUKS area with cheap PBKDF2 (1000 iterations floor) and its master key."""
    _header, area, master_key = luks.new_header(
        CipherSpec(128, "cbc", "essiv", "sha256"), "sha1", b"pw", 1
    )
    return area, master_key


@FUZZ
@given(st.binary(min_size=0, max_size=700))
def test_header_from_random_bytes(buf: bytes) -> None:
    try:
        header = luks.LuksHeader.decode(buf)
    except VdiskError:
        return
    header.check_within(len(buf))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, luks.HEADER_SIZE - 1), st.integers(0, 255)), max_size=8))
def test_header_mutated(edits: list[tuple[int, int]]) -> None:
    area, _key = real_area()
    buf = bytearray(area[: luks.HEADER_SIZE])
    for offset, value in edits:
        buf[offset] = value
    try:
        header = luks.LuksHeader.decode(bytes(buf))
        header.check_within(len(area))
    except VdiskError:
        return
    # Strings end at their first NUL (C strings), so compare decoded values, not bytes.
    assert luks.LuksHeader.decode(header.encode()) == header
    luks.describe(header)


@settings(max_examples=UNLOCK_EXAMPLES, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(0, luks.HEADER_SIZE - 1), st.integers(0, 255)), max_size=4),
    st.lists(st.tuples(st.integers(luks.HEADER_SIZE, 70000), st.integers(0, 255)), max_size=4),
)
def test_unlock_mutated(
    header_edits: list[tuple[int, int]], material_edits: list[tuple[int, int]]
) -> None:
    area, master_key = real_area()
    buf = bytearray(area)
    for offset, value in header_edits + material_edits:
        buf[offset] = value
    try:
        header = luks.LuksHeader.decode(bytes(buf[: luks.HEADER_SIZE]))
        header.check_within(len(buf))
    except VdiskError:
        return
    if max([header.mk_digest_iterations] + [s.iterations for s in header.slots]) > 50_000:
        return  # bounded, but slow: the iteration bound itself is tested in test_luks
    try:
        key = luks.unlock(header, bytes(buf), b"pw")
    except VdiskError:
        return
    assert len(key) == header.key_bytes
    if header.key_bytes == len(master_key) and not material_edits:
        assert key == master_key
