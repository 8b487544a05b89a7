"""Legacy qcow2 AES encryption (crypt_method 1): AES-128-CBC, the key from the passphrase's
bytes, the IV from the GUEST sector. qemu-img 7.2 still creates it (encrypt.format=aes), so
it is the oracle both ways."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest

import vdisk
from oracles import needs_qemu
from vdisk.errors import VdiskError
from vdisk.qcow2 import Qcow2Image
from vdisk.qcow2 import encryption as enc
from vdisk.qcow2 import format as fmt

PW = "legacy-pass"
MiB = 1 << 20


def _secret(pw: str = PW) -> list[str]:
    return ["--object", f"secret,id=s0,data={pw}"]


def _opts(path: Path) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def _read_all(path: Path, pw: str = PW) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", enc.InsecureEncryptionWarning)
        with Qcow2Image.open(str(path), readonly=True, passphrase=pw) as img:
            buf = bytearray(img.size)
            img.readinto(buf, 0)
    return bytes(buf)


@needs_qemu
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_created_aes_reads_identically(tmp_path: Path, compat: str) -> None:
    img = tmp_path / "a.qcow2"
    opts = f"encrypt.format=aes,encrypt.key-secret=s0,compat={compat}"
    proc = _run("qemu-img", "create", "-q", "-f", "qcow2", *_secret(), "-o", opts, img, "4M")
    assert proc.returncode == 0, proc.stderr
    proc = _run(
        "qemu-io", *_secret(), "--image-opts", _opts(img),
        "-c", "write -P 0x5a 1000 70000", "-c", "write -P 0x33 2M 64k",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "a.raw"
    proc = _run("qemu-img", "convert", *_secret(), "--image-opts", _opts(img), "-O", "raw", raw)
    assert proc.returncode == 0, proc.stderr
    assert _read_all(img) == raw.read_bytes()


@needs_qemu
def test_vdisk_written_aes_opens_in_qemu(tmp_path: Path) -> None:
    img = tmp_path / "v.qcow2"
    with pytest.warns(enc.InsecureEncryptionWarning):
        enc._warned_legacy = False
        vdisk.create(str(img), 4 * MiB, encrypt_format="aes", passphrase=PW)
    assert fmt.Header.decode(img.read_bytes()[:4096]).crypt_method == fmt.CRYPT_AES
    expect = bytearray(4 * MiB)
    with Qcow2Image.open(str(img), passphrase=PW) as dev:
        for off, data in ((1000, os.urandom(70000)), (MiB + 3, b"\x42" * 100_000)):
            dev.write(data, off)
            expect[off : off + len(data)] = data
    raw = tmp_path / "v.raw"
    proc = _run("qemu-img", "convert", *_secret(), "--image-opts", _opts(img), "-O", "raw", raw)
    assert proc.returncode == 0, proc.stderr
    assert raw.read_bytes() == bytes(expect)
    proc = _run("qemu-img", "check", *_secret(), "--image-opts", _opts(img))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _read_all(img) == bytes(expect)


def test_legacy_aes_warns_once(tmp_path: Path) -> None:
    img = tmp_path / "w.qcow2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vdisk.create(str(img), MiB, encrypt_format="aes", passphrase=PW)
    enc._warned_legacy = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Qcow2Image.open(str(img), passphrase=PW).close()
        Qcow2Image.open(str(img), passphrase=PW).close()
    messages = [str(w.message) for w in caught if w.category is enc.InsecureEncryptionWarning]
    assert len(messages) == 1 and "insecure and deprecated" in messages[0]


def test_legacy_aes_needs_a_passphrase(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vdisk.create(str(img), MiB, encrypt_format="aes", passphrase=PW)
    with pytest.raises(VdiskError, match="is encrypted: a passphrase is needed"):
        vdisk.open(str(img))
