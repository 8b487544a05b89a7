"""`vdisk info` against `qemu-img info` on the same files: the outputs are byte-identical.

Images come from qemu-img itself (so nothing of ours decides what they contain) and from
struct-crafted headers for states qemu-img cannot be asked to make (no backing format).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img, qemu_io

Maker = Callable[[Path], str]


def _create(d: Path, name: str, size: str, *opts: str) -> str:
    sized = [size] if size else []  # no size: the backing file's
    run = qemu_img(["create", "-q", "-f", "qcow2", *opts, name, *sized], d)
    assert run.rc == 0, run.err
    return name


def _raw(d: Path) -> str:
    assert qemu_img(["create", "-q", "-f", "raw", "disk.img", "10M"], d).rc == 0
    qemu_io(["-f", "raw", "-c", "write -P 0x11 1M 64k", "disk.img"], d)
    return "disk.img"


def _raw_odd(d: Path) -> str:
    (d / "odd.raw").write_bytes(b"abc")  # QEMU sees a raw file in whole sectors: 512 B
    return "odd.raw"


def _with_data(d: Path) -> str:
    _create(d, "data.qcow2", "64M")
    qemu_io(["-c", "write -P 0x22 0 3M", "-c", "write -P 0x33 40M 64k", "data.qcow2"], d)
    return "data.qcow2"


def _chain(d: Path) -> str:
    (d / "sub").mkdir()
    _create(d, "sub/base.qcow2", "32M")
    _create(d, "sub/mid.qcow2", "", "-b", "base.qcow2", "-F", "qcow2")
    _create(d, "top.qcow2", "", "-b", "sub/mid.qcow2", "-F", "qcow2")
    return "top.qcow2"


def _raw_backing(d: Path) -> str:
    _raw(d)
    _create(d, "over.qcow2", "", "-b", "disk.img", "-F", "raw")
    return "over.qcow2"


def _absolute_backing(d: Path) -> str:
    _create(d, "base.qcow2", "16M")
    _create(d, "abs.qcow2", "", "-b", str(d / "base.qcow2"), "-F", "qcow2")
    return "abs.qcow2"


def _missing_backing(d: Path) -> str:
    return _create(d, "orphan.qcow2", "8M", "-u", "-b", "gone.qcow2", "-F", "qcow2")


def _dirty_lazy(d: Path) -> str:
    _create(d, "lazy.qcow2", "16M", "-o", "lazy_refcounts=on")
    # Killed mid-session, so the dirty bit stays set (qemu-io exits by SIGKILL: rc -9).
    import subprocess

    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "sigraise 9", "lazy.qcow2"],
        cwd=d,
        capture_output=True,
        check=False,
    )
    return "lazy.qcow2"


def _corrupt_bit(d: Path) -> str:
    _create(d, "corrupt.qcow2", "8M")
    with open(d / "corrupt.qcow2", "r+b") as f:
        f.seek(72)
        (incompat,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 2))
    return "corrupt.qcow2"


def _snapshots(d: Path) -> str:
    _with_data(d)
    for name in ("first", "a much longer snapshot name than sixteen"):
        assert qemu_img(["snapshot", "-c", name, "data.qcow2"], d).rc == 0
    return "data.qcow2"


def _no_backing_format(d: Path) -> str:
    from qcow2_craft import Craft, write

    _raw(d)
    write(str(d / "nofmt.qcow2"), Craft(backing_file=b"disk.img"))
    return "nofmt.qcow2"


def _data_file(d: Path, raw: bool) -> str:
    """An external data file image, written through QEMU (its data lands in the data file)."""
    opts = "data_file=df.raw" + (",data_file_raw=on" if raw else "")
    _create(d, "df.qcow2", "64M", "-o", opts)
    qemu_io(["-c", "write -P 0x22 0 3M", "-c", "write -P 0x33 40M 64k", "df.qcow2"], d)
    return "df.qcow2"


def _missing_data_file(d: Path) -> str:
    """qemu-img info reads the metadata of an image whose data file is gone."""
    _create(d, "gone.qcow2", "1M", "-o", "data_file=gone.raw")
    (d / "gone.raw").unlink()
    return "gone.qcow2"


def _bitmaps(d: Path) -> str:
    _with_data(d)
    assert qemu_img(["bitmap", "--add", "data.qcow2", "b0"], d).rc == 0
    assert qemu_img(["bitmap", "--add", "-g", "128k", "--disable", "data.qcow2", "off"], d).rc == 0
    return "data.qcow2"


IMAGES: dict[str, Maker] = {
    "raw": _raw,
    "raw-odd-size": _raw_odd,
    "v3-default": lambda d: _create(d, "v3.qcow2", "1G"),
    "v2-4k": lambda d: _create(d, "v2.qcow2", "100M", "-o", "compat=0.10,cluster_size=4k"),
    "v3-512-refcount1": lambda d: _create(
        d, "r1.qcow2", "10M", "-o", "cluster_size=512,refcount_bits=1"
    ),
    "v3-2m-refcount64-lazy": lambda d: _create(
        d, "r64.qcow2", "5G", "-o", "cluster_size=2M,refcount_bits=64,lazy_refcounts=on"
    ),
    "extended-l2": lambda d: _create(d, "ext.qcow2", "1G", "-o", "extended_l2=on"),
    "zstd": lambda d: _create(d, "z.qcow2", "1G", "-o", "compression_type=zstd"),
    "prealloc-metadata": lambda d: _create(d, "pm.qcow2", "256M", "-o", "preallocation=metadata"),
    "odd-size": lambda d: _create(d, "odd.qcow2", "12345"),
    "multi-tib": lambda d: _create(d, "big.qcow2", "4T"),
    "with-data": _with_data,
    "chain": _chain,
    "raw-backing": _raw_backing,
    "absolute-backing": _absolute_backing,
    "missing-backing": _missing_backing,
    "dirty-lazy": _dirty_lazy,
    "corrupt-bit": _corrupt_bit,
    "snapshots": _snapshots,
    "no-backing-format": _no_backing_format,
    "bitmaps": _bitmaps,
    "data-file": lambda d: _data_file(d, raw=False),
    "data-file-raw": lambda d: _data_file(d, raw=True),
    "data-file-missing": _missing_data_file,
}


def _both(vdisk_cli: VdiskRunner, args: list[str], d: Path) -> tuple[Run, Run]:
    return vdisk_cli(["info", *args], d), qemu_img(["info", *args], d)


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_info_matches_qemu_img(
    kind: str, output: str, tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    name = IMAGES[kind](tmp_path)
    ours, theirs = _both(vdisk_cli, [f"--output={output}", name], tmp_path)
    assert theirs.rc == 0, theirs.err
    assert ours.rc == 0, ours.err
    assert ours.out == theirs.out
    if output == "json":
        assert json.loads(ours.out) == json.loads(theirs.out)


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("kind", ["chain", "raw-backing", "absolute-backing", "v3-default"])
def test_backing_chain_matches_qemu_img(
    kind: str, output: str, tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    name = IMAGES[kind](tmp_path)
    ours, theirs = _both(vdisk_cli, ["--backing-chain", f"--output={output}", name], tmp_path)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out), ours.err


def test_explicit_format_and_force_share(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    name = _with_data(tmp_path)
    for args in (["-f", "qcow2", name], ["-U", name], ["-f", "raw", name]):
        ours, theirs = _both(vdisk_cli, args, tmp_path)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out), args


@pytest.mark.parametrize(
    "args",
    [
        ["does-not-exist.qcow2"],
        ["--output=xml", "x"],
        ["-f", "vmdk", "x"],
        ["--backing-chain", "orphan.qcow2"],
        [],
    ],
    ids=["missing-file", "bad-output", "unknown-format", "chain-missing-backing", "no-file"],
)
def test_info_errors_exit_1_in_one_line(
    args: list[str], tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    _missing_backing(tmp_path)
    ours, theirs = _both(vdisk_cli, args, tmp_path)
    assert theirs.rc == 1
    assert ours.rc == 1
    assert ours.out == ""
    assert len(ours.err.splitlines()) == 1 and ours.err.startswith("vdisk: "), ours.err


def test_info_qcow2_forced_on_raw_fails(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    name = _raw(tmp_path)
    ours, theirs = _both(vdisk_cli, ["-f", "qcow2", name], tmp_path)
    assert (ours.rc, theirs.rc) == (1, 1)
    assert len(ours.err.splitlines()) == 1


@pytest.mark.parametrize(
    "spelling", ["d/sub/top.qcow2", "./d/sub/top.qcow2", "d/sub//top.qcow2", "absolute"]
)
def test_relative_backing_resolves_as_qemu_img_does(
    spelling: str, tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    """A relative backing name is taken from the overlay's directory as the path spells it,
    whatever the cwd: `info --backing-chain` and `map` name the same files as qemu-img's."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    _create(d, "sub/base.qcow2", "8M")
    qemu_io(["-c", "write -P 0x44 1M 128k", "sub/base.qcow2"], d)
    _create(d, "sub/top.qcow2", "", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(["-c", "write -P 0x55 3M 64k", "sub/top.qcow2"], d)
    name = str(d / "sub" / "top.qcow2") if spelling == "absolute" else spelling
    for args in (["info", "--backing-chain", name], ["map", name]):
        ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
        assert theirs.rc == 0, theirs.err
        assert (ours.rc, ours.out) == (0, theirs.out), ours.err
    assert "base.qcow2" in theirs.out  # the map names the backing file it read from
    # Reading through the chain (the image opens its own backing file) gives qemu's bytes.
    assert qemu_img(["convert", "-O", "raw", name, "flat.raw"], tmp_path).rc == 0
    same = vdisk_cli(["compare", name, "flat.raw"], tmp_path)
    assert (same.rc, same.out) == (0, "Images are identical.\n"), same.err


@pytest.mark.parametrize("backing", ["nbd+unix:///x?socket=/nonexistent", "d/a:b.qcow2"])
def test_protocol_backing_name_left_alone(
    backing: str, tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    """A colon before any slash makes a protocol name, kept as is; after a slash it does not."""
    (tmp_path / "sub").mkdir()
    fmt = "raw" if backing.startswith("nbd") else "qcow2"
    _create(tmp_path, "sub/o.qcow2", "1M", "-u", "-b", backing, "-F", fmt)
    for output in ("human", "json"):
        ours, theirs = _both(vdisk_cli, [f"--output={output}", "sub/o.qcow2"], tmp_path)
        assert theirs.rc == 0, theirs.err
        assert (ours.rc, ours.out) == (0, theirs.out), ours.err
