"""Property-based: random operation sequences against an in-memory model (a bytearray).

Each example creates a fresh image in one configuration, applies a random sequence of write,
write_zeroes (may_unmap both ways), discard, flush and reopen, checks every read against the
model as it goes, and at the end asks QEMU: `qemu-img check` must be clean (0 corruptions, 0
leaks) and `qemu-img compare` against the model's raw bytes must say identical.

Discard may leave old data, zeros or (with a backing file) the backing file's data, so after a
discard the model takes what the device reads back, after checking that every byte is one of
those three.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdisk
from oracles import assert_check_clean, assert_compare_equal, needs_qemu, qemu_io, qemu_to_raw

pytestmark = [needs_qemu, pytest.mark.timeout(300)]

EXAMPLES = int(os.environ.get("VDISK_MODEL_EXAMPLES", "150"))


@dataclass(frozen=True)
class Config:
    name: str
    size: int
    cluster_size: int
    refcount_bits: int
    compat: str
    backing: bool = False

    def options(self) -> dict[str, Any]:
        return {
            "cluster_size": self.cluster_size,
            "refcount_bits": self.refcount_bits,
            "compat": self.compat,
        }


CONFIGS = [
    Config("c512-r16-v3", 2 << 20, 512, 16, "1.1"),
    Config("c4k-r1-v3", 4 << 20, 4096, 1, "1.1"),
    Config("c64k-r64-v3", 8 << 20, 65536, 64, "1.1"),
    Config("c4k-r16-v2", 4 << 20, 4096, 16, "0.10"),
    Config("c64k-r16-v2-backing", 8 << 20, 65536, 16, "0.10", backing=True),
    Config("c4k-r16-v3-backing", 4 << 20, 4096, 16, "1.1", backing=True),
    Config("c512-r64-v3-backing", 2 << 20, 512, 64, "1.1", backing=True),
]


def _range(size: int) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length): mostly cluster-ish aligned, sometimes byte-granular, within the image."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[int, int]:
        align = draw(st.sampled_from([1, 512, 4096, 65536]))
        offset = draw(st.integers(0, size - 1)) // align * align
        length = draw(st.integers(1, min(size - offset, 300_000)))
        if align > 1 and draw(st.booleans()):
            length = max(align, length // align * align)
        return offset, min(length, size - offset)

    return build()


def _ops(size: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    op = st.one_of(
        st.tuples(st.just("write"), _range(size), st.integers(1, 255)),
        st.tuples(st.just("write"), _range(size), st.integers(1, 255)),
        st.tuples(st.just("zero"), _range(size), st.booleans()),
        st.tuples(st.just("discard"), _range(size)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    )
    return st.lists(op, min_size=1, max_size=25)


def _pattern(seed: int, offset: int, length: int) -> bytes:
    """Data that differs per byte position and per write, so misplaced bytes show."""
    base = bytes((seed + i * 7) & 0xFF or 1 for i in range(251))
    start = offset % 251
    reps = (start + length) // 251 + 1
    return (base * reps)[start : start + length]


def _make_backing(directory: Path, config: Config) -> tuple[str, bytes]:
    """A qcow2 backing file shorter than the image, with data QEMU wrote; its raw contents."""
    backing = directory / "backing.qcow2"
    size = config.size * 3 // 4
    vdisk.create(str(backing), size, format="qcow2", cluster_size=4096)
    qemu_io(
        backing,
        f"write -P 0x33 0 {size // 3}",
        f"write -P 0x44 {size // 2} {size // 5}",
        f"write -z {size // 8} {size // 16}",
    )
    raw = qemu_to_raw(backing, directory / "backing.raw")
    return "backing.qcow2", raw + bytes(config.size - size)


def _check_read(dev: vdisk.BlockDevice, model: bytearray, offset: int, length: int) -> None:
    buf = bytearray(length)
    dev.readinto(buf, offset)
    assert buf == model[offset : offset + length], f"read mismatch at [{offset}, +{length})"


def run_sequence(config: Config, ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="vdisk-model-") as tmp:
        directory = Path(tmp)
        image = str(directory / "image.qcow2")
        if config.backing:
            backing_name, backing_data = _make_backing(directory, config)
            vdisk.create(
                image,
                config.size,
                format="qcow2",
                backing_file=backing_name,
                backing_fmt="qcow2",
                **config.options(),
            )
            model = bytearray(backing_data)
        else:
            vdisk.create(image, config.size, format="qcow2", **config.options())
            backing_data = bytes(config.size)
            model = bytearray(config.size)
        dev = vdisk.open(image)
        try:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (offset, length), seed = op[1], op[2]
                    data = _pattern(seed, offset, length)
                    assert dev.write(data, offset) == length
                    model[offset : offset + length] = data
                    _check_read(dev, model, offset, length)
                elif kind == "zero":
                    (offset, length), may_unmap = op[1], op[2]
                    dev.write_zeroes(offset, length, may_unmap=may_unmap)
                    model[offset : offset + length] = bytes(length)
                    _check_read(dev, model, offset, length)
                elif kind == "discard":
                    offset, length = op[1]
                    dev.discard(offset, length)
                    after = bytearray(length)
                    dev.readinto(after, offset)
                    got = np.frombuffer(after, dtype=np.uint8)
                    old = np.frombuffer(model, dtype=np.uint8)[offset : offset + length]
                    parent = np.frombuffer(backing_data, dtype=np.uint8)[offset : offset + length]
                    bad = (got != old) & (got != 0) & (got != parent)
                    assert not bad.any(), f"discard left foreign bytes at {offset + int(bad.argmax())}"
                    model[offset : offset + length] = after
                elif kind == "flush":
                    dev.flush()
                elif kind == "reopen":
                    dev.close()
                    dev = vdisk.open(image)
            _check_read(dev, model, 0, config.size)
        finally:
            dev.close()
        with vdisk.open(image, readonly=True) as reader:
            _check_read(reader, model, 0, config.size)
        assert_check_clean(image)
        raw = directory / "model.raw"
        raw.write_bytes(model)
        assert_compare_equal(image, raw)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_random_sequences_match_model(config: Config) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(ops=_ops(config.size))
    def inner(ops: list[tuple[Any, ...]]) -> None:
        run_sequence(config, ops)

    inner()


def test_fixed_sequence() -> None:
    """A fixed sequence (partial clusters, zeroing with unmap, the image's last bytes)."""
    config = CONFIGS[1]
    ops: list[tuple[Any, ...]] = [
        ("write", (0, 10_000), 5),
        ("zero", (4096, 8192), True),
        ("write", (config.size - 700, 700), 9),
        ("flush",),
    ]
    run_sequence(config, ops)
