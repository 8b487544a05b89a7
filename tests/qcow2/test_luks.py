"""LUKS-encrypted qcow2 (crypt_method 2): the codecs, and interop with qemu-img both ways.

Oracles: qemu-img create/convert/compare/check and qemu-io with ``--object secret`` and
``--image-opts``; the sector cipher is checked against cryptography's own XTS and CBC."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import vdisk
import vdisk.info
from oracles import needs_qemu, run_qemu_luks
from vdisk.crypto import CipherSpec, SectorCipher
from vdisk.errors import FormatError, VdiskError
from vdisk.qcow2 import Qcow2Image, luks
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.encryption import amend_encryption

PW = "correct horse"
MiB = 1 << 20

# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg or None, hash-alg)
SETTINGS = [
    ("aes-256", "xts", "plain64", None, "sha256"),
    ("aes-128", "xts", "plain64", None, "sha1"),
    ("aes-192", "xts", "plain", None, "sha512"),
    ("aes-256", "cbc", "essiv", "sha256", "sha256"),
    ("aes-128", "cbc", "essiv", "sha256", "sha1"),
    ("aes-256", "cbc", "plain64", None, "sha512"),
    ("aes-128", "cbc", "plain", None, "sha256"),
]


def _qemu_opts(setting: tuple[str, str, str, str | None, str]) -> str:
    alg, mode, ivgen, ivhash, hash_alg = setting
    opts = (
        f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg={alg},"
        f"encrypt.cipher-mode={mode},encrypt.ivgen-alg={ivgen},encrypt.hash-alg={hash_alg},"
        "encrypt.iter-time=10"
    )
    if ivhash:
        opts += f",encrypt.ivgen-hash-alg={ivhash}"
    return opts


def _secret(pw: str = PW, name: str = "s0") -> list[str]:
    return ["--object", f"secret,id={name},data={pw}"]


def _image_opts(path: Path, secret: str = "s0") -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret}"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    if cmd[0] == "vdisk":
        cmd[:1] = [sys.executable, "-m", "vdisk"]
    return run_qemu_luks(cmd)


def _qemu_io(path: Path, *commands: str, pw: str = PW) -> None:
    cmd: list[str | Path] = ["qemu-io", *_secret(pw), "--image-opts", _image_opts(path)]
    for c in commands:
        cmd += ["-c", c]
    proc = _run(*cmd)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def _qemu_raw(path: Path, raw: Path, pw: str = PW) -> bytes:
    proc = _run(
        "qemu-img", "convert", *_secret(pw), "--image-opts", _image_opts(path), "-O", "raw", raw
    )
    assert proc.returncode == 0, proc.stderr
    return raw.read_bytes()


def _qemu_check_clean(path: Path, pw: str = PW) -> None:
    proc = _run("qemu-img", "check", *_secret(pw), "--image-opts", _image_opts(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout, proc.stdout


def _vdisk_bytes(path: Path, pw: str | bytes = PW) -> bytes:
    with Qcow2Image.open(str(path), readonly=True, passphrase=pw) as img:
        buf = bytearray(img.size)
        img.readinto(buf, 0)
    return bytes(buf)


# -- codecs ----------------------------------------------------------------------------------
@pytest.fixture(params=["compiled", "numpy"])
def xts_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """XTS's tweak work through the compiled helper (xts.c) or the numpy fallback."""
    import shutil

    from vdisk import crypto

    if request.param == "numpy":
        monkeypatch.setattr(crypto, "_compiled_xts", lambda: None)
    elif crypto._compiled_xts() is None:
        if shutil.which(os.environ.get("CC", "cc")) is None:
            pytest.skip("this host has no C compiler to build vdisk/xts.c")
        pytest.fail("vdisk/xts.c did not build although a C compiler is installed")
    return str(request.param)


@pytest.mark.usefixtures("xts_path")
@pytest.mark.parametrize(
    "spec",
    [
        CipherSpec(256, "xts", "plain64"),
        CipherSpec(128, "xts", "plain"),
        CipherSpec(192, "cbc", "plain64"),
        CipherSpec(128, "cbc", "essiv", "sha256"),
        CipherSpec(256, "cbc", "plain"),
    ],
)
def test_sector_cipher_matches_per_sector_reference(spec: CipherSpec) -> None:
    key = os.urandom(spec.key_len)
    data = os.urandom(512 * 6)
    first = (1 << 32) - 3  # crosses the 32-bit wrap of the plain IV
    ours = SectorCipher(spec, key).encrypt(data, first)
    expect = b""
    for i in range(6):
        n = first + i
        iv = (n & 0xFFFFFFFF if spec.ivgen == "plain" else n).to_bytes(16, "little")
        if spec.ivgen == "essiv":
            ekey = hashlib.sha256(key).digest()
            iv = Cipher(algorithms.AES(ekey), modes.ECB()).encryptor().update(iv)
        mode = modes.XTS(iv) if spec.mode == "xts" else modes.CBC(iv)
        enc = Cipher(algorithms.AES(key), mode).encryptor()
        expect += enc.update(data[i * 512 : (i + 1) * 512]) + enc.finalize()
    assert bytes(ours) == expect
    back = bytearray(ours)
    SectorCipher(spec, key).decrypt(back, first)
    assert bytes(back) == data


@pytest.mark.usefixtures("xts_path")
def test_xts_batches_and_threads_match_per_sector_reference() -> None:
    """A request longer than one XTS batch (and not a multiple of it), en/decrypted by two
    threads at once with one SectorCipher, equals cryptography's XTS sector by sector."""
    spec = CipherSpec(256, "xts", "plain64")
    key = os.urandom(spec.key_len)
    cipher = SectorCipher(spec, key)
    sectors = 1100  # two whole batches of 512 and a part
    data = [os.urandom(512 * sectors) for _ in range(2)]
    firsts = [7, (1 << 40) + 5]
    out: list[bytes] = [b"", b""]

    def run(i: int) -> None:
        ct = bytes(cipher.encrypt(data[i], firsts[i]))
        back = bytearray(ct)
        cipher.decrypt(back, firsts[i])
        assert bytes(back) == data[i]
        out[i] = ct

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        expect = bytearray()
        for n in range(sectors):
            iv = (firsts[i] + n).to_bytes(16, "little")
            enc = Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor()
            expect += enc.update(data[i][n * 512 : (n + 1) * 512]) + enc.finalize()
        assert out[i] == bytes(expect)


def test_af_split_merge_round_trip() -> None:
    key = os.urandom(32)
    split = luks.af_split(key, luks.STRIPES, "sha256")
    assert len(split) == 32 * luks.STRIPES
    assert luks.af_merge(split, 32, luks.STRIPES, "sha256") == key
    damaged = bytearray(split)
    damaged[100] ^= 1
    assert luks.af_merge(bytes(damaged), 32, luks.STRIPES, "sha256") != key


def test_new_header_unlocks_and_encodes_round_trip() -> None:
    header, area, master_key = luks.new_header(CipherSpec(), "sha256", b"pw", 10)
    assert luks.LuksHeader.decode(area[: luks.HEADER_SIZE]) == header
    assert header.header_len == 2068480  # QEMU's payload offset for aes-256-xts
    assert luks.unlock(header, area, b"pw") == master_key
    with pytest.raises(luks.UnlockError, match="Invalid password, cannot unlock any keyslot"):
        luks.unlock(header, area, b"wrong")


def _hostile(area: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(area[: luks.HEADER_SIZE])
    out[offset : offset + len(value)] = value
    return bytes(out)


def test_hostile_headers_fail_cleanly() -> None:
    _header, area, _mk = luks.new_header(CipherSpec(), "sha256", b"pw", 10)
    slot0 = 208
    cases = {
        "bad magic": _hostile(area, 0, b"XXXX"),
        "version": _hostile(area, 6, struct.pack(">H", 2)),
        "cipher": _hostile(area, 8, b"twofish\0"),
        "mode": _hostile(area, 40, b"ecb\0"),
        "hash": _hostile(area, 72, b"md5\0\0\0"),
        "key bytes": _hostile(area, 108, struct.pack(">I", 7)),
        "absurd digest iterations": _hostile(area, 164, struct.pack(">I", 0xFFFFFFFF)),
        "absurd slot iterations": _hostile(area, slot0 + 4, struct.pack(">I", 0xFFFFFFFF)),
        "zero iterations": _hostile(area, slot0 + 4, struct.pack(">I", 0)),
        "stripes": _hostile(area, slot0 + 44, struct.pack(">I", 1 << 31)),
        "slot state": _hostile(area, slot0, struct.pack(">I", 7)),
        "material over payload": _hostile(area, slot0 + 40, struct.pack(">I", 0xFFFFFF00)),
        "material in header": _hostile(area, slot0 + 40, struct.pack(">I", 1)),
        "overlapping slots": _hostile(area, slot0 + 48 + 40, struct.pack(">I", 9)),
    }
    for name, data in cases.items():
        with pytest.raises(FormatError):
            luks.LuksHeader.decode(data)
            pytest.fail(name)
    with pytest.raises(FormatError, match="need 592"):
        luks.LuksHeader.decode(area[:100])


# -- qemu-img makes, vdisk reads --------------------------------------------------------------
@needs_qemu
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(x for x in s if x))
def test_qemu_created_images_read_identically(
    tmp_path: Path, setting: tuple[str, str, str, str | None, str]
) -> None:
    img = tmp_path / "q.qcow2"
    proc = _run("qemu-img", "create", "-q", "-f", "qcow2", *_secret(), "-o", _qemu_opts(setting), img, "4M")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _qemu_io(img, "write -P 0x5a 1000 70000", "write -P 0x33 2M 64k", "write -z 2M 4k")
    expect = _qemu_raw(img, tmp_path / "q.raw")
    assert _vdisk_bytes(img) == expect
    # info without a passphrase agrees with qemu-img's
    ours = _run("vdisk", "info", "--output=json", img).stdout
    theirs = _run("qemu-img", "info", "--output=json", img).stdout
    assert ours == theirs


# -- vdisk makes and writes, qemu-img reads -----------------------------------------------------
def _write_pattern(path: Path, pw: str = PW) -> bytes:
    """Unaligned writes, copy-on-write, zeroes and discard through vdisk; the expected data."""
    expect = bytearray(4 * MiB)
    with Qcow2Image.open(str(path), passphrase=pw) as img:
        for off, data in (
            (1000, b"\x5a" * 70000),
            (70001, b"\x77" * 3000),
            (MiB + 7, os.urandom(200_000)),
            (3 * MiB, b"\x11" * 65536),
        ):
            img.write(data, off)
            expect[off : off + len(data)] = data
        img.write_zeroes(MiB, 4096)
        expect[MiB : MiB + 4096] = bytes(4096)
        img.discard(3 * MiB, 65536)
        expect[3 * MiB : 3 * MiB + 65536] = bytes(65536)
    return bytes(expect)


@needs_qemu
@pytest.mark.parametrize("setting", SETTINGS[:4], ids=lambda s: "-".join(x for x in s if x))
def test_vdisk_created_images_open_in_qemu(
    tmp_path: Path, setting: tuple[str, str, str, str | None, str]
) -> None:
    alg, mode, ivgen, ivhash, hash_alg = setting
    img = tmp_path / "v.qcow2"
    vdisk.create(
        str(img), 4 * MiB, encrypt_format="luks", passphrase=PW, cipher_alg=alg,
        cipher_mode=mode, ivgen_alg=ivgen, ivgen_hash_alg=ivhash, hash_alg=hash_alg,
        iter_time=10,
    )  # fmt: skip
    expect = _write_pattern(img)
    assert _vdisk_bytes(img) == expect
    assert _qemu_raw(img, tmp_path / "v.raw") == expect
    _qemu_check_clean(img)
    ours = vdisk.info.image_info(str(img))["format-specific"]["data"]["encrypt"]
    assert (ours["cipher-alg"], ours["cipher-mode"], ours["ivgen-alg"]) == (alg, mode, ivgen)


@needs_qemu
def test_default_layout_matches_qemu(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "v.qcow2", tmp_path / "q.qcow2"
    vdisk.create(str(ours), 64 * MiB, encrypt_format="luks", passphrase=PW, iter_time=10)
    proc = _run("qemu-img", "create", "-q", "-f", "qcow2", *_secret(), "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", theirs, "64M")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ours.stat().st_size == theirs.stat().st_size
    h_ours = fmt.Header.decode(ours.read_bytes()[:65536])
    h_theirs = fmt.Header.decode(theirs.read_bytes()[:65536])
    assert h_ours.crypto == h_theirs.crypto
    assert [e.type for e in h_ours.extensions] == [e.type for e in h_theirs.extensions]


@needs_qemu
def test_aes_192_cbc_qemu_aborts_vdisk_handles(tmp_path: Path) -> None:
    """qemu-img 7.2 asserts on aes-192-cbc (24 * 4000 bytes of key material is not a whole
    number of sectors); vdisk pads the last sector, as cryptsetup does."""
    setting = ("aes-192", "cbc", "plain64", None, "sha256")
    proc = _run("qemu-img", "create", "-q", "-f", "qcow2", *_secret(), "-o", _qemu_opts(setting), tmp_path / "q.qcow2", "4M")  # fmt: skip
    assert proc.returncode != 0
    img = tmp_path / "v.qcow2"
    vdisk.create(str(img), 4 * MiB, encrypt_format="luks", passphrase=PW, cipher_alg="aes-192", cipher_mode="cbc", iter_time=10)  # fmt: skip
    expect = _write_pattern(img)
    assert _vdisk_bytes(img) == expect
    assert _run("vdisk", "check", img).returncode == 0


# -- passphrases and damage -----------------------------------------------------------------------
@pytest.fixture
def luks_image(tmp_path: Path) -> Path:
    img = tmp_path / "e.qcow2"
    vdisk.create(str(img), 4 * MiB, encrypt_format="luks", passphrase=PW, iter_time=10)
    return img


def test_missing_and_wrong_passphrase(luks_image: Path) -> None:
    with pytest.raises(VdiskError, match="is encrypted: a passphrase is needed") as exc:
        vdisk.open(str(luks_image))
    assert str(luks_image) in str(exc.value)
    with pytest.raises(VdiskError, match="Invalid password, cannot unlock any keyslot"):
        vdisk.open(str(luks_image), passphrase="nope")
    with vdisk.open(str(luks_image), passphrase=PW.encode()) as dev:
        assert dev.size == 4 * MiB


def test_info_open_refuses_data_without_key(luks_image: Path) -> None:
    with (
        Qcow2Image.open(str(luks_image), readonly=True, unlock=False) as img,
        pytest.raises(VdiskError, match="passphrase is needed"),
    ):
        img.readinto(bytearray(512), 0)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _luks_offset(path: Path) -> int:
    crypto = fmt.Header.decode(path.read_bytes()[:65536]).crypto
    assert crypto is not None
    return crypto.offset


def test_tampered_digest_does_not_unlock(luks_image: Path) -> None:
    _patch(luks_image, _luks_offset(luks_image) + 112, b"\0" * 20)
    with pytest.raises(VdiskError, match="Invalid password"):
        vdisk.open(str(luks_image), passphrase=PW)


def test_tampered_header_and_absurd_iterations_fail_fast(luks_image: Path) -> None:
    base = _luks_offset(luks_image)
    _patch(luks_image, base + 208 + 4, struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(FormatError, match="PBKDF2 iterations exceed"):
        vdisk.open(str(luks_image), passphrase=PW)
    _patch(luks_image, base, b"NOTLUKS")
    with pytest.raises(FormatError, match="bad magic"):
        vdisk.open(str(luks_image), passphrase=PW)


def test_key_material_past_the_area_end(luks_image: Path) -> None:
    base = _luks_offset(luks_image)
    # payload offset and slot 0's material pushed past the area the extension reserves
    _patch(luks_image, base + 104, struct.pack(">I", 0x100000))
    _patch(luks_image, base + 208 + 40, struct.pack(">I", 0xF0000))
    with pytest.raises(FormatError, match="runs past the end"):
        vdisk.open(str(luks_image), passphrase=PW)


def test_crypto_area_past_eof(luks_image: Path) -> None:
    raw = luks_image.read_bytes()
    header = fmt.Header.decode(raw[:65536])
    header.set_extension(fmt.EXT_CRYPTO, fmt.CryptoExtension(1 << 40, 2068480).encode())
    _patch(luks_image, 0, header.encode())
    with pytest.raises(VdiskError):
        vdisk.open(str(luks_image), passphrase=PW)


# -- key slots ---------------------------------------------------------------------------------------
@needs_qemu
def test_add_and_erase_slots_as_qemu(luks_image: Path, tmp_path: Path) -> None:
    secrets = {"new": b"second", "old": PW.encode()}
    with Qcow2Image.open(str(luks_image), passphrase=PW) as img:
        amend_encryption(
            img, {"encrypt.state": "active", "encrypt.new-secret": "new", "encrypt.iter-time": 10},
            secrets,
        )  # fmt: skip
    # the new passphrase unlocks in qemu and in vdisk; the old still does
    assert _run("qemu-img", "check", *_secret("second"), "--image-opts", _image_opts(luks_image)).returncode == 0  # fmt: skip
    vdisk.open(str(luks_image), passphrase="second").close()
    with Qcow2Image.open(str(luks_image), passphrase="second") as img:
        amend_encryption(img, {"encrypt.state": "inactive", "encrypt.old-secret": "old"}, secrets)
        with pytest.raises(VdiskError, match="only active keyslot"):
            amend_encryption(img, {"encrypt.state": "inactive", "encrypt.keyslot": "1"}, secrets)
    with pytest.raises(VdiskError, match="Invalid password"):
        vdisk.open(str(luks_image), passphrase=PW)
    proc = _run("qemu-img", "check", *_secret(PW), "--image-opts", _image_opts(luks_image))
    assert proc.returncode != 0 and "Invalid password" in proc.stderr
    info = vdisk.info.image_info(str(luks_image))["format-specific"]["data"]["encrypt"]
    assert [s["active"] for s in info["slots"]] == [False, True] + [False] * 6
    assert info == _qemu_info_encrypt(luks_image)


def _qemu_info_encrypt(path: Path) -> dict[str, object]:
    import json

    out = json.loads(_run("qemu-img", "info", "--output=json", path).stdout)
    return dict(out["format-specific"]["data"]["encrypt"])


@needs_qemu
def test_qemu_added_slot_unlocks_in_vdisk(luks_image: Path) -> None:
    proc = _run(
        "qemu-img", "amend", *_secret(PW), *_secret("other", "s1"), "--image-opts",
        _image_opts(luks_image), "-o",
        "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=3,encrypt.iter-time=10",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    vdisk.open(str(luks_image), passphrase="other").close()


def test_vdisk_check_counts_the_luks_area(luks_image: Path) -> None:
    _write_pattern(luks_image)
    proc = _run("vdisk", "check", luks_image)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout
