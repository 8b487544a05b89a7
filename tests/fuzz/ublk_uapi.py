"""An atheris fuzz target for the ublk decoders (run by hand, not by pytest):

    .venv/bin/python tests/fuzz/ublk_uapi.py -atheris_runs=200000 [CORPUS_DIR]

The first byte picks the decoder (GET_DEV_INFO reply, GET_PARAMS reply, queue-affinity
cpumask, device note); the rest is its input. Every input must end in a value or a
UblkError; anything else is a finding, and libFuzzer stops with the input that caused it.
tests/ublk/test_uapi_fuzz.py checks the same properties with hypothesis in CI.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vdisk.ublk import UblkError, uapi
    from vdisk.ublk.device import decode_note


def _dev_info(data: bytes) -> None:
    info = uapi.DevInfo.unpack(data)
    assert uapi.DevInfo.unpack(info.pack()) == info


def _params(data: bytes) -> None:
    params = uapi.Params.unpack(data)
    assert uapi.Params.unpack(params.pack()) == params


def _cpumask(data: bytes) -> None:
    assert len(uapi.cpus_of_mask(data)) <= 8 * len(data)


def _note(data: bytes) -> None:
    note = decode_note(data)
    assert note is None or isinstance(note, dict)


DECODERS = (_dev_info, _params, _cpumask, _note)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        DECODERS[data[0] % len(DECODERS)](data[1:])
    except UblkError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
