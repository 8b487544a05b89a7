"""Coverage-guided fuzzing (atheris) of the qcow2 format decoders.

Run by hand: ``python tests/fuzz/atheris_decoders.py -atheris_runs=100000`` (libFuzzer flags),
or through scripts/soak. The first input byte picks the decoder; any exception other than
VdiskError is a finding (libFuzzer saves the input as crash-*; add it to tests/fuzz/corpus).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vdisk.errors import VdiskError
    from vdisk.qcow2 import format as fmt


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, arg, body = data[0] % 7, data[1], data[2:]
    try:
        if target == 0:
            fmt.Header.decode(fmt.MAGIC + body).validate(len(body) << (arg % 40))
        elif target == 1:
            fmt.BitmapsExtension.decode(body)
            fmt.CryptoExtension.decode(body)
            fmt.decode_feature_table(body)
        elif target == 2:
            fmt.decode_snapshot_table(body, arg)
        elif target == 3:
            fmt.decode_bitmap_directory(body, arg)
        elif target == 4:
            order = arg % 7
            body = body[: len(body) // 8 * 8]  # blocks are whole clusters: multiples of 8
            block = fmt.decode_refcount_block(body, order)
            assert fmt.encode_refcount_block(block, order) == body
        elif target == 5:
            words = fmt.decode_table(body[: len(body) // 8 * 8])
            for entry in words.tolist()[:64]:
                fmt.l2_entry_type(entry)
                if entry & fmt.OFLAG_COMPRESSED:
                    fmt.decode_compressed(entry, 9 + arg % 13)
        else:
            words = fmt.decode_table(body[: len(body) // 16 * 16]).tolist()
            for i in range(0, len(words) - 1, 2):
                fmt.subcluster_type(words[i], words[i + 1], arg % 32)
    except VdiskError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
