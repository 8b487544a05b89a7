"""`vdisk dd` against `qemu-img dd` run with the same arguments: `qemu-img compare` says both
outputs hold the same contents, their virtual sizes agree, `qemu-img check` finds qcow2
outputs clean; bad operands fail (exit 1, one line) where qemu-img fails.

Inputs come from qemu-img / qemu-io: a raw file whose size is not a whole number of sectors,
and a qcow2 image with data, zero clusters and holes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

from oracles import assert_check_clean
from vdisk.cli.options import cvtnum
from vdisk.errors import RequestError


def _ok(run: Run) -> Run:
    assert run.rc == 0, run
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dd")
    with (d / "in.raw").open("wb") as f:  # ends mid-sector: QEMU rounds its size up
        f.truncate(200_000)
    qemu_io(["-f", "raw", "-c", "write -P 5 0 70000", "-c", "write -P 9 150000 50000",
             "in.raw"], d)  # fmt: skip
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "in.qcow2", "3M"], d))
    qemu_io(["-c", "write -P 1 0 100k", "-c", "write -z 1M 64k", "-c", "write -P 2 2000k 300k",
             "in.qcow2"], d)  # fmt: skip
    return d


def _virtual_size(path: Path, fmt: str) -> int:
    out = _ok(qemu_img(["info", "-f", fmt, "--output=json", path.name], path.parent)).out
    size: int = json.loads(out)["virtual-size"]
    return size


CASES = [
    [],
    ["bs=1k"],
    ["bs=1000"],
    ["bs=3", "count=10", "skip=5"],
    ["bs=64k", "skip=1"],
    ["bs=4k", "count=7"],
    ["count=2", "skip=1", "bs=1k"],  # count bounds the input before the skip comes off
    ["bs=1.5k", "skip=3", "count=100"],
    ["count=0"],
    ["skip=100M"],  # past the end: a warning, an empty output, exit status 0
    ["bs=0x1000", "count=1M"],
]


@pytest.mark.parametrize("src", ["in.raw", "in.qcow2"])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("ops", CASES, ids=lambda ops: "-".join(ops) or "plain")
def test_dd_matches_qemu_img(
    inputs: Path, vdisk_cli: VdiskRunner, src: str, out_fmt: str, ops: list[str]
) -> None:
    d = inputs
    tag = f"{src}-{out_fmt}-{'-'.join(ops)}"
    ours, theirs = f"ours-{tag}", f"theirs-{tag}"
    mine = vdisk_cli(["dd", "-O", out_fmt, *ops, f"if={src}", f"of={ours}"], d)
    oracle = qemu_img(["dd", "-O", out_fmt, *ops, f"if={src}", f"of={theirs}"], d)
    assert (mine.rc, mine.out) == (oracle.rc, oracle.out) == (0, ""), (mine, oracle)
    # The same warnings (none, or the skip one), with our prefix.
    assert mine.err.replace("vdisk: ", "") == oracle.err.replace("qemu-img: ", ""), (mine, oracle)
    assert _virtual_size(d / ours, out_fmt) == _virtual_size(d / theirs, out_fmt)
    cmp = qemu_img(["compare", "-f", out_fmt, "-F", out_fmt, ours, theirs], d)
    assert cmp.rc == 0, cmp
    if out_fmt == "qcow2":
        assert_check_clean(d / ours)


def test_dd_probes_and_takes_input_format(inputs: Path, vdisk_cli: VdiskRunner) -> None:
    d = inputs
    _ok(vdisk_cli(["dd", "-f", "qcow2", "-O", "qcow2", "if=in.qcow2", "of=f.qcow2"], d))
    cmp = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", "in.qcow2", "f.qcow2"], d)
    assert cmp.rc == 0, cmp
    # -f raw on a qcow2 file copies the file's bytes, as qemu-img does.
    _ok(vdisk_cli(["dd", "-f", "raw", "if=in.qcow2", "of=ours-r.raw"], d))
    _ok(qemu_img(["dd", "-f", "raw", "if=in.qcow2", "of=theirs-r.raw"], d))
    assert (d / "ours-r.raw").read_bytes() == (d / "theirs-r.raw").read_bytes()


def test_dd_overwrites_an_existing_output(inputs: Path, vdisk_cli: VdiskRunner) -> None:
    d = inputs
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "old.qcow2", "64M"], d))
    qemu_io(["-c", "write -P 7 0 4M", "old.qcow2"], d)
    _ok(vdisk_cli(["dd", "-O", "qcow2", "bs=1k", "count=10", "if=in.raw", "of=old.qcow2"], d))
    assert _virtual_size(d / "old.qcow2", "qcow2") == 10240
    head = d / "head.raw"
    head.write_bytes((d / "in.raw").read_bytes()[:10240])
    cmp = qemu_img(["compare", "-f", "qcow2", "-F", "raw", "old.qcow2", "head.raw"], d)
    assert cmp.rc == 0, cmp
    assert_check_clean(d / "old.qcow2")


BAD = [
    [],
    ["if=in.raw"],
    ["of=x.raw"],
    ["bs=0", "if=in.raw", "of=x.raw"],
    ["bs=2G", "if=in.raw", "of=x.raw"],
    ["bs=abc", "if=in.raw", "of=x.raw"],
    ["bs=1.5", "if=in.raw", "of=x.raw"],
    ["bs=", "if=in.raw", "of=x.raw"],
    ["count=-1", "if=in.raw", "of=x.raw"],
    ["skip=x", "if=in.raw", "of=x.raw"],
    ["foo=1", "if=in.raw", "of=x.raw"],
    ["foo", "if=in.raw", "of=x.raw"],
    ["=x", "if=in.raw", "of=x.raw"],
    ["-f", "vmdkx", "if=in.raw", "of=x.raw"],
    ["-O", "vmdkx", "if=in.raw", "of=x.raw"],
    ["if=nope.raw", "of=x.raw"],
    ["-x", "if=in.raw", "of=x.raw"],
    ["if=in.raw", "of=x.raw", "-f"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a) or "nothing")
def test_dd_errors_like_qemu_img(inputs: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    d = inputs
    oracle = qemu_img(["dd", *args], d)
    mine = vdisk_cli(["dd", *args], d)
    assert (mine.rc, mine.out) == (oracle.rc, oracle.out) == (1, ""), (mine, oracle)
    assert len(mine.err.splitlines()) == 1 and mine.err.startswith("vdisk: "), mine.err
    assert "Traceback" not in mine.err
    # Operand errors: qemu-img's message, word for word (its two lines joined into one).
    first = oracle.err.splitlines()[0].removeprefix("qemu-img: ")
    if first.startswith(("Invalid", "unrecognized operand", "Must specify", "Unknown file")):
        theirs = " ".join(ln.removeprefix("qemu-img: ") for ln in oracle.err.splitlines())
        assert mine.err.rstrip("\n").removeprefix("vdisk: ") == theirs
    assert not (d / "x.raw").exists()


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("1k", 1024), ("1.5k", 1536), ("0x10", 16), ("1b", 1), ("2M", 2 << 20),
     ("1.0001k", 1024), ("1E", 1 << 60)],
)  # fmt: skip
def test_cvtnum_accepts_qemu_spellings(text: str, value: int) -> None:
    assert cvtnum("bs", text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5", "k", "1kb", "1 k", "0x1.5k", "8E"])
def test_cvtnum_rejects(text: str) -> None:
    with pytest.raises(RequestError):
        cvtnum("bs", text)
