"""LUKS1 as qcow2 keeps it (crypt_method 2): the header and its eight key slots, the
anti-forensic (AF) splitter, PBKDF2 key derivation, the master-key digest check, unlocking,
and making, adding and erasing key slots. Pure: the caller hands in the header area's bytes
and writes back what these functions return; nothing here touches a file.

Layout of the 592-byte header (big-endian): magic, version, cipher name, cipher mode, hash,
payload offset (sectors), key bytes, master-key digest, its salt and iterations, uuid, then
per slot: state, iterations, salt, key-material offset (sectors), stripes. Key material is
``key_bytes * stripes`` bytes, encrypted with the image's cipher under the PBKDF2-derived key,
sectors numbered from 0 at the material's start.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import struct
import time
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..crypto import HASH_ALGS, SECTOR_SIZE, CipherSpec, SectorCipher
from ..errors import FormatError, RequestError, VdiskError

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
HEADER_SIZE = 592
NUM_KEY_SLOTS = 8
STRIPES = 4000  # QEMU accepts only this count (as cryptsetup writes)
SALT_LEN = 32
DIGEST_LEN = 20
KEY_SLOT_OFFSET = 4096  # the first slot's key material; every area is aligned to this
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
MIN_ITERATIONS = 1000  # QEMU's floor for new slots and master-key digests
# Bound on one PBKDF2 run when opening: QEMU's default 2 s iter-time yields a few million
# iterations on current hosts; 2^25 leaves room for a host several times faster and keeps a
# hostile header's cost at seconds per slot, not hours.
MAX_ITERATIONS = 1 << 25
DEFAULT_ITER_TIME_MS = 2000

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HEAD.size + NUM_KEY_SLOTS * _SLOT.size == HEADER_SIZE


class UnlockError(VdiskError):
    """No key slot opens with the passphrase given (or none was given)."""

    errno = 1  # EPERM, as QEMU reports a wrong secret


@dataclass(frozen=True)
class KeySlot:
    active: bool
    iterations: int
    salt: bytes
    key_offset_sector: int
    stripes: int

    @property
    def key_offset(self) -> int:
        return self.key_offset_sector * SECTOR_SIZE


@dataclass(frozen=True)
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset_sector: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    slots: tuple[KeySlot, ...] = field(default_factory=tuple)

    # -- codec -------------------------------------------------------------------------
    @classmethod
    def decode(cls, data: bytes) -> LuksHeader:
        """Decode and check a header; a hostile one raises FormatError naming the field."""
        if len(data) < HEADER_SIZE:
            raise FormatError(f"LUKS header: {len(data)} bytes, need {HEADER_SIZE}")
        (magic, version, name, mode, hash_spec, payload, key_bytes, digest, dsalt, diter,
         uid) = _HEAD.unpack_from(data)  # fmt: skip
        if magic != MAGIC:
            raise FormatError("LUKS header: bad magic")
        if version != VERSION:
            raise FormatError(f"LUKS header: version {version} is not supported (only 1)")
        slots = []
        for i in range(NUM_KEY_SLOTS):
            state, iters, salt, offset, stripes = _SLOT.unpack_from(
                data, _HEAD.size + i * _SLOT.size
            )
            if state not in (SLOT_ACTIVE, SLOT_INACTIVE):
                raise FormatError(f"LUKS key slot {i}: state {state:#x} is neither on nor off")
            slots.append(KeySlot(state == SLOT_ACTIVE, iters, salt, offset, stripes))
        header = cls(
            _cstr(name, "cipher name"),
            _cstr(mode, "cipher mode"),
            _cstr(hash_spec, "hash"),
            payload,
            key_bytes,
            digest,
            dsalt,
            diter,
            _cstr(uid, "uuid"),
            tuple(slots),
        )
        header._check()
        return header

    def encode(self) -> bytes:
        out = bytearray(
            _HEAD.pack(
                MAGIC,
                VERSION,
                self.cipher_name.encode(),
                self.cipher_mode.encode(),
                self.hash_spec.encode(),
                self.payload_offset_sector,
                self.key_bytes,
                self.mk_digest,
                self.mk_digest_salt,
                self.mk_digest_iterations,
                self.uuid.encode(),
            )
        )
        for s in self.slots:
            state = SLOT_ACTIVE if s.active else SLOT_INACTIVE
            out += _SLOT.pack(state, s.iterations, s.salt, s.key_offset_sector, s.stripes)
        return bytes(out)

    def _check(self) -> None:
        """QEMU's header checks, plus bounded iteration counts."""
        self.cipher  # noqa: B018 - parses (and so checks) the cipher
        if self.hash_spec not in HASH_ALGS:
            raise FormatError(f"LUKS hash {self.hash_spec!r} is not supported")
        _check_iterations("master key digest", self.mk_digest_iterations)
        material = self.material_sectors
        areas: list[tuple[int, int, int]] = []
        for i, s in enumerate(self.slots):
            if s.stripes != STRIPES:
                raise FormatError(f"LUKS key slot {i}: {s.stripes} stripes, expected {STRIPES}")
            if s.key_offset_sector < HEADER_SIZE // SECTOR_SIZE + 1:
                raise FormatError(f"LUKS key slot {i}: key material overlaps the header")
            if s.key_offset_sector + material > self.payload_offset_sector:
                raise FormatError(f"LUKS key slot {i}: key material overlaps the payload")
            if s.active:
                _check_iterations(f"key slot {i}", s.iterations)
            areas.append((s.key_offset_sector, s.key_offset_sector + material, i))
        areas.sort()
        for (_, end, i), (start, _, j) in itertools.pairwise(areas):
            if start < end:
                raise FormatError(f"LUKS key slots {i} and {j}: key material overlaps")

    # -- derived values ----------------------------------------------------------------
    @property
    def cipher(self) -> CipherSpec:
        return CipherSpec.from_luks(self.cipher_name, self.cipher_mode, self.key_bytes)

    @property
    def split_key_len(self) -> int:
        return self.key_bytes * STRIPES

    @property
    def material_sectors(self) -> int:
        """Sectors of one slot's key material (a partial last sector is padded)."""
        return -(-self.split_key_len // SECTOR_SIZE)

    @property
    def header_len(self) -> int:
        """Bytes of the whole header area (header and every slot's material)."""
        return self.payload_offset_sector * SECTOR_SIZE

    def check_within(self, area_length: int) -> None:
        """Every slot's key material must lie inside the area qcow2 reserved."""
        for i, s in enumerate(self.slots):
            if s.key_offset + self.material_sectors * SECTOR_SIZE > area_length:
                raise FormatError(
                    f"LUKS key slot {i}: key material at {s.key_offset:#x} runs past the end "
                    f"of the {area_length}-byte encryption header area"
                )


def _cstr(raw: bytes, what: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"LUKS header: {what} is not ASCII") from None


def _check_iterations(what: str, iterations: int) -> None:
    if iterations < 1:
        raise FormatError(f"LUKS {what}: zero PBKDF2 iterations")
    if iterations > MAX_ITERATIONS:
        raise FormatError(
            f"LUKS {what}: {iterations} PBKDF2 iterations exceed vdisk's bound of {MAX_ITERATIONS}"
        )


# -- primitives ---------------------------------------------------------------------------
def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    algorithms: dict[str, Callable[[], hashes.HashAlgorithm]] = {
        "sha1": hashes.SHA1,
        "sha224": hashes.SHA224,
        "sha256": hashes.SHA256,
        "sha384": hashes.SHA384,
        "sha512": hashes.SHA512,
    }
    kdf = PBKDF2HMAC(algorithms[hash_alg](), length, salt, iterations)
    return kdf.derive(password)


def _diffuse(block: bytes, hash_alg: str) -> bytes:
    """LUKS's AF diffusion: hash each digest-sized piece with its big-endian index."""
    size = hashlib.new(hash_alg).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i : i + size]
        out += hashlib.new(hash_alg, struct.pack(">I", i // size) + piece).digest()[: len(piece)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def af_merge(split: bytes, key_len: int, stripes: int, hash_alg: str) -> bytes:
    d = bytes(key_len)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, split[i * key_len : (i + 1) * key_len]), hash_alg)
    return _xor(d, split[(stripes - 1) * key_len : stripes * key_len])


def af_split(key: bytes, stripes: int, hash_alg: str) -> bytes:
    n = len(key)
    random = os.urandom(n * (stripes - 1))
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, random[i * n : (i + 1) * n]), hash_alg)
    return random + _xor(d, key)


def _digest(header: LuksHeader, master_key: bytes) -> bytes:
    return pbkdf2(
        header.hash_spec, master_key, header.mk_digest_salt, header.mk_digest_iterations,
        DIGEST_LEN,
    )  # fmt: skip


def iterations_for(hash_alg: str, key_len: int, iter_time_ms: int) -> int:
    """PBKDF2 iterations that take about ``iter_time_ms`` here (QEMU's benchmark, small)."""
    count = 1 << 12
    while True:
        start = time.perf_counter()
        pbkdf2(hash_alg, b"vdisk", bytes(SALT_LEN), count, key_len)
        spent = time.perf_counter() - start
        if spent >= 0.025 or count >= MAX_ITERATIONS:
            break
        count <<= 1
    return min(MAX_ITERATIONS, int(count * iter_time_ms / 1000 / max(spent, 1e-9)))


# -- unlocking ------------------------------------------------------------------------------
def unlock(header: LuksHeader, area: bytes, passphrase: bytes) -> bytes:
    """The master key, from the first active slot the passphrase opens.

    ``area`` is the header area (at least ``header_len`` bytes or up to the slots' end)."""
    for slot in header.slots:
        if not slot.active:
            continue
        key = _try_slot(header, slot, area, passphrase)
        if key is not None:
            return key
    raise UnlockError("Invalid password, cannot unlock any keyslot")


def _try_slot(header: LuksHeader, slot: KeySlot, area: bytes, passphrase: bytes) -> bytes | None:
    spec = header.cipher
    derived = pbkdf2(header.hash_spec, passphrase, slot.salt, slot.iterations, header.key_bytes)
    start = slot.key_offset
    material = bytearray(area[start : start + header.material_sectors * SECTOR_SIZE])
    SectorCipher(spec, derived).decrypt(material, 0)
    candidate = af_merge(bytes(material), header.key_bytes, slot.stripes, header.hash_spec)
    if hmac.compare_digest(_digest(header, candidate), header.mk_digest):
        return candidate
    return None


# -- making and changing slots ----------------------------------------------------------------
def layout_for(spec: CipherSpec) -> tuple[int, int]:
    """(sectors per slot area, payload offset in sectors): QEMU's (and cryptsetup's) layout,
    each slot's material rounded up to 4 KiB after a 4 KiB header."""
    align = KEY_SLOT_OFFSET // SECTOR_SIZE
    material = -(-spec.key_len * STRIPES // SECTOR_SIZE)
    per_slot = -(-material // align) * align
    return per_slot, align + NUM_KEY_SLOTS * per_slot


def new_header(
    spec: CipherSpec, hash_alg: str, passphrase: bytes, iter_time_ms: int = DEFAULT_ITER_TIME_MS
) -> tuple[LuksHeader, bytes, bytes]:
    """A new header with slot 0 active: (header, whole header area bytes, master key)."""
    if hash_alg not in HASH_ALGS:
        raise RequestError(f"hash algorithm {hash_alg!r} is not supported")
    master_key = os.urandom(spec.key_len)
    per_slot, payload = layout_for(spec)
    align = KEY_SLOT_OFFSET // SECTOR_SIZE
    mk_iters = max(MIN_ITERATIONS, iterations_for(hash_alg, spec.key_len, iter_time_ms) // 8)
    empty = KeySlot(False, 0, bytes(SALT_LEN), 0, STRIPES)
    header = LuksHeader(
        "aes",
        spec.luks_mode,
        hash_alg,
        payload,
        spec.key_len,
        b"",
        os.urandom(SALT_LEN),
        mk_iters,
        str(uuid_mod.uuid4()),
        tuple(replace(empty, key_offset_sector=align + i * per_slot) for i in range(NUM_KEY_SLOTS)),
    )
    header = replace(header, mk_digest=_digest(header, master_key))
    area = bytearray(header.header_len)
    header, area_bytes = add_slot(header, bytes(area), master_key, passphrase, 0, iter_time_ms)
    return header, area_bytes, master_key


def add_slot(
    header: LuksHeader,
    area: bytes,
    master_key: bytes,
    passphrase: bytes,
    slot_index: int | None = None,
    iter_time_ms: int = DEFAULT_ITER_TIME_MS,
) -> tuple[LuksHeader, bytes]:
    """Activate a slot (the first free one by default) for ``passphrase``: the new header and
    header area. The area's material is written before the header says the slot is active
    (the caller writes the area, then the header sector)."""
    if slot_index is None:
        free = [i for i, s in enumerate(header.slots) if not s.active]
        if not free:
            raise RequestError("Can't add a keyslot - all keyslots are in use")
        slot_index = free[0]
    if not 0 <= slot_index < NUM_KEY_SLOTS:
        raise RequestError(f"Invalid keyslot {slot_index} (expected 0..{NUM_KEY_SLOTS - 1})")
    if header.slots[slot_index].active:
        raise RequestError(f"Refusing to overwrite active keyslot {slot_index}")
    iters = max(MIN_ITERATIONS, iterations_for(header.hash_spec, header.key_bytes, iter_time_ms))
    salt = os.urandom(SALT_LEN)
    derived = pbkdf2(header.hash_spec, passphrase, salt, iters, header.key_bytes)
    split = af_split(master_key, STRIPES, header.hash_spec)
    padded = split.ljust(header.material_sectors * SECTOR_SIZE, b"\0")
    material = SectorCipher(header.cipher, derived).encrypt(padded, 0)
    slot = replace(header.slots[slot_index], active=True, iterations=iters, salt=salt)
    slots = list(header.slots)
    slots[slot_index] = slot
    new = replace(header, slots=tuple(slots))
    out = bytearray(area)
    out[slot.key_offset : slot.key_offset + len(material)] = material
    out[:HEADER_SIZE] = new.encode()
    return new, bytes(out)


def erase_slot(header: LuksHeader, area: bytes, slot_index: int) -> tuple[LuksHeader, bytes]:
    """Deactivate a slot and overwrite its key material; refuses the last active slot."""
    if not 0 <= slot_index < NUM_KEY_SLOTS:
        raise RequestError(f"Invalid keyslot {slot_index} (expected 0..{NUM_KEY_SLOTS - 1})")
    active = [i for i, s in enumerate(header.slots) if s.active]
    if slot_index in active and len(active) == 1:
        raise RequestError("Attempt to erase the only active keyslot")
    slot = replace(header.slots[slot_index], active=False, iterations=0, salt=bytes(SALT_LEN))
    slots = list(header.slots)
    slots[slot_index] = slot
    new = replace(header, slots=tuple(slots))
    out = bytearray(area)
    n = header.material_sectors * SECTOR_SIZE
    out[slot.key_offset : slot.key_offset + n] = os.urandom(n)
    out[:HEADER_SIZE] = new.encode()
    return new, bytes(out)


def find_slot(header: LuksHeader, area: bytes, passphrase: bytes) -> int | None:
    """The active slot that ``passphrase`` opens, or None."""
    for i, slot in enumerate(header.slots):
        if slot.active and _try_slot(header, slot, area, passphrase) is not None:
            return i
    return None


def describe(header: LuksHeader) -> dict[str, object]:
    """qemu-img info's ``encrypt`` member (QAPI QCryptoBlockInfoLUKS); no key material."""
    spec = header.cipher
    # qemu-img's order (its QDict's), ivgen-hash-alg only for essiv.
    info: dict[str, object] = {
        "ivgen-alg": spec.ivgen,
        "hash-alg": header.hash_spec,
        "cipher-alg": spec.alg,
        "uuid": header.uuid,
    }
    if spec.ivgen_hash:
        info["ivgen-hash-alg"] = spec.ivgen_hash
    info["format"] = "luks"
    info["cipher-mode"] = spec.mode
    slots: list[dict[str, object]] = []
    for s in header.slots:
        if s.active:
            slots.append(
                {"active": True, "iters": s.iterations, "key-offset": s.key_offset,
                 "stripes": s.stripes}
            )  # fmt: skip
        else:
            slots.append({"active": False, "key-offset": s.key_offset})
    info["slots"] = slots
    info["payload-offset"] = header.header_len
    info["master-key-iters"] = header.mk_digest_iterations
    return info
