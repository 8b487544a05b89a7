"""Sector ciphers: AES in XTS or CBC mode, 512-byte sectors, with the plain, plain64 and essiv
IV generators (as dm-crypt, LUKS and QEMU number them). Pure: bytes in, bytes out, no I/O.

A request is en/decrypted in one batch: the IVs of all its sectors are made at once, and the
AES work is one ECB pass over the whole buffer (XTS: the tweaks are XORed in around it; CBC
decryption: the previous ciphertext block is XORed in after it). CBC encryption is chained
inside a sector, so it runs one ECB pass per block position over all sectors together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from typing_extensions import Buffer

from .errors import FormatError

SECTOR_SIZE = 512
BLOCKS_PER_SECTOR = SECTOR_SIZE // 16
CIPHER_MODES = ("xts", "cbc")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("sha1", "sha224", "sha256", "sha384", "sha512")
AES_KEY_BITS = (128, 192, 256)
# XTS's GF(2^128): x^128 = x^7 + x^2 + x + 1.
_BLOCK_INDEX = np.arange(BLOCKS_PER_SECTOR, dtype="<u8")
_ONE_LESS_BLOCK_INDEX = np.uint64(63) - _BLOCK_INDEX
_ONE, _TWO, _SEVEN = np.uint64(1), np.uint64(2), np.uint64(7)


@dataclass(frozen=True)
class CipherSpec:
    """One sector cipher setting: aes-<key_bits>-<mode>-<ivgen>[:<ivgen_hash>]."""

    key_bits: int = 256
    mode: str = "xts"
    ivgen: str = "plain64"
    ivgen_hash: str | None = None

    def __post_init__(self) -> None:
        if self.key_bits not in AES_KEY_BITS:
            raise FormatError(f"cipher aes-{self.key_bits}: AES keys are 128, 192 or 256 bits")
        if self.mode not in CIPHER_MODES:
            raise FormatError(f"cipher mode {self.mode!r}: expected xts or cbc")
        if self.ivgen not in IVGEN_ALGS:
            raise FormatError(f"IV generator {self.ivgen!r}: expected plain, plain64 or essiv")
        if self.ivgen == "essiv":
            if self.ivgen_hash not in HASH_ALGS:
                raise FormatError(f"essiv hash {self.ivgen_hash!r}: expected one of {HASH_ALGS}")
            if _essiv_key_len(self.ivgen_hash) is None:
                raise FormatError(f"essiv hash {self.ivgen_hash!r}: no AES key of its length")
        elif self.ivgen_hash is not None:
            raise FormatError(f"IV generator {self.ivgen}: takes no hash")

    @property
    def key_len(self) -> int:
        """The master key's length in bytes (XTS takes two AES keys)."""
        return self.key_bits // 8 * (2 if self.mode == "xts" else 1)

    @property
    def alg(self) -> str:
        return f"aes-{self.key_bits}"

    @property
    def luks_mode(self) -> str:
        """The LUKS cipher_mode string: 'xts-plain64', 'cbc-essiv:sha256'."""
        iv = f"essiv:{self.ivgen_hash}" if self.ivgen == "essiv" else self.ivgen
        return f"{self.mode}-{iv}"

    @classmethod
    def from_luks(cls, cipher_name: str, cipher_mode: str, key_bytes: int) -> CipherSpec:
        """From a LUKS header's cipher name, mode string and key length."""
        if cipher_name != "aes":
            raise FormatError(f"LUKS cipher {cipher_name!r} is not supported (only aes)")
        mode, _, ivspec = cipher_mode.partition("-")
        ivgen, _, ivhash = ivspec.partition(":")
        if mode not in CIPHER_MODES:
            raise FormatError(f"LUKS cipher mode {cipher_mode!r} is not supported")
        if key_bytes not in (16, 24, 32, 48, 64):
            raise FormatError(f"LUKS key length {key_bytes} is not an AES key length")
        bits = key_bytes * 8 // (2 if mode == "xts" else 1)
        if bits not in AES_KEY_BITS:
            raise FormatError(f"LUKS key length {key_bytes} does not fit {mode}")
        return cls(bits, mode, ivgen, ivhash or None)


def _essiv_key_len(hash_alg: str) -> int | None:
    n = hashlib.new(hash_alg).digest_size
    return n if n in (16, 24, 32) else None


def _ecb(key: bytes, encrypt: bool):  # type: ignore[no-untyped-def]
    # cryptography loads on first use, so that parsing options or info stays light.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    cipher = Cipher(algorithms.AES(key), modes.ECB())
    return cipher.encryptor() if encrypt else cipher.decryptor()


class SectorCipher:
    """Encrypts and decrypts whole 512-byte sectors numbered from ``sector``. Thread-safe:
    each call makes its own cipher contexts (one per call, never one per sector)."""

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        if len(key) != spec.key_len:
            raise FormatError(
                f"{spec.alg}-{spec.mode}: key is {len(key)} bytes, need {spec.key_len}"
            )
        self.spec = spec
        half = spec.key_bits // 8
        self._data_key = key[:half]
        self._tweak_key = key[half:] if spec.mode == "xts" else b""
        self._essiv_key = b""
        if spec.ivgen == "essiv":
            assert spec.ivgen_hash is not None
            self._essiv_key = hashlib.new(spec.ivgen_hash, key).digest()

    # -- IVs ---------------------------------------------------------------------------
    def _ivs(self, sector: int, count: int) -> np.ndarray:
        """(count, 16) uint8: the IV of each sector."""
        numbers = np.arange(sector, sector + count, dtype="<u8")
        ivs = np.zeros((count, 2), dtype="<u8")
        if self.spec.ivgen == "plain":
            ivs[:, 0] = numbers & np.uint64(0xFFFFFFFF)
        else:
            ivs[:, 0] = numbers
        raw = ivs.view(np.uint8).reshape(count, 16)
        if self.spec.ivgen == "essiv":
            enc = _ecb(self._essiv_key, True)
            raw = np.frombuffer(enc.update(_as_bytes(raw)), dtype=np.uint8).reshape(count, 16)
        return raw

    def _xts_tweaks(self, sector: int, count: int) -> np.ndarray:
        """(count, 32, 2) little-endian uint64: the tweak of every block of every sector."""
        first = _ecb(self._tweak_key, True).update(_as_bytes(self._ivs(sector, count)))
        t0 = np.frombuffer(first, dtype="<u8").reshape(count, 2, 1)
        lo, hi = t0[:, 0], t0[:, 1]
        # Block j's tweak is t0 * x^j: shift left by j and fold the j bits shifted out of
        # the top back in times x^7 + x^2 + x + 1 (j < 32, so the fold cannot overflow).
        j = _BLOCK_INDEX
        back = _ONE_LESS_BLOCK_INDEX  # 63 - j: two shifts, as a shift by 64 is undefined
        t = np.empty((count, BLOCKS_PER_SECTOR, 2), dtype="<u8")
        new_lo, new_hi = t[:, :, 0], t[:, :, 1]
        out_bits = np.right_shift(hi >> _ONE, back)
        np.left_shift(hi, j, out=new_hi)
        new_hi |= np.right_shift(lo >> _ONE, back)
        np.left_shift(lo, j, out=new_lo)
        scratch = np.empty_like(out_bits)
        new_lo ^= out_bits
        new_lo ^= np.left_shift(out_bits, _ONE, out=scratch)
        new_lo ^= np.left_shift(out_bits, _TWO, out=scratch)
        new_lo ^= np.left_shift(out_bits, _SEVEN, out=scratch)
        return t

    # -- en/decryption -----------------------------------------------------------------
    def decrypt(self, buf: Buffer, sector: int) -> None:
        """Decrypt ``buf`` (writable, a whole number of sectors) in place."""
        view = memoryview(buf).cast("B")
        count = _sectors(len(view))
        if not count:
            return
        data = np.frombuffer(view, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        dec = _ecb(self._data_key, False)
        if self.spec.mode == "xts":
            t = self._xts_tweaks(sector, count)
            data ^= t
            y = np.frombuffer(dec.update(view), dtype="<u8").reshape(data.shape)
            np.bitwise_xor(y, t, out=data)
            return
        prev = np.empty_like(data)
        prev[:, 0] = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(
            count, 2
        )
        prev[:, 1:] = data[:, :-1]
        y = np.frombuffer(dec.update(view), dtype="<u8").reshape(data.shape)
        np.bitwise_xor(y, prev, out=data)

    def encrypt(self, buf: Buffer, sector: int) -> memoryview:
        """The ciphertext of ``buf`` (a whole number of sectors), in a new buffer."""
        view = memoryview(buf).cast("B")
        count = _sectors(len(view))
        data = np.frombuffer(view, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        dst = np.empty_like(data)
        out = dst.data.cast("B")
        if not count:
            return out
        enc = _ecb(self._data_key, True)
        if self.spec.mode == "xts":
            t = self._xts_tweaks(sector, count)
            np.bitwise_xor(data, t, out=dst)
            y = np.frombuffer(enc.update(out), dtype="<u8").reshape(data.shape)
            np.bitwise_xor(y, t, out=dst)
            return out
        prev = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(count, 2)
        for j in range(BLOCKS_PER_SECTOR):
            c = np.frombuffer(enc.update(_as_bytes(data[:, j] ^ prev)), dtype="<u8")
            prev = c.reshape(count, 2)
            dst[:, j] = prev
        return out


def _as_bytes(array: np.ndarray) -> memoryview:
    """A contiguous array as the byte buffer cryptography takes (no copy if contiguous)."""
    return np.ascontiguousarray(array).data.cast("B")


def _sectors(length: int) -> int:
    if length % SECTOR_SIZE:
        raise ValueError(f"{length} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
    return length // SECTOR_SIZE


def legacy_aes_key(passphrase: bytes) -> bytes:
    """qcow's legacy AES key: the passphrase's first 16 bytes, zero padded (as QEMU)."""
    return passphrase[:16].ljust(16, b"\0")


LEGACY_AES = CipherSpec(128, "cbc", "plain64")
