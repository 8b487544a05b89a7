"""The -o parser and the Formatting line on their own (qemu-img's behaviour, pinned by hand)."""

from __future__ import annotations

import pytest

from vdisk.cli.options import formatting_line, parse_opts, split_opts
from vdisk.errors import RequestError


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("a=1,b=2", ["a=1", "b=2"]),
        ("backing_file=x,,y.qcow2,backing_fmt=qcow2", ["backing_file=x,y.qcow2", "backing_fmt=qcow2"]),
        ("a=1,", ["a=1"]),
        ("help", ["help"]),
        ("", []),
    ],
)
def test_split_opts(text: str, items: list[str]) -> None:
    assert split_opts(text) == items


def test_later_values_win_and_types_parse() -> None:
    opts = parse_opts(
        "qcow2", ["cluster_size=4k,lazy_refcounts", "cluster_size=8k,refcount_bits=0x8"], "f"
    )
    assert opts["cluster_size"].value == 8192
    assert opts["lazy_refcounts"].value is True
    assert opts["refcount_bits"].value == 8


@pytest.mark.parametrize(
    "text", ["cluster_size=abc", "lazy_refcounts=maybe", "refcount_bits=x", "nope=1"]
)
def test_bad_values_are_request_errors(text: str) -> None:
    with pytest.raises(RequestError):
        parse_opts("qcow2", [text], "f")


def test_formatting_line_escapes_commas_and_keeps_qemu_order() -> None:
    opts = parse_opts("qcow2", ["backing_file=a,,b,backing_fmt=raw,compat=v2,size=1M"], "x")
    assert formatting_line("x", "qcow2", opts) == (
        "Formatting 'x', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
        "size=1048576 compat=v2 backing_file=a,,b backing_fmt=raw lazy_refcounts=off "
        "refcount_bits=16"
    )
