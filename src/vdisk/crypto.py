"""Sector ciphers: AES in XTS or CBC mode, 512-byte sectors, with the plain, plain64 and essiv
IV generators (as dm-crypt, LUKS and QEMU number them). Pure: bytes in, bytes out, no I/O.

A request is en/decrypted in batches of sectors, never sector by sector: the IVs of a batch
are made at once, and the AES work is one ECB pass over it (XTS: the tweaks are XORed in around
it; CBC decryption: the previous ciphertext block is XORed in after it). CBC encryption is
chained inside a sector, so it runs one ECB pass per block position over all sectors together.

XTS, the LUKS default, is the hot path of encrypted images: it goes through ``_XTS_BATCH``
sectors at a time (so the tweaks, the data and the ECB output stay in the CPU cache), with the
ECB contexts and scratch arrays of each thread made once and reused (ECB keeps no state between
whole blocks; fresh multi-MiB arrays per call cost a page fault per 4 KiB).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
_BITS_SHIFTED_OUT = np.uint64(64) - _BLOCK_INDEX  # numpy shifts by 64 give 0, as wanted
_ONE, _FIVE = np.uint64(1), np.uint64(5)
_XTS_BATCH = 512  # sectors per pass (256 KiB): fewest CPU seconds per GiB, measured


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


class _XtsThreadState:
    """One thread's XTS contexts (ECB keeps no state between whole blocks, so they are made
    once) and its scratch arrays for a batch of up to ``_XTS_BATCH`` sectors."""

    def __init__(self, data_key: bytes, tweak_key: bytes) -> None:
        self.tweak_encryptor = _ecb(tweak_key, True)
        self.encryptor = _ecb(data_key, True)
        self.decryptor = _ecb(data_key, False)
        shape = (_XTS_BATCH, BLOCKS_PER_SECTOR)
        self.tweak_lo = np.empty(shape, dtype="<u8")  # low and high halves of every tweak
        self.tweak_hi = np.empty(shape, dtype="<u8")
        self.carry = np.empty(shape, dtype="<u8")
        self.ivs = np.zeros((_XTS_BATCH, 2), dtype="<u8")
        self.first_tweaks = bytearray(_XTS_BATCH * 16 + 15)  # update_into wants 15 spare
        self.ecb_out = bytearray(_XTS_BATCH * SECTOR_SIZE + 15)
        # For the compiled passes: the tweak of every block, and the scratch buffers'
        # addresses (the arrays pin the bytearrays' memory).
        self.tweak_table = np.empty(_XTS_BATCH * SECTOR_SIZE, dtype=np.uint8)
        self._pins = (np.frombuffer(self.first_tweaks, np.uint8),
                      np.frombuffer(self.ecb_out, np.uint8))
        self.tweak_table_at: int = self.tweak_table.ctypes.data
        self.first_tweaks_at: int = self._pins[0].ctypes.data
        self.ecb_out_at: int = self._pins[1].ctypes.data


class SectorCipher:
    """Encrypts and decrypts whole 512-byte sectors numbered from ``sector``. Thread-safe:
    XTS keeps its cipher contexts per thread, CBC makes them per call (never per sector)."""

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
        self._local = threading.local()

    # -- IVs ---------------------------------------------------------------------------
    def _ivs(self, sector: int, count: int) -> np.ndarray:
        """(count, 16) uint8: the IV of each sector."""
        ivs = np.zeros((count, 2), dtype="<u8")
        self._fill_ivs(ivs, sector)
        raw = ivs.view(np.uint8).reshape(count, 16)
        if self.spec.ivgen == "essiv":
            enc = _ecb(self._essiv_key, True)
            raw = np.frombuffer(enc.update(_as_bytes(raw)), dtype=np.uint8).reshape(count, 16)
        return raw

    def _fill_ivs(self, ivs: np.ndarray, sector: int) -> None:
        """The sector numbers of a plain or plain64 IV into ``ivs`` ((count, 2) uint64,
        the high word zero)."""
        numbers = np.arange(sector, sector + len(ivs), dtype="<u8")
        if self.spec.ivgen == "plain":
            numbers &= np.uint64(0xFFFFFFFF)
        ivs[:, 0] = numbers

    def _xts_state(self) -> _XtsThreadState:
        state: _XtsThreadState | None = getattr(self._local, "xts", None)
        if state is None:
            state = _XtsThreadState(self._data_key, self._tweak_key)
            self._local.xts = state
        return state

    def _first_tweaks(self, state: _XtsThreadState, sector: int, count: int) -> None:
        """T_0 of each of ``count`` sectors (its IV under the tweak key) into
        ``state.first_tweaks``."""
        ivs = state.ivs[:count]
        if self.spec.ivgen == "essiv":
            ivs[:] = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(
                count, 2
            )
        else:
            self._fill_ivs(ivs, sector)
        state.tweak_encryptor.update_into(ivs.data.cast("B"), state.first_tweaks)

    def _xts_tweaks(
        self, state: _XtsThreadState, sector: int, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) halves of the tweak of every block of ``count`` sectors, each
        (count, 32) uint64 (views of ``state``'s scratch arrays).

        Block j's tweak is t0 * x^j (t0: the sector's IV encrypted with the tweak key): t0
        shifted left by j, the j bits shifted out of the top folded back in times
        x^7 + x^2 + x + 1 (j < 32, so the fold cannot overflow)."""
        self._first_tweaks(state, sector, count)
        t0 = np.frombuffer(state.first_tweaks, dtype="<u8", count=count * 2).reshape(count, 2)
        lo, hi = t0[:, 0:1], t0[:, 1:2]
        new_lo, new_hi, out = state.tweak_lo[:count], state.tweak_hi[:count], state.carry[:count]
        np.left_shift(lo, _BLOCK_INDEX, out=new_lo)
        np.right_shift(hi, _BITS_SHIFTED_OUT, out=out)  # the bits shifted out of the top
        new_lo ^= out
        out <<= _ONE
        new_lo ^= out
        out <<= _ONE
        new_lo ^= out
        out <<= _FIVE
        new_lo ^= out
        np.left_shift(hi, _BLOCK_INDEX, out=new_hi)
        np.right_shift(lo, _BITS_SHIFTED_OUT, out=out)
        new_hi |= out
        return new_lo, new_hi

    def _xts(self, src: memoryview, dst: memoryview, sector: int, encrypt: bool) -> None:
        """XTS of ``src`` into ``dst`` (the same length; may be the same buffer)."""
        state = self._xts_state()
        ecb = state.encryptor if encrypt else state.decryptor
        total = len(src) // SECTOR_SIZE
        native = _compiled_xts()
        if native is not None:
            tweaks, xor = native
            # Addresses for the compiled passes; the arrays hold the buffers while they run.
            src_array = np.frombuffer(src, dtype=np.uint8)
            dst_array = src_array if dst is src else np.frombuffer(dst, dtype=np.uint8)
            src_at, dst_at = src_array.ctypes.data, dst_array.ctypes.data
            table, ecb_out = state.tweak_table_at, state.ecb_out_at
            for first in range(0, total, _XTS_BATCH):
                count = min(_XTS_BATCH, total - first)
                self._first_tweaks(state, sector + first, count)
                tweaks(table, state.first_tweaks_at, count, BLOCKS_PER_SECTOR)
                at, words = first * SECTOR_SIZE, count * SECTOR_SIZE // 8
                xor(dst_at + at, src_at + at, table, words)
                ecb.update_into(dst[at : at + count * SECTOR_SIZE], state.ecb_out)
                xor(dst_at + at, ecb_out, table, words)
            return
        for first in range(0, total, _XTS_BATCH):
            count = min(_XTS_BATCH, total - first)
            lo, hi = self._xts_tweaks(state, sector + first, count)
            part = slice(first * SECTOR_SIZE, (first + count) * SECTOR_SIZE)
            plain = np.frombuffer(src[part], dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
            out_view = dst[part]
            out = np.frombuffer(out_view, dtype="<u8").reshape(plain.shape)
            np.bitwise_xor(plain[:, :, 0], lo, out=out[:, :, 0])
            np.bitwise_xor(plain[:, :, 1], hi, out=out[:, :, 1])
            ecb.update_into(out_view, state.ecb_out)
            y = np.frombuffer(state.ecb_out, dtype="<u8", count=count * 64).reshape(plain.shape)
            np.bitwise_xor(y[:, :, 0], lo, out=out[:, :, 0])
            np.bitwise_xor(y[:, :, 1], hi, out=out[:, :, 1])

    # -- en/decryption -----------------------------------------------------------------
    def decrypt(self, buf: Buffer, sector: int) -> None:
        """Decrypt ``buf`` (writable, a whole number of sectors) in place."""
        view = memoryview(buf).cast("B")
        count = _sectors(len(view))
        if not count:
            return
        if self.spec.mode == "xts":
            self._xts(view, view, sector, False)
            return
        data = np.frombuffer(view, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        dec = _ecb(self._data_key, False)
        prev = np.empty_like(data)
        prev[:, 0] = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(
            count, 2
        )
        prev[:, 1:] = data[:, :-1]
        y = np.frombuffer(dec.update(view), dtype="<u8").reshape(data.shape)
        np.bitwise_xor(y, prev, out=data)

    def encrypt(self, buf: Buffer, sector: int, out: Buffer | None = None) -> memoryview:
        """The ciphertext of ``buf`` (a whole number of sectors), in ``out`` (writable, at
        least as long; not overlapping ``buf``) or else a new buffer."""
        view = memoryview(buf).cast("B")
        count = _sectors(len(view))
        if out is None:
            dst = memoryview(bytearray(len(view)))
        else:
            dst = memoryview(out).cast("B")[: len(view)]
        if not count:
            return dst
        if self.spec.mode == "xts":
            self._xts(view, dst, sector, True)
            return dst
        data = np.frombuffer(view, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        ciphertext = np.frombuffer(dst, dtype="<u8").reshape(data.shape)
        enc = _ecb(self._data_key, True)
        prev = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(count, 2)
        for j in range(BLOCKS_PER_SECTOR):
            c = np.frombuffer(enc.update(_as_bytes(data[:, j] ^ prev)), dtype="<u8")
            prev = c.reshape(count, 2)
            ciphertext[:, j] = prev
        return dst


@functools.cache
def _compiled_xts() -> tuple[Callable[[int, int, int, int], None],
                             Callable[[int, int, int, int], None]] | None:
    """``xts.c``'s ``xts_tweaks(table, first_tweaks, sectors, blocks)`` and ``xor_words(dst,
    a, b, words)``, built on first use; None (numpy does the work) with
    ``VDISK_NATIVE_XTS=0``, without a compiler, or on a big-endian host."""
    if sys.byteorder != "little":
        return None
    import ctypes

    from . import native

    lib = native.load(Path(__file__).with_name("xts.c"), "VDISK_NATIVE_XTS", "-O3")
    if lib is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    lib.xts_tweaks.argtypes = [pointer, pointer, size, size]
    lib.xor_words.argtypes = [pointer, pointer, pointer, size]
    lib.xts_tweaks.restype = lib.xor_words.restype = None
    return lib.xts_tweaks, lib.xor_words


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
