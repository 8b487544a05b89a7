"""Encrypted images through the CLI, beside qemu-img: ``--object secret``, ``-o encrypt.*``,
``--image-opts`` / ``--target-image-opts``, info without a passphrase."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_io

from oracles import run_qemu_luks
from vdisk.cli.options import parse_object
from vdisk.errors import RequestError

SECRET = ["--object", "secret,id=s0,data=hunter2"]
LUKS_OPTS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"


def qemu_img(args: list[str], cwd: Path) -> Run:
    proc = run_qemu_luks(["qemu-img", *args], cwd)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def _opts(name: str, secret: str = "s0") -> str:
    return f"driver=qcow2,file.filename={name},encrypt.key-secret={secret}"


def test_create_formatting_line_and_info_match_qemu(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    ours = vdisk_cli(
        ["create", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "v.qcow2", "16M"], tmp_path
    )
    theirs = qemu_img(
        ["create", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "q.qcow2", "16M"], tmp_path
    )
    assert ours.rc == theirs.rc == 0, ours.err
    assert ours.out.replace("v.qcow2", "q.qcow2") == theirs.out
    assert (tmp_path / "v.qcow2").stat().st_size == (tmp_path / "q.qcow2").stat().st_size
    for output in ("human", "json"):
        mine = vdisk_cli(["info", f"--output={output}", "q.qcow2"], tmp_path)
        qemu = qemu_img(["info", f"--output={output}", "q.qcow2"], tmp_path)
        assert mine.rc == 0, mine.err
        assert mine.out == qemu.out
    info = json.loads(vdisk_cli(["info", "--output=json", "v.qcow2"], tmp_path).out)
    enc = info["format-specific"]["data"]["encrypt"]
    assert (enc["cipher-alg"], enc["cipher-mode"], enc["ivgen-alg"], enc["hash-alg"]) == (
        "aes-256", "xts", "plain64", "sha256",
    )  # fmt: skip
    assert enc["slots"][0]["active"] and enc["slots"][0]["stripes"] == 4000
    text = json.dumps(info)
    assert "key-material" not in text and "salt" not in text


def test_create_needs_the_secret(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    run = vdisk_cli(
        ["create", "-f", "qcow2", "-o", "encrypt.format=luks", "x.qcow2", "1M"], tmp_path
    )
    assert run.rc == 1
    assert "Parameter 'encrypt.key-secret' is required for cipher" in run.err
    run = vdisk_cli(["create", "-f", "qcow2", "-o", LUKS_OPTS, "x.qcow2", "1M"], tmp_path)
    assert run.rc == 1 and "No secret with id 's0' found" in run.err


def test_image_opts_on_reading_commands(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    made = qemu_img(
        ["create", "-q", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "q.qcow2", "4M"], tmp_path
    )
    assert made.rc == 0, made.err
    qemu_io([*SECRET, "--image-opts", _opts("q.qcow2"), "-c", "write -P 0x61 4k 100k"], tmp_path)
    raw = tmp_path / "expect.raw"
    data = bytearray(4 << 20)
    data[4096 : 4096 + 102400] = b"a" * 102400
    raw.write_bytes(data)
    io = ["--image-opts", _opts("q.qcow2")]
    run = vdisk_cli(["convert", *SECRET, *io, "-O", "raw", "out.raw"], tmp_path)
    assert run.rc == 0, run.err
    assert (tmp_path / "out.raw").read_bytes() == bytes(data)
    run = vdisk_cli(["compare", *SECRET, *io, "driver=raw,file.filename=expect.raw"], tmp_path)
    assert run.rc == 0, run.out + run.err
    run = vdisk_cli(["check", *SECRET, *io], tmp_path)
    assert run.rc == 0 and "No errors were found" in run.out
    run = vdisk_cli(["map", "--output=json", *SECRET, *io], tmp_path)
    assert run.rc == 0, run.err
    run = vdisk_cli(["compare", *SECRET, *io, "-f", "raw", "expect.raw"], tmp_path)
    assert run.rc == 1 and "mutually exclusive" in run.err
    wrong = ["--object", "secret,id=s0,data=nope"]
    run = vdisk_cli(["convert", *wrong, *io, "-O", "raw", "bad.raw"], tmp_path)
    assert run.rc == 1 and "Invalid password, cannot unlock any keyslot" in run.err
    run = vdisk_cli(["convert", "-O", "raw", "q.qcow2", "none.raw"], tmp_path)
    assert run.rc == 1 and "is encrypted: a passphrase is needed" in run.err
    assert "Traceback" not in run.err


def test_convert_to_luks_and_back(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    run = vdisk_cli(
        ["convert", *SECRET, "-O", "qcow2", "-o", LUKS_OPTS, "src.raw", "e.qcow2"], tmp_path
    )
    assert run.rc == 0, run.err
    theirs = qemu_img(["compare", *SECRET, "--image-opts", _opts("e.qcow2"), "driver=raw,file.filename=src.raw"], tmp_path)  # fmt: skip
    assert theirs.rc == 0, theirs.out + theirs.err
    assert qemu_img(["check", *SECRET, "--image-opts", _opts("e.qcow2")], tmp_path).rc == 0
    # --target-image-opts into an existing encrypted image (-n)
    made = qemu_img(
        ["create", "-q", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "t.qcow2", "4M"], tmp_path
    )
    assert made.rc == 0, made.err
    run = vdisk_cli(["convert", *SECRET, "-n", "--target-image-opts", "-f", "raw", "src.raw", _opts("t.qcow2")], tmp_path)  # fmt: skip
    assert run.rc == 0, run.err
    theirs = qemu_img(["compare", *SECRET, "--image-opts", _opts("t.qcow2"), "driver=raw,file.filename=src.raw"], tmp_path)  # fmt: skip
    assert theirs.rc == 0, theirs.out + theirs.err


def test_legacy_aes_through_the_cli(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = vdisk_cli(["create", "-f", "qcow2", *SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0", "a.qcow2", "1M"], tmp_path)  # fmt: skip
    assert run.rc == 0, run.err
    theirs = qemu_img(["create", "-f", "qcow2", *SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0", "b.qcow2", "1M"], tmp_path)  # fmt: skip
    assert run.out.replace("a.qcow2", "b.qcow2") == theirs.out

    def lines(text: str) -> list[str]:  # disk size: qemu-img allocates its zeros, vdisk not
        return [line for line in text.splitlines() if not line.startswith("disk size")]

    mine = vdisk_cli(["info", "a.qcow2"], tmp_path).out.replace("a.qcow2", "b.qcow2")
    assert lines(mine) == lines(qemu_img(["info", "b.qcow2"], tmp_path).out)
    assert "encrypted: yes" in mine and "format: aes" in mine


def test_secret_objects(tmp_path: Path) -> None:
    assert parse_object("secret,id=a,data=xyz") == ("a", b"xyz")
    encoded = base64.b64encode(b"\x00\xffpw").decode()
    assert parse_object(f"secret,id=b,data={encoded},format=base64") == ("b", b"\x00\xffpw")
    key = tmp_path / "key"
    key.write_bytes(b"from-file")
    assert parse_object(f"secret,id=c,file={key}") == ("c", b"from-file")
    for bad in (
        "memory-backend-ram,id=m",
        "secret,data=x",
        "secret,id=d",
        f"secret,id=e,data=x,file={key}",
        "secret,id=f,data=!!,format=base64",
        "secret,id=g,data=x,format=hex",
        "secret,id=h,file=/nonexistent/key",
    ):
        with pytest.raises(RequestError):
            parse_object(bad)


@pytest.mark.parametrize(
    "opts",
    [
        "encrypt.format=luks,encrypt.key-secret=s0",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc",
        "encrypt.format=aes,encrypt.key-secret=s0",
    ],
)
def test_measure_counts_the_luks_header(vdisk_cli: VdiskRunner, tmp_path: Path, opts: str) -> None:
    args = ["measure", *SECRET, "-O", "qcow2", "--size", "1G", "-o", opts]
    ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
    assert theirs.rc == 0, theirs.err
    assert (ours.rc, ours.out) == (0, theirs.out)


def test_map_hides_host_offsets_as_qemu(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    made = qemu_img(
        ["create", "-q", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "m.qcow2", "4M"], tmp_path
    )
    assert made.rc == 0, made.err
    qemu_io([*SECRET, "--image-opts", _opts("m.qcow2"), "-c", "write -P 1 64k 128k", "-c", "write -z 1M 64k"], tmp_path)  # fmt: skip
    args = ["map", "--output=json", *SECRET, "--image-opts", _opts("m.qcow2")]
    ours, theirs = vdisk_cli(args, tmp_path), qemu_img(args, tmp_path)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out)
    assert '"offset"' not in ours.out
    human = vdisk_cli(["map", *SECRET, "--image-opts", _opts("m.qcow2")], tmp_path)
    assert human.rc == 1 and "encrypted" in human.err


def _qemu_io_unlocks(name: str, passphrase: str, cwd: Path) -> bool:
    run = subprocess.run(
        ["qemu-io", "--object", f"secret,id=k,data={passphrase}", "--image-opts",
         _opts(name, "k"), "-c", "read -P 0x61 0 64k"],
        cwd=cwd, capture_output=True, text=True,
    )  # fmt: skip
    return run.returncode == 0 and "Pattern verification failed" not in run.stdout


def test_amend_adds_and_erases_key_slots_as_qemu(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    """`vdisk amend -o encrypt.*` on a qemu-img LUKS image: the new passphrase unlocks it in
    qemu-io, the erased one no longer does, and the last active slot is not erased."""
    made = qemu_img(
        ["create", "-q", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "q.qcow2", "4M"], tmp_path
    )
    assert made.rc == 0, made.err
    qemu_io([*SECRET, "--image-opts", _opts("q.qcow2"), "-c", "write -P 0x61 0 64k"], tmp_path)
    both = [*SECRET, "--object", "secret,id=s1,data=second"]
    add = "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10"
    run = vdisk_cli(["amend", *both, "--image-opts", _opts("q.qcow2"), "-o", add], tmp_path)
    assert run.rc == 0, run.err
    assert _qemu_io_unlocks("q.qcow2", "second", tmp_path)
    assert _qemu_io_unlocks("q.qcow2", "hunter2", tmp_path)
    erase = "encrypt.state=inactive,encrypt.old-secret=s0"
    run = vdisk_cli(["amend", *both, "--image-opts", _opts("q.qcow2", "s1"), "-o", erase], tmp_path)
    assert run.rc == 0, run.err
    assert _qemu_io_unlocks("q.qcow2", "second", tmp_path)
    assert not _qemu_io_unlocks("q.qcow2", "hunter2", tmp_path)
    last = "encrypt.state=inactive,encrypt.old-secret=s1"
    run = vdisk_cli(["amend", *both, "--image-opts", _opts("q.qcow2", "s1"), "-o", last], tmp_path)
    assert run.rc == 1 and len(run.err.strip().splitlines()) == 1, run.err
    assert _qemu_io_unlocks("q.qcow2", "second", tmp_path)
    check = qemu_img(["check", *both, "--image-opts", _opts("q.qcow2", "s1")], tmp_path)
    assert check.rc == 0, check.out + check.err


def _luks_with_data(tmp_path: Path) -> bytes:
    """q.qcow2: a LUKS image qemu-io filled; returns its plaintext."""
    made = qemu_img(
        ["create", "-q", "-f", "qcow2", *SECRET, "-o", LUKS_OPTS, "q.qcow2", "1M"], tmp_path
    )
    assert made.rc == 0, made.err
    qemu_io([*SECRET, "--image-opts", _opts("q.qcow2"), "-c", "write -P 0x5a 64k 200k"], tmp_path)
    data = bytearray(1 << 20)
    data[65536 : 65536 + 204800] = b"\x5a" * 204800
    return bytes(data)


def test_dd_reads_luks_through_image_opts(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    data = _luks_with_data(tmp_path)
    run = vdisk_cli(["dd", *SECRET, "--image-opts", f"if={_opts('q.qcow2')}", "of=out.raw", "bs=64k"], tmp_path)  # fmt: skip
    assert run.rc == 0, run.err
    assert (tmp_path / "out.raw").read_bytes() == data
    run = vdisk_cli(["dd", "-f", "qcow2", *SECRET, "--image-opts", f"if={_opts('q.qcow2')}", "of=x.raw"], tmp_path)  # fmt: skip
    assert run.rc == 1 and "mutually exclusive" in run.err
    wrong = ["--object", "secret,id=s0,data=nope"]
    run = vdisk_cli(["dd", *wrong, "--image-opts", f"if={_opts('q.qcow2')}", "of=y.raw"], tmp_path)
    assert run.rc == 1 and "Invalid password, cannot unlock any keyslot" in run.err


def test_nbd_serves_luks_through_image_opts(tmp_path: Path) -> None:
    import shutil
    import sys
    import time

    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    data = _luks_with_data(tmp_path)
    (tmp_path / "plain.raw").write_bytes(data)
    sock = str(tmp_path / "e.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "vdisk", "nbd", "-t", *SECRET, "--image-opts", _opts("q.qcow2"), "-k", sock],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    uri = f"nbd+unix:///?socket={sock}"
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the NBD server did not start"
            time.sleep(0.05)
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
        assert size.stdout.strip() == str(1 << 20), size
        same = qemu_img(["compare", "-f", "raw", "-F", "raw", "plain.raw", uri], tmp_path)
        assert same.rc == 0, same
    finally:
        server.terminate()
        server.wait(20)


def test_ublk_add_takes_image_opts(
    vdisk_cli: VdiskRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Argument parsing only (no ublk device on the host): ``serve.run`` is replaced by one
    that opens the backend as ``add`` would and reads it, so the secret must reach the open."""
    from vdisk.ublk import serve

    data = _luks_with_data(tmp_path)
    read: list[bytes] = []

    def open_and_read(make: object, *args: object) -> int:
        assert callable(make)
        device = make()
        try:
            buf = bytearray(device.size)
            device.readinto(buf, 0)
            read.append(bytes(buf))
        finally:
            device.close()
        return 0

    def add(opener: object, kind: str, file: str, _: object, size: object, ro: bool) -> object:
        assert callable(opener)
        return opener(kind, file, size, ro)

    monkeypatch.setattr(serve, "run", open_and_read)
    monkeypatch.setattr(serve, "add", add)
    luks = [*SECRET, "--image-opts", "-f", _opts("q.qcow2")]
    run = vdisk_cli(["ublk", "add", "-t", "qcow2", *luks], tmp_path)
    assert run.rc == 0, run.err
    assert read == [data]
    run = vdisk_cli(["ublk", "add", "-t", "raw", *luks], tmp_path)
    assert run.rc == 1 and "does not match -t raw" in run.err
    run = vdisk_cli(["ublk", "add", "-t", "qcow2", "--image-opts", "-f", _opts("q.qcow2")], tmp_path)  # fmt: skip
    assert run.rc == 1 and "No secret with id 's0' found" in run.err
