"""`vdisk bench` against `qemu-img bench` run with the same flags: the same report lines (all
but the seconds), exit status and errors; write runs leave the image as qemu-img's does
(`qemu-img compare`), and qcow2 images clean (`qemu-img check`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

from oracles import assert_check_clean
from vdisk.cli.bench import strtoul

_SECONDS = re.compile(r"Run completed in \d+\.\d{3} seconds\.")


def _ok(run: Run) -> Run:
    assert run.rc == 0, run
    return run


def _report(out: str) -> str:
    return _SECONDS.sub("Run completed in X seconds.", out)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path
    _ok(qemu_img(["create", "-q", "-f", "qcow2", "img.qcow2", "1M"], d))
    qemu_io(["-c", "write -P 3 0 200k", "-c", "write -z 600k 64k", "img.qcow2"], d)
    with (d / "img.raw").open("wb") as f:  # ends mid-sector: QEMU rounds its size up
        f.truncate(300_000)
    qemu_io(["-f", "raw", "-c", "write -P 4 4096 100000", "img.raw"], d)
    _ok(qemu_img(["create", "-q", "-f", "raw", "w.raw", "1M"], d))
    qemu_io(["-f", "raw", "-c", "write -P 5 4096 300000", "w.raw"], d)
    return d


READS = [
    ["-c", "10"],
    ["-c", "10", "-d", "2", "-s", "1k", "-S", "4k", "-o", "512"],
    ["-c", "0x10", "-d", "010", "-q"],
    ["-c", "0"],
    ["-c", "300", "-d", "4", "-s", "512", "-S", "40k"],  # wraps around the end
    ["-c", "3", "-s", "0"],
    ["-c", "3", "-S", "0"],
    ["-c", "5", "-n", "-t", "none"],
    ["-c", "5", "-i", "io_uring", "-t", "unsafe", "-U"],
    ["-c", "5", "-f", "raw"],
]


@pytest.mark.parametrize("img", ["img.qcow2", "img.raw"])
@pytest.mark.parametrize("flags", READS, ids=" ".join)
def test_read_report_matches_qemu_img(
    images: Path, vdisk_cli: VdiskRunner, img: str, flags: list[str]
) -> None:
    oracle = qemu_img(["bench", *flags, img], images)
    mine = vdisk_cli(["bench", *flags, img], images)
    assert (
        (mine.rc, _report(mine.out))
        == (oracle.rc, _report(oracle.out))
        == (
            0,
            _report(oracle.out),
        )
    ), (mine, oracle)
    assert mine.err == ""


WRITES = [
    ["-c", "10", "--pattern=7"],
    ["-c", "40", "-d", "3", "-s", "3k", "-S", "10k", "-o", "1536", "--pattern=0xaa"],
    ["-c", "400", "-d", "8", "-s", "4k", "-S", "44k", "--pattern=9"],  # wraps, overlaps
    ["-c", "64", "-d", "4", "--flush-interval=8", "--pattern=1"],
    ["-c", "64", "-d", "4", "--flush-interval=4", "--no-drain", "--pattern=2"],
    ["-c", "20", "-d", "1", "-s", "64k", "-S", "32k", "-o", "8k"],  # pattern 0 over data
]


@pytest.mark.parametrize("img", ["img.qcow2", "w.raw"])
@pytest.mark.parametrize("flags", WRITES, ids=" ".join)
def test_writes_leave_the_image_as_qemu_img_does(
    images: Path, vdisk_cli: VdiskRunner, img: str, flags: list[str]
) -> None:
    d = images
    fmt = img.rsplit(".", 1)[1]
    shutil.copy(d / img, d / f"ours.{fmt}")
    shutil.copy(d / img, d / f"theirs.{fmt}")
    oracle = qemu_img(["bench", "-w", "-f", fmt, *flags, f"theirs.{fmt}"], d)
    mine = vdisk_cli(["bench", "-w", "-f", fmt, *flags, f"ours.{fmt}"], d)
    assert (mine.rc, _report(mine.out), mine.err) == (0, _report(oracle.out), ""), mine
    assert (oracle.rc, oracle.err) == (0, ""), oracle
    # The writes did land (the pattern differs from what was there).
    assert qemu_img(["compare", "-f", fmt, "-F", fmt, img, f"ours.{fmt}"], d).rc == 1
    cmp = qemu_img(["compare", "-f", fmt, "-F", fmt, f"ours.{fmt}", f"theirs.{fmt}"], d)
    assert cmp.rc == 0, cmp
    if fmt == "qcow2":
        assert_check_clean(d / "ours.qcow2")


BAD = [
    ["-c", "x"],
    ["-c", "-1"],
    ["-c", "3G"],
    ["-d", "y"],
    ["--pattern=256"],
    ["--pattern=x"],
    ["-s", "abc"],
    ["-s", "3G"],
    ["-S", "-1"],
    ["-o", "-1"],
    ["-t", "bad"],
    ["-i", "bad"],
    ["-c", "3", "--flush-interval=70"],
    ["-c", "3", "-w", "--flush-interval=3"],
    ["-c", "3", "-w", "--flush-interval=x"],
    ["-c", "3", "-n"],
    ["-c", "3", "-i", "native", "-t", "writeback"],
    ["-c", "3", "-f", "vmdkx"],
    ["-c", "3", "-x"],
]


@pytest.mark.parametrize("flags", BAD, ids=" ".join)
def test_errors_like_qemu_img(images: Path, vdisk_cli: VdiskRunner, flags: list[str]) -> None:
    oracle = qemu_img(["bench", *flags, "img.qcow2"], images)
    mine = vdisk_cli(["bench", *flags, "img.qcow2"], images)
    assert (mine.rc, mine.out) == (oracle.rc, oracle.out) == (1, ""), (mine, oracle)
    assert len(mine.err.splitlines()) == 1 and mine.err.startswith("vdisk: "), mine.err
    theirs = " ".join(ln.removeprefix("qemu-img: ") for ln in oracle.err.splitlines())
    if "option" not in theirs:  # click words unknown options its own way
        assert mine.err.rstrip("\n").removeprefix("vdisk: ") == theirs


@pytest.mark.parametrize("args", [[], ["a.qcow2", "b.qcow2"]], ids=["none", "two"])
def test_one_file_name(images: Path, vdisk_cli: VdiskRunner, args: list[str]) -> None:
    oracle = qemu_img(["bench", *args], images)
    mine = vdisk_cli(["bench", *args], images)
    assert (mine.rc, oracle.rc) == (1, 1)
    assert mine.err.rstrip("\n") == "vdisk: Expecting one image file name", mine.err
    assert oracle.err.startswith("qemu-img: Expecting one image file name")


@pytest.mark.parametrize("flags", [["-o", "1M"], ["-o", "1020k", "-s", "8k"], ["-o", "5M"]])
def test_request_past_the_end_fails(images: Path, vdisk_cli: VdiskRunner, flags: list[str]) -> None:
    oracle = qemu_img(["bench", "-c", "3", *flags, "img.qcow2"], images)
    mine = vdisk_cli(["bench", "-c", "3", *flags, "img.qcow2"], images)
    assert (mine.rc, mine.out, mine.err) == (
        oracle.rc,
        oracle.out,
        "vdisk: Failed request: Input/output error\n",
    ), (mine, oracle)
    assert oracle.err == "qemu-img: Failed request: Input/output error\n"


def test_missing_image(images: Path, vdisk_cli: VdiskRunner) -> None:
    mine = vdisk_cli(["bench", "-c", "3", "nope.qcow2"], images)
    assert mine.rc == 1 and mine.out == "" and "nope.qcow2" in mine.err, mine


def test_zero_depth_fails_instead_of_hanging(images: Path, vdisk_cli: VdiskRunner) -> None:
    # qemu-img bench -d 0 waits forever; vdisk refuses it (with requests to send).
    mine = vdisk_cli(["bench", "-d", "0", "-c", "3", "img.qcow2"], images)
    assert (mine.rc, mine.err) == (1, "vdisk: Invalid queue depth specified\n"), mine
    _ok(vdisk_cli(["bench", "-d", "0", "-c", "0", "img.qcow2"], images))


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("10", 10), ("0x1F", 31), ("010", 8), (" 7", 7), ("-1", (1 << 64) - 1)],
)
def test_strtoul_is_c_base_0(text: str, value: int) -> None:
    assert strtoul(text) == value


@pytest.mark.parametrize("text", ["", "x", "1k", "08", "0x", "1 "])
def test_strtoul_rejects(text: str) -> None:
    assert strtoul(text) is None
