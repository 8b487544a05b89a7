"""External data files against qemu-img/qemu-io 7.2: QEMU makes the image and vdisk reads it
identically; vdisk writes and qemu-img check is clean, compare agrees (and a raw data file is
the guest's disk by itself); vdisk creates and the files, info and layout agree; the data file
is locked as qemu-io locks it; the tools and an NBD export work on such images."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_io, run
from vdisk.errors import CorruptImageError, RequestError, VdiskError
from vdisk.qcow2 import Qcow2Image, check
from vdisk.qcow2 import format as fmt

pytestmark = needs_qemu

MIB = 1 << 20
SIZE = 8 * MIB
VDISK = str(Path(sys.executable).parent / "vdisk")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its directory: QEMU 7.2 opens a relative data-file name from the
    working directory, so the oracles find the data file only from there."""
    monkeypatch.chdir(tmp_path)


def _qemu_create(where: Path, opts: str = "", size: int = SIZE) -> Path:
    """qemu-img create with a data file next to the image (run in ``where``: QEMU 7.2 takes
    the data file name relative to the working directory)."""
    image = where / "image.qcow2"
    options = "data_file=data.raw" + (f",{opts}" if opts else "")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "image.qcow2", str(size)],
        cwd=where,
        check=True,
    )
    return image


def _qemu_io(where: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, "image.qcow2"], cwd=where, check=True, capture_output=True)


def _qemu_raw(where: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", "image.qcow2", "out.raw"], cwd=where, check=True
    )
    data = (where / "out.raw").read_bytes()
    (where / "out.raw").unlink()
    return data


@pytest.mark.parametrize(
    "opts", ["", "data_file_raw=on", "extended_l2=on", "cluster_size=4k,lazy_refcounts=on"]
)
def test_qemu_writes_vdisk_reads(tmp_path: Path, opts: str) -> None:
    image = _qemu_create(tmp_path, opts)
    _qemu_io(
        tmp_path,
        "write -P 0x41 0 100k",
        "write -P 0x42 1M 64k",
        "write -z 2M 64k",
        "write -P 0x43 3M 4k",
        "discard 1M 64k",
        "write -P 0x44 5000 3000",
    )
    expected = _qemu_raw(tmp_path)
    with Qcow2Image.open(str(image), readonly=True) as img:
        assert img.data_file is not None
        assert os.path.samefile(img.data_file, tmp_path / "data.raw")
        assert img.pread(SIZE, 0) == expected
        data = [e for e in img.block_status(0, SIZE) if e.data]
        assert data[0].offset == 0 and data[0].host_offset == 0  # guest == host offset


def _vdisk_ops(img: vdisk.BlockDevice, model: bytearray, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        kind = rng.choice(("write", "write", "zero", "discard"))
        offset = rng.randrange(0, SIZE // 512 - 300) * 512
        length = rng.choice((512, 4096, 65536, 70000 // 512 * 512, 300 * 512))
        if kind == "write":
            data = rng.randbytes(length)
            img.write(data, offset)
            model[offset : offset + length] = data
        elif kind == "zero":
            img.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
            model[offset : offset + length] = bytes(length)
        else:
            img.discard(offset, length)
            # Discard zeroes whole clusters (no backing file); the rest stays.
            cs = img.cluster_size  # type: ignore[attr-defined]
            a, b = -(-offset // cs) * cs, (offset + length) // cs * cs
            if a < b:
                model[a:b] = bytes(b - a)


@pytest.mark.parametrize("opts", ["", "data_file_raw=on", "extended_l2=on,cluster_size=16k"])
def test_vdisk_writes_qemu_checks(tmp_path: Path, opts: str) -> None:
    image = _qemu_create(tmp_path, opts)
    _qemu_io(tmp_path, "write -P 0x41 0 1M")
    model = bytearray(_qemu_raw(tmp_path))
    with Qcow2Image.open(str(image)) as img:
        _vdisk_ops(img, model, seed=len(opts))
        assert img.pread(SIZE, 0) == model
    assert_check_clean(image)
    assert _qemu_raw(tmp_path) == model
    assert os.path.getsize(image) < MIB  # the data went to the data file
    header = fmt.Header.decode((image).read_bytes()[:65536])
    assert header.incompatible_features & fmt.INCOMPAT_DATA_FILE
    raw = "data_file_raw" in opts
    assert bool(header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW) == raw
    if raw:  # the data file alone is the guest's disk
        assert (tmp_path / "data.raw").read_bytes() == model
    assert check.check(str(image)).corruptions == 0


@pytest.mark.parametrize(
    "opts",
    [
        "",
        "data_file_raw=on",
        "preallocation=metadata",
        "preallocation=falloc",
        "extended_l2=on,cluster_size=16k",
        "data_file_raw=on,compression_type=zstd,lazy_refcounts=on",
    ],
)
def test_vdisk_creates_as_qemu_img(tmp_path: Path, opts: str) -> None:
    q, v = tmp_path / "q", tmp_path / "v"
    q.mkdir()
    v.mkdir()
    qimage = _qemu_create(q, opts, 64 * MIB)
    kwargs = dict(kv.split("=") for kv in opts.split(",") if kv)
    vimage = v / "image.qcow2"
    vdisk.create(str(vimage), 64 * MIB, data_file=str(v / "data.raw"), **kwargs)
    # The same bytes but for the data file's name (absolute here, relative there).
    vhead = fmt.Header.decode(vimage.read_bytes()[:65536])
    qhead = fmt.Header.decode(qimage.read_bytes()[:65536])
    assert vhead.data_file == str(v / "data.raw") and qhead.data_file == "data.raw"
    vhead.set_extension(fmt.EXT_DATA_FILE, b"data.raw")
    assert vhead.encode() == qhead.encode()
    qbody, vbody = qimage.read_bytes(), vimage.read_bytes()
    assert len(qbody) == len(vbody)
    cs = qhead.cluster_size
    assert qbody[cs:] == vbody[cs:]
    assert os.path.getsize(q / "data.raw") == os.path.getsize(v / "data.raw") == 64 * MIB
    info = json.loads(run("qemu-img", "info", "--output=json", vimage))
    spec = info["format-specific"]["data"]
    assert spec["data-file"] == str(v / "data.raw")
    assert spec["data-file-raw"] == ("data_file_raw" in opts)
    assert_check_clean(vimage)
    subprocess.run(["qemu-img", "compare", str(vimage), "image.qcow2"], cwd=q, check=True)


def test_create_refusals_are_qemu_imgs(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
    cases = [
        ({"data_file_raw": "on"}, "data-file-raw requires data-file"),
        (
            {"data_file": "d.raw", "compat": "0.10"},
            "External data files are only supported with compatibility level 1.1",
        ),
        (
            {"data_file": "d.raw", "data_file_raw": "on", "backing_file": str(base),
             "backing_fmt": "qcow2"},
            "Backing file and data-file-raw cannot be used at the same time",
        ),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(RequestError, match=message):
            vdisk.create(str(tmp_path / "x.qcow2"), MIB, **options)


def test_open_override_and_missing_data_file(tmp_path: Path) -> None:
    image = _qemu_create(tmp_path)
    _qemu_io(tmp_path, "write -P 0x61 0 64k")
    moved = tmp_path / "elsewhere.raw"
    (tmp_path / "data.raw").rename(moved)
    with pytest.raises(VdiskError, match="No such file"):
        vdisk.open(str(image), readonly=True)
    with vdisk.open(str(image), readonly=True, data_file=str(moved)) as img:
        assert img.pread(4, 0) == b"aaaa"
    # As qemu-img info: the metadata is readable without the data file.
    info = json.loads(run(VDISK, "info", "--output=json", image))
    assert info["format-specific"]["data"]["data-file"] == "data.raw"
    plain = tmp_path / "plain.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
    with pytest.raises(RequestError, match="can only be set for images with an external"):
        vdisk.open(str(plain), data_file=str(moved))


def test_data_file_name_missing_is_refused(tmp_path: Path) -> None:
    image = _qemu_create(tmp_path)
    header = fmt.Header.decode(image.read_bytes()[:65536])
    header.set_extension(fmt.EXT_DATA_FILE, None)
    blob = header.encode()
    with open(image, "r+b") as f:
        f.write(blob)
    with pytest.raises(RequestError, match="'data-file' is required for this image"):
        vdisk.open(str(image), readonly=True)


def test_compressed_entry_is_corruption(tmp_path: Path) -> None:
    image = _qemu_create(tmp_path)
    _qemu_io(tmp_path, "write -P 0x61 0 64k")
    with Qcow2Image.open(str(image), readonly=True) as img:
        l2_offset = img.map.l1[0] & fmt.L1E_OFFSET_MASK
    with open(image, "r+b") as f:
        f.seek(l2_offset)
        f.write((fmt.OFLAG_COMPRESSED | 0x10000).to_bytes(8, "big"))
    with Qcow2Image.open(str(image), readonly=True) as img, pytest.raises(CorruptImageError):
        img.pread(512, 0)
    assert check.check(str(image)).corruptions == 1


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_data_file_locked_as_qemu_io_locks_it(tmp_path: Path, mode: str) -> None:
    locking_tests = pytest.importorskip("test_locking")
    image = _qemu_create(tmp_path)
    data = tmp_path / "data.raw"
    with locking_tests.qemu_io_holding(image, "qcow2", mode):
        expected = locking_tests.locked_bytes(data)
    assert expected  # QEMU does lock the data file
    with vdisk.open(str(image), readonly=(mode == "ro")):
        assert locking_tests.locked_bytes(data) == expected
    with vdisk.open(str(image)):  # a writer keeps a second writer out, as in QEMU
        refusal = subprocess.run(
            ["qemu-io", "-c", "read 0 512", "image.qcow2"], cwd=tmp_path, capture_output=True
        )
        assert refusal.returncode != 0


def test_tools_match_qemu_img(tmp_path: Path) -> None:
    _qemu_create(tmp_path, "cluster_size=4k")
    _qemu_io(tmp_path, "write -P 0x41 0 100k", "write -z 2M 64k", "write -P 0x43 3M 4k")
    vdisk_cli = VDISK
    for command in (
        ["map"],
        ["map", "--output=json"],
        ["check"],
        ["check", "--output=json"],
        ["info"],
        ["info", "--output=json"],
        ["measure", "-O", "qcow2"],
    ):
        ours = subprocess.run(
            [vdisk_cli, *command, "image.qcow2"], cwd=tmp_path, capture_output=True, text=True
        )
        theirs = subprocess.run(
            ["qemu-img", *command, "image.qcow2"], cwd=tmp_path, capture_output=True, text=True
        )
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), command
    subprocess.run([vdisk_cli, "convert", "-O", "raw", "image.qcow2", "v.raw"], cwd=tmp_path,
                   check=True)  # fmt: skip
    assert (tmp_path / "v.raw").read_bytes() == _qemu_raw(tmp_path)
    subprocess.run([vdisk_cli, "compare", "image.qcow2", "v.raw"], cwd=tmp_path, check=True)
    # convert into a data-file image
    subprocess.run(
        [vdisk_cli, "convert", "-O", "qcow2", "-o", "data_file=out-data.raw", "v.raw", "o.qcow2"],
        cwd=tmp_path,
        check=True,
    )
    subprocess.run(["qemu-img", "compare", "o.qcow2", "v.raw"], cwd=tmp_path, check=True)
    assert_check_clean(tmp_path / "o.qcow2")


def test_nbd_export(tmp_path: Path) -> None:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-img cannot reach NBD without qemu's nbd block driver (qemu-nbd)")
    from vdisk.nbd.server import Export, NbdServer

    image = _qemu_create(tmp_path)
    _qemu_io(tmp_path, "write -P 0x41 0 100k")
    sock = f"/tmp/vdf-{os.getpid()}-{time.monotonic_ns()}.sock"
    with vdisk.open(str(image)) as dev:
        server = NbdServer([Export(dev)])
        server.listen_unix(sock)
        server.start()
        try:
            uri = f"nbd+unix:///?socket={sock}"
            qemu_io(uri, "write -P 0x42 1M 64k", fmt="raw")
            run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", tmp_path / "nbd.raw")
        finally:
            server.close()
            Path(sock).unlink(missing_ok=True)
    assert_check_clean(image)
    direct = _qemu_raw(tmp_path)
    assert (tmp_path / "nbd.raw").read_bytes() == direct
    assert direct[:4] == b"AAAA" and direct[MIB : MIB + 4] == b"BBBB"


def test_resize_resizes_the_data_file(tmp_path: Path) -> None:
    from vdisk.qcow2.resize import resize

    image = _qemu_create(tmp_path, size=4 * MIB)
    _qemu_io(tmp_path, "write -P 0x61 3M 1M")
    with Qcow2Image.open(str(image)) as img:
        resize(img, 8 * MIB)
        img.write(b"b" * 4096, 7 * MIB)
    assert os.path.getsize(tmp_path / "data.raw") == 8 * MIB  # as qemu-img resize
    assert_check_clean(image)
    with Qcow2Image.open(str(image)) as img:
        resize(img, 2 * MIB)
    assert os.path.getsize(tmp_path / "data.raw") == 2 * MIB
    assert_check_clean(image)
    run("qemu-img", "compare", image, tmp_path / "data.raw")


def test_compressed_writes_and_snapshots_refused(tmp_path: Path) -> None:
    from vdisk.errors import UnsupportedFeatureError
    from vdisk.qcow2.datafile import refuse_on_data_file

    image = _qemu_create(tmp_path)
    header = fmt.Header.decode(image.read_bytes()[:65536])
    with pytest.raises(UnsupportedFeatureError, match=r"^Operation not supported$") as caught:
        refuse_on_data_file(header)
    assert caught.value.errno == 95  # ENOTSUP, as QEMU answers
    # QEMU's own answers, which the message follows.
    refused = subprocess.run(["qemu-io", "-c", "write -c 0 64k", "image.qcow2"], capture_output=True,
                             text=True)  # fmt: skip
    assert "Operation not supported" in refused.stdout + refused.stderr
    plain = tmp_path / "plain.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
    refuse_on_data_file(fmt.Header.decode(plain.read_bytes()[:65536]))  # no data file: fine


def test_check_repair_matches_qemu_img(tmp_path: Path) -> None:
    image = _qemu_create(tmp_path, "cluster_size=4k")
    _qemu_io(tmp_path, "write -P 1 0 100k", "write -P 2 1M 64k")
    with Qcow2Image.open(str(image), readonly=True) as img:
        l2_offset = img.map.l1[0] & fmt.L1E_OFFSET_MASK
    with open(image, "r+b") as f:  # drop COPIED from a data-file entry: refcount is 1
        f.seek(l2_offset + 8)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2_offset + 8)
        f.write((entry & ~fmt.OFLAG_COPIED).to_bytes(8, "big"))
    twin = tmp_path / "twin.qcow2"
    shutil.copy(image, twin)
    ours = subprocess.run([VDISK, "check", "-r", "all", "image.qcow2"], capture_output=True,
                          text=True)  # fmt: skip
    theirs = subprocess.run(["qemu-img", "check", "-r", "all", "twin.qcow2"], capture_output=True,
                            text=True)  # fmt: skip
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert image.read_bytes() == twin.read_bytes()
    assert_check_clean(image)


@pytest.mark.parametrize("raw", ["off", "on"])
def test_subclusters_in_a_data_file_match_qemu(tmp_path: Path, raw: str) -> None:
    """Extended L2 with a data file: qemu-io and vdisk do the same writes, zeroes and
    discards; the maps, contents and (raw) data files agree."""
    images = []
    for name in ("q", "v"):
        opts = f"extended_l2=on,cluster_size=16k,data_file={name}.data,data_file_raw={raw}"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, f"{name}.qcow2", "4M")
        images.append(tmp_path / f"{name}.qcow2")
    rng = random.Random(5)
    commands = []
    with Qcow2Image.open(str(images[1])) as img:
        for i in range(30):
            op = rng.choice("wwwzd")
            offset = rng.randrange(0, 3 * MIB // 512) * 512
            length = rng.choice((512, 1024, 16384, 16384 + 512, 40000 // 512 * 512))
            if op == "w":
                commands.append(f"write -P {i + 1} {offset} {length}")
                img.write(bytes([i + 1]) * length, offset)
            elif op == "z":
                commands.append(f"write -z {offset} {length}")
                img.write_zeroes(offset, length)
            else:
                offset -= offset % 16384
                commands.append(f"discard {offset} 16384")
                img.discard(offset, 16384)
    qemu_io(images[0], *commands)
    maps = [json.loads(run("qemu-img", "map", "--output=json", p)) for p in images]
    for m in maps:
        for e in m:
            if e["data"]:
                e["zero"] = False  # host-file sparseness (QEMU's zero copy-on-write)
    assert _merged(maps[1]) == _merged(maps[0])
    run("qemu-img", "compare", *images)
    assert_check_clean(images[1])
    if raw == "on":
        run("qemu-img", "compare", "-F", "raw", images[1], tmp_path / "v.data")


def _merged(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Map entries joined where they continue each other (host offsets included)."""
    out: list[dict[str, Any]] = []
    for e in entries:
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in ("depth", "present", "zero", "data"))
            both = ("offset" in last) == ("offset" in e)
            if (
                same
                and both
                and ("offset" not in e or last["offset"] + last["length"] == e["offset"])
            ):
                last["length"] += e["length"]
                continue
        out.append(dict(e))
    return out


def test_compressed_writes_and_snapshots_refused_as_qemu_refuses(tmp_path: Path) -> None:
    """On a real data-file image: vdisk's library refusals and `vdisk snapshot -c` say what
    qemu-io's `write -c` and `qemu-img snapshot -c` say."""
    from vdisk.errors import UnsupportedFeatureError

    image = _qemu_create(tmp_path)
    with Qcow2Image.open(str(image)) as img:
        for attempt in (lambda: img.write_compressed(bytes(65536), 0),
                        lambda: img.create_snapshot("s1")):  # fmt: skip
            with pytest.raises(UnsupportedFeatureError) as refused:
                attempt()
            assert (refused.value.message, refused.value.errno) == ("Operation not supported", 95)
    theirs = subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(image)],
                            capture_output=True, text=True)  # fmt: skip
    ours = subprocess.run([sys.executable, "-m", "vdisk", "snapshot", "-c", "s1", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert (ours.returncode, ours.stderr.replace("vdisk:", "qemu-img:")) == (
        theirs.returncode,
        theirs.stderr,
    )
    assert_check_clean(image)
