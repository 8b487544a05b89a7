"""Sector ciphers: AES in XTS or CBC mode, 512-byte sectors, with the plain, plain64 and essiv
IV generators (as dm-crypt, LUKS and QEMU number them). Pure: bytes in, bytes out, no I/O.

A request is en/decrypted in batches of sectors, never sector by sector: the IVs of a batch
are made at once, and the AES work is one ECB pass over it (XTS: the tweaks are XORed in around
it; CBC decryption: the previous ciphertext block is XORed in after it). CBC encryption is
chained inside a sector, so it runs one ECB pass per block position over all sectors together.

XTS, the LUKS default, is the hot path of encrypted images: it goes through ``_XTS_BATCH``
sectors at a time (so the tweaks, the data and the ECB output stay in the CPU cache), with the
ECB contexts and scratch buffers of each thread made once and reused (ECB keeps no state between
whole blocks; fresh multi-MiB buffers per call cost a page fault per 4 KiB). The IVs and tweaks
of plain and plain64 XTS are made by a compiled helper (``xts.c``, through ``vdisk.native``),
without the GIL and without numpy, whose import alone costs a short ``vdisk convert`` more
than a tenth of a second; numpy does that work where the helper cannot be built, and for essiv
and CBC.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from typing_extensions import Buffer

from .errors import FormatError

if TYPE_CHECKING:
    import numpy as np

SECTOR_SIZE = 512
BLOCKS_PER_SECTOR = SECTOR_SIZE // 16
CIPHER_MODES = ("xts", "cbc")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("sha1", "sha224", "sha256", "sha384", "sha512")
AES_KEY_BITS = (128, 192, 256)
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


class _XtsContexts:
    """One thread's XTS ECB contexts (made once: ECB keeps no state between whole blocks) and
    the scratch buffers of a batch of up to ``_XTS_BATCH`` sectors."""

    def __init__(self, data_key: bytes, tweak_key: bytes) -> None:
        self.tweak_encryptor = _ecb(tweak_key, True)
        self.encryptor = _ecb(data_key, True)
        self.decryptor = _ecb(data_key, False)
        self.first_tweaks = bytearray(_XTS_BATCH * 16 + 15)  # update_into wants 15 spare
        self.ecb_out = bytearray(_XTS_BATCH * SECTOR_SIZE + 15)


class _CompiledXts(_XtsContexts):
    """... with the IV and tweak tables of the compiled helper, and their addresses."""

    def __init__(self, data_key: bytes, tweak_key: bytes) -> None:
        super().__init__(data_key, tweak_key)
        self.ivs = bytearray(_XTS_BATCH * 16)
        self.tweaks = bytearray(_XTS_BATCH * SECTOR_SIZE)
        self._pins = [_Pinned(b) for b in (self.ivs, self.tweaks, self.first_tweaks,
                                           self.ecb_out)]
        self.ivs_at, self.tweaks_at, self.first_tweaks_at, self.ecb_out_at = (
            pin.address for pin in self._pins
        )


class _NumpyXts(_XtsContexts):
    """... with numpy's planes of the tweak halves."""

    def __init__(self, data_key: bytes, tweak_key: bytes) -> None:
        import numpy as np

        super().__init__(data_key, tweak_key)
        shape = (_XTS_BATCH, BLOCKS_PER_SECTOR)
        self.tweak_lo = np.empty(shape, dtype="<u8")  # low and high halves of every tweak
        self.tweak_hi = np.empty(shape, dtype="<u8")
        self.carry = np.empty(shape, dtype="<u8")
        self.ivs = np.zeros((_XTS_BATCH, 2), dtype="<u8")


class _Pinned:
    """The address of a writable buffer, valid while this lives (it holds an export, so a
    bytearray cannot move)."""

    def __init__(self, buf: Buffer) -> None:
        import ctypes

        self._export = ctypes.c_char.from_buffer(buf)  # type: ignore[arg-type]
        self.address: int = ctypes.addressof(self._export)


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
        import numpy as np

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
        import numpy as np

        numbers = np.arange(sector, sector + len(ivs), dtype="<u8")
        if self.spec.ivgen == "plain":
            numbers &= np.uint64(0xFFFFFFFF)
        ivs[:, 0] = numbers

    # -- XTS ---------------------------------------------------------------------------
    def _xts(self, src: memoryview, dst: memoryview, sector: int, encrypt: bool) -> None:
        """XTS of ``src`` into ``dst`` (writable, the same length; may be ``src``)."""
        helper = _compiled_xts() if self.spec.ivgen != "essiv" else None
        if helper is not None:
            self._xts_compiled(helper, src, dst, sector, encrypt)
        else:
            self._xts_numpy(src, dst, sector, encrypt)

    def _xts_compiled(
        self, helper: _XtsHelper, src: memoryview, dst: memoryview, sector: int, encrypt: bool
    ) -> None:
        state: _CompiledXts | None = getattr(self._local, "compiled", None)
        if state is None:
            state = self._local.compiled = _CompiledXts(self._data_key, self._tweak_key)
        ecb = state.encryptor if encrypt else state.decryptor
        ivs, tweaks, xor = helper
        mask = 0xFFFFFFFF if self.spec.ivgen == "plain" else (1 << 64) - 1
        if src is not dst:
            dst[:] = src  # then in place: the source may be read-only, the target is not
        target = _Pinned(dst)
        ivs_view = memoryview(state.ivs)
        total = len(src) // SECTOR_SIZE
        for first in range(0, total, _XTS_BATCH):
            count = min(_XTS_BATCH, total - first)
            ivs(state.ivs_at, (sector + first) & ((1 << 64) - 1), count, mask)
            state.tweak_encryptor.update_into(ivs_view[: count * 16], state.first_tweaks)
            tweaks(state.tweaks_at, state.first_tweaks_at, count, BLOCKS_PER_SECTOR)
            at, words = target.address + first * SECTOR_SIZE, count * SECTOR_SIZE // 8
            xor(at, at, state.tweaks_at, words)
            ecb.update_into(dst[first * SECTOR_SIZE : (first + count) * SECTOR_SIZE],
                            state.ecb_out)
            xor(at, state.ecb_out_at, state.tweaks_at, words)

    def _xts_numpy(self, src: memoryview, dst: memoryview, sector: int, encrypt: bool) -> None:
        import numpy as np

        state: _NumpyXts | None = getattr(self._local, "numpy", None)
        if state is None:
            state = self._local.numpy = _NumpyXts(self._data_key, self._tweak_key)
        ecb = state.encryptor if encrypt else state.decryptor
        total = len(src) // SECTOR_SIZE
        for first in range(0, total, _XTS_BATCH):
            count = min(_XTS_BATCH, total - first)
            lo, hi = self._numpy_tweaks(state, sector + first, count)
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

    def _numpy_tweaks(
        self, state: _NumpyXts, sector: int, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) halves of the tweak of every block of ``count`` sectors, each
        (count, 32) uint64 (views of ``state``'s scratch arrays).

        Block j's tweak is t0 * x^j (t0: the sector's IV encrypted with the tweak key): t0
        shifted left by j, the j bits shifted out of the top folded back in times
        x^7 + x^2 + x + 1 (j < 32, so the fold cannot overflow)."""
        import numpy as np

        ivs = state.ivs[:count]
        if self.spec.ivgen == "essiv":
            ivs[:] = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(
                count, 2
            )
        else:
            self._fill_ivs(ivs, sector)
        state.tweak_encryptor.update_into(ivs.data.cast("B"), state.first_tweaks)
        t0 = np.frombuffer(state.first_tweaks, dtype="<u8", count=count * 2).reshape(count, 2)
        lo, hi = t0[:, 0:1], t0[:, 1:2]
        new_lo, new_hi, out = state.tweak_lo[:count], state.tweak_hi[:count], state.carry[:count]
        index = np.arange(BLOCKS_PER_SECTOR, dtype="<u8")
        np.left_shift(lo, index, out=new_lo)
        np.right_shift(hi, np.uint64(64) - index, out=out)  # the bits shifted out of the top
        new_lo ^= out  # times x^7 + x^2 + x + 1: shifted by 0, 1, 2 and 7
        for shift in (1, 1, 5):
            out <<= np.uint64(shift)
            new_lo ^= out
        np.left_shift(hi, index, out=new_hi)
        np.right_shift(lo, np.uint64(64) - index, out=out)  # numpy shifts by 64 give 0
        new_hi |= out
        return new_lo, new_hi

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
        import numpy as np

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
        import numpy as np

        data = np.frombuffer(view, dtype="<u8").reshape(count, BLOCKS_PER_SECTOR, 2)
        ciphertext = np.frombuffer(dst, dtype="<u8").reshape(data.shape)
        enc = _ecb(self._data_key, True)
        prev = np.frombuffer(_as_bytes(self._ivs(sector, count)), dtype="<u8").reshape(count, 2)
        for j in range(BLOCKS_PER_SECTOR):
            c = np.frombuffer(enc.update(_as_bytes(data[:, j] ^ prev)), dtype="<u8")
            prev = c.reshape(count, 2)
            ciphertext[:, j] = prev
        return dst


#: xts.c's xts_ivs(ivs, first_sector, count, mask), xts_tweaks(table, first_tweaks, sectors,
#: blocks) and xor_words(dst, a, b, words)
_XtsHelper = tuple[Callable[[int, int, int, int], None], Callable[[int, int, int, int], None],
                   Callable[[int, int, int, int], None]]


@functools.cache
def _compiled_xts() -> _XtsHelper | None:
    """``xts.c``'s functions, built on first use; None (numpy does the work) with
    ``VDISK_NATIVE_XTS=0``, without a compiler, or on a big-endian host."""
    if sys.byteorder != "little":
        return None
    import ctypes

    from . import native

    lib = native.load(Path(__file__).with_name("xts.c"), "VDISK_NATIVE_XTS", "-O3")
    if lib is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    lib.xts_ivs.argtypes = [pointer, ctypes.c_uint64, size, ctypes.c_uint64]
    lib.xts_tweaks.argtypes = [pointer, pointer, size, size]
    lib.xor_words.argtypes = [pointer, pointer, pointer, size]
    lib.xts_ivs.restype = lib.xts_tweaks.restype = lib.xor_words.restype = None
    return lib.xts_ivs, lib.xts_tweaks, lib.xor_words


def _as_bytes(array: np.ndarray) -> memoryview:
    """A contiguous array as the byte buffer cryptography takes (no copy if contiguous)."""
    import numpy as np

    return np.ascontiguousarray(array).data.cast("B")


def _sectors(length: int) -> int:
    if length % SECTOR_SIZE:
        raise ValueError(f"{length} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
    return length // SECTOR_SIZE


def legacy_aes_key(passphrase: bytes) -> bytes:
    """qcow's legacy AES key: the passphrase's first 16 bytes, zero padded (as QEMU)."""
    return passphrase[:16].ljust(16, b"\0")


LEGACY_AES = CipherSpec(128, "cbc", "plain64")
