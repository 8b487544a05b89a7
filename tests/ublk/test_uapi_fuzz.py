"""Fuzzing the ublk decoders with hypothesis: every input ends in a value or a UblkError,
and what the encoders write decodes back to the same fields. Inputs are what the kernel or
another process hands the server: GET_DEV_INFO and GET_PARAMS replies, the queue-affinity
cpumask and the per-device note in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.ublk import UblkError, uapi
from vdisk.ublk.device import read_note

FAST = settings(max_examples=200, deadline=None)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


@FAST
@given(st.binary(max_size=200))
def test_dev_info_decodes_or_says_it_is_short(data: bytes) -> None:
    try:
        info = uapi.DevInfo.unpack(data)
    except UblkError as exc:
        assert len(data) < uapi.DEV_INFO.size
        assert "\n" not in str(exc) and exc.errno
        return
    assert len(data) >= uapi.DEV_INFO.size
    assert info.pack()[:8] == data[:6] + bytes(2)  # queues, depth, state; pad is not kept
    assert isinstance(info.state_name, str)


@FAST
@given(st.tuples(u16, u16, u16, u32, u32, st.integers(-(1 << 31), (1 << 31) - 1), u64, u64,
                 u32, u32))
def test_dev_info_round_trips(fields: tuple[int, ...]) -> None:
    info = uapi.DevInfo(*fields)
    assert uapi.DevInfo.unpack(info.pack()) == info


@FAST
@given(st.binary(max_size=300))
def test_params_decode_any_reply(data: bytes) -> None:
    params = uapi.Params.unpack(data)
    again = uapi.Params.unpack(params.pack())
    assert again == params


@FAST
@given(
    u32, st.tuples(u32, u8, u8, u8, u8, u32, u32, u64, u64),
    st.tuples(u32, u32, u32, u32, u16), st.tuples(u32, u32, u32, u32),
    st.tuples(u32, u32, u32), u32, st.tuples(u64, u32, u16),
)
def test_params_round_trip(
    types: int,
    basic: tuple[int, ...],
    discard: tuple[int, ...],
    devt: tuple[int, ...],
    zoned: tuple[int, ...],
    dma: int,
    seg: tuple[int, ...],
) -> None:
    params = uapi.Params(
        types, uapi.ParamBasic(*basic), uapi.ParamDiscard(*discard), uapi.ParamDevt(*devt),
        uapi.ParamZoned(*zoned), uapi.ParamDma(dma), uapi.ParamSegment(*seg),
    )
    assert uapi.Params.unpack(params.pack()) == params
    v1 = uapi.Params.unpack(params.pack(uapi.PARAMS_SIZE_V1))  # 6.1's two blocks survive
    assert (v1.types, v1.basic, v1.discard) == (types, params.basic, params.discard)


@FAST
@given(st.binary(max_size=1024))
def test_cpumask_decodes_to_the_set_bits(mask: bytes) -> None:
    cpus = uapi.cpus_of_mask(mask)
    as_int = int.from_bytes(mask, "little")
    assert cpus == {c for c in range(len(mask) * 8) if as_int >> c & 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=20,
)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VDISK_UBLK_RUN_DIR", str(tmp_path))
    return tmp_path


# The run directory is the same for every example; each one rewrites the note.
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["type", "file", "backend_size", "size", "pid", "x"]),
                        json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
    )
)
def test_a_note_is_a_well_typed_dict_or_nothing(run_dir: Path, text: bytes) -> None:
    (run_dir / "7.json").write_bytes(text)
    note = read_note(7)
    if note is None:
        return
    assert isinstance(note, dict)
    for key, kind in (("type", str), ("file", str), ("backend_size", int), ("size", int),
                      ("pid", int)):
        if key in note:
            assert isinstance(note[key], kind) and not isinstance(note[key], bool)


def test_an_oversized_or_deeply_nested_note_is_no_note(run_dir: Path) -> None:
    (run_dir / "3.json").write_bytes(b'{"type": "raw", "pad": "' + b"x" * (70 << 10) + b'"}')
    assert read_note(3) is None
    (run_dir / "4.json").write_bytes(b"[" * 30000 + b"]" * 30000)  # under 64 KiB
    assert read_note(4) is None
