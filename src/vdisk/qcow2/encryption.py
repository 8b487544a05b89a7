"""An encrypted qcow2 image's data cipher: unlocking at open (LUKS: the header area in image
clusters, pointed at by the full-disk-encryption extension; legacy AES: the passphrase is the
key), and the en/decryption of guest data in 512-byte sectors. LUKS numbers sectors by HOST
offset, legacy AES by GUEST offset, as QEMU does. Also: creating the LUKS header area, and the
key-slot changes ``amend`` makes (``amend_encryption``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from ..crypto import LEGACY_AES, SECTOR_SIZE, CipherSpec, SectorCipher, legacy_aes_key
from ..errors import FormatError, RequestError, UnsupportedFeatureError, from_oserror
from ..fileio import pread_full, pwrite_full
from . import format as fmt
from . import luks
from .luks import LuksHeader, UnlockError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

_SECTOR_MASK = SECTOR_SIZE - 1
_warned_legacy = False


class InsecureEncryptionWarning(UserWarning):
    """Legacy qcow2 AES is in use (shown by default, unlike a DeprecationWarning)."""


def warn_legacy_aes() -> None:
    """Once per process, as QEMU does."""
    global _warned_legacy
    if not _warned_legacy:
        _warned_legacy = True
        warnings.warn(
            "Use of the legacy qcow2 AES encryption (encrypt.format=aes) is insecure and "
            "deprecated; use encrypt.format=luks",
            InsecureEncryptionWarning,
            stacklevel=3,
        )


def passphrase_bytes(passphrase: str | bytes) -> bytes:
    return passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)


def read_luks_area(fd: int, header: fmt.Header) -> tuple[LuksHeader, bytes]:
    """The LUKS header and its whole area (header.validate already bounded it by the file)."""
    ext = header.crypto
    if ext is None:
        raise FormatError("LUKS encryption without a full disk encryption header extension")
    if ext.length < luks.HEADER_SIZE:
        raise FormatError(f"encryption header area is {ext.length} bytes, too small for LUKS")
    area = bytearray(ext.length)
    pread_full(fd, area, ext.offset)
    lh = LuksHeader.decode(bytes(area[: luks.HEADER_SIZE]))
    lh.check_within(ext.length)
    return lh, bytes(area)


@dataclass
class ImageCipher:
    """The unlocked data cipher of one image."""

    cipher: SectorCipher
    by_host_offset: bool  # LUKS: IV from the host offset; legacy AES: from the guest offset
    luks_header: LuksHeader | None = None
    master_key: bytes = b""

    def decrypt_into(self, view: memoryview, host: int, guest: int) -> None:
        """``view`` holds the file's bytes read from ``host`` (guest offset ``guest``);
        make it plaintext. A partial sector at either end is read whole from ``fd`` by the
        caller (see read_sectors)."""
        base = host if self.by_host_offset else guest
        self.cipher.decrypt(view, base // SECTOR_SIZE)

    def encrypt(self, data: Buffer, host: int, guest: int) -> memoryview:
        base = host if self.by_host_offset else guest
        return self.cipher.encrypt(data, base // SECTOR_SIZE)

    def read(self, fd: int, view: memoryview, host: int, guest: int) -> None:
        """Read and decrypt ``len(view)`` bytes at ``host``, sector-aligned or not."""
        start = host & _SECTOR_MASK
        end = start + len(view)
        if not start and not end & _SECTOR_MASK:
            pread_full(fd, view, host)
            self.decrypt_into(view, host, guest)
            return
        whole = bytearray((end + _SECTOR_MASK) & ~_SECTOR_MASK)
        pread_full(fd, whole, host - start)
        self.decrypt_into(memoryview(whole), host - start, guest - start)
        view[:] = whole[start:end]


_REGISTERED: dict[str, bytes] = {}


def register_passphrase(path: str, passphrase: str | bytes) -> None:
    """The passphrase of the image at ``path`` for every later open in this process that is
    given none (the CLI's ``--object secret`` + ``encrypt.key-secret``, as QEMU's objects)."""
    _REGISTERED[os.path.realpath(path)] = passphrase_bytes(passphrase)


def forget_passphrases() -> None:
    _REGISTERED.clear()


def open_cipher(
    fd: int, header: fmt.Header, passphrase: str | bytes | None, path: str
) -> ImageCipher:
    """Unlock an encrypted image; one clear error when no passphrase or a wrong one."""
    if passphrase is None:
        passphrase = _REGISTERED.get(os.path.realpath(path))
    if passphrase is None:
        raise UnlockError("image is encrypted: a passphrase is needed", path=path)
    secret = passphrase_bytes(passphrase)
    if header.crypt_method == fmt.CRYPT_AES:
        warn_legacy_aes()
        return ImageCipher(SectorCipher(LEGACY_AES, legacy_aes_key(secret)), False)
    if header.crypt_method != fmt.CRYPT_LUKS:
        raise UnsupportedFeatureError(f"encryption method {header.crypt_method} is unknown")
    lh, area = read_luks_area(fd, header)
    master_key = luks.unlock(lh, area, secret)
    return ImageCipher(SectorCipher(lh.cipher, master_key), True, lh, master_key)


def encrypt_info(fd: int, header: fmt.Header) -> dict[str, Any] | None:
    """qemu-img info's ``encrypt`` member; needs no passphrase."""
    if header.crypt_method == fmt.CRYPT_AES:
        return {"format": "aes"}
    if header.crypt_method == fmt.CRYPT_LUKS:
        lh, _area = read_luks_area(fd, header)
        return luks.describe(lh)
    return None


# -- creation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncryptOptions:
    """qemu-img's encrypt.* creation options, parsed."""

    format: str  # "luks" | "aes"
    passphrase: bytes
    spec: CipherSpec = LEGACY_AES
    hash_alg: str = "sha256"
    iter_time_ms: int = luks.DEFAULT_ITER_TIME_MS


_ENCRYPT_KEYS = (
    "encrypt_format",
    "encryption",
    "passphrase",
    "cipher_alg",
    "cipher_mode",
    "ivgen_alg",
    "ivgen_hash_alg",
    "hash_alg",
    "iter_time",
)


def pop_encrypt_options(opts: dict[str, Any], path: str) -> EncryptOptions | None:
    """Take the encryption options out of ``opts`` (underscore names; ``encrypt.X`` keys are
    accepted as ``encrypt_X`` too)."""
    for key in [k for k in opts if k.startswith("encrypt.")]:
        name = key.removeprefix("encrypt.")
        opts["encrypt_format" if name == "format" else name] = opts.pop(key)
    values = {k: opts.pop(k) for k in _ENCRYPT_KEYS if k in opts}
    encryption = values.pop("encryption", None)
    form = values.pop("encrypt_format", None)
    if encryption not in (None, False, "off", "") and form is None:
        form = "aes"  # qemu-img's encryption=on is the legacy format
    if form in (None, "", False):
        if values.get("passphrase") is not None or len(values) > 1:
            raise RequestError("encryption options given without encrypt.format", path=path)
        return None
    form = str(form)
    if form not in ("luks", "aes"):
        raise RequestError(f"encrypt.format {form!r}: expected luks or aes", path=path)
    passphrase = values.get("passphrase")
    if passphrase is None:
        raise RequestError("Parameter 'encrypt.key-secret' is required for cipher", path=path)
    if form == "aes":
        if len(values) > 1:
            raise RequestError("encrypt.format=aes takes no cipher options", path=path)
        return EncryptOptions("aes", passphrase_bytes(passphrase))
    alg = str(values.get("cipher_alg", "aes-256"))
    if not alg.startswith("aes-") or not alg[4:].isdigit():
        raise RequestError(f"cipher-alg {alg!r}: expected aes-128, aes-192 or aes-256", path=path)
    ivgen = str(values.get("ivgen_alg", "plain64"))
    ivhash = values.get("ivgen_hash_alg")
    if ivgen == "essiv" and ivhash is None:
        ivhash = "sha256"
    try:
        spec = CipherSpec(
            int(alg[4:]), str(values.get("cipher_mode", "xts")), ivgen,
            str(ivhash) if ivgen == "essiv" else None,
        )  # fmt: skip
    except FormatError as exc:
        raise RequestError(exc.message, path=path) from None
    iter_time = int(values.get("iter_time", luks.DEFAULT_ITER_TIME_MS))
    if iter_time < 1:
        raise RequestError(f"iter-time {iter_time}: must be at least 1 ms", path=path)
    return EncryptOptions(
        "luks", passphrase_bytes(passphrase), spec, str(values.get("hash_alg", "sha256")),
        iter_time,
    )  # fmt: skip


def luks_area_size(options: dict[str, Any], cluster_size: int) -> int:
    """Bytes of clusters a new image's LUKS header takes (qemu-img measure adds them); 0
    when ``options`` (``encrypt.*`` keys, as qemu-img's -o) ask for no LUKS."""
    opts = {k.replace("-", "_"): v for k, v in options.items() if k.startswith("encrypt")}
    if "encrypt.key_secret" in opts:
        opts["passphrase"] = opts.pop("encrypt.key_secret")
    parsed = pop_encrypt_options(opts, "")
    if parsed is None or parsed.format != "luks":
        return 0
    area = luks.layout_for(parsed.spec)[1] * SECTOR_SIZE
    return -(-area // cluster_size) * cluster_size


def new_luks_area(opts: EncryptOptions) -> bytes:
    """The header area of a new LUKS image (written into image clusters by create)."""
    try:
        _lh, area, _mk = luks.new_header(
            opts.spec, opts.hash_alg, opts.passphrase, opts.iter_time_ms
        )
    except FormatError as exc:
        raise RequestError(exc.message) from None
    return area


# -- key slots (amend) ------------------------------------------------------------------------
def amend_encryption(image: Any, options: dict[str, Any], secrets: dict[str, bytes]) -> None:
    """qemu-img amend's encrypt.* key-slot changes on an open, unlocked LUKS image.

    ``options``: encrypt.state (active|inactive), encrypt.new-secret, encrypt.old-secret,
    encrypt.keyslot, encrypt.iter-time (ids into ``secrets``). Adds or erases one slot; the
    key material is written and synced before the header sector that activates it.
    """
    opts = {k.removeprefix("encrypt.").replace("-", "_"): v for k, v in options.items()}
    crypto: ImageCipher | None = getattr(image, "_crypto", None)
    if not image.header.crypt_method:
        raise UnsupportedFeatureError("Can't amend encryption options - encryption not present")
    if crypto is None or crypto.luks_header is None:
        raise UnsupportedFeatureError("amend of key slots needs an unlocked LUKS image")
    h = image.header
    ext = h.crypto
    assert ext is not None
    state = opts.pop("state", None)
    slot = opts.pop("keyslot", None)
    slot_index = int(slot) if slot is not None else None
    iter_time = int(opts.pop("iter_time", luks.DEFAULT_ITER_TIME_MS))
    old_lh, area = read_luks_area(image.fd, h)
    lh = old_lh
    if state == "active":
        new_id = opts.pop("new_secret", None)
        if new_id is None:
            raise RequestError("encrypt.new-secret is required to add a key slot")
        lh, area = luks.add_slot(
            lh, area, crypto.master_key, _secret(secrets, new_id), slot_index, iter_time
        )
    elif state == "inactive":
        old_id = opts.pop("old_secret", None)
        targets: list[int]
        if slot_index is not None:
            targets = [slot_index]
        elif old_id is not None:
            targets = _slots_of(lh, area, _secret(secrets, old_id))
            if not targets:
                raise RequestError("None of the keyslots match the given old-secret")
        else:
            raise RequestError("encrypt.keyslot or encrypt.old-secret is needed to erase a slot")
        for i in targets:
            lh, area = luks.erase_slot(lh, area, i)
    else:
        raise RequestError(f"encrypt.state {state!r}: expected active or inactive")
    if opts:
        raise RequestError(f"unknown encrypt option(s): {', '.join(sorted(opts))}")
    # Material first, synced; then the header sector that points at it.
    try:
        span = lh.material_sectors * SECTOR_SIZE
        for before, after in zip(old_lh.slots, lh.slots, strict=True):
            if before != after:  # only the changed slots' key material
                start = after.key_offset
                pwrite_full(image.fd, area[start : start + span], ext.offset + start)
        os.fdatasync(image.fd)
        pwrite_full(image.fd, area[: luks.HEADER_SIZE], ext.offset)
        os.fdatasync(image.fd)
    except OSError as exc:
        raise from_oserror(exc, image.path) from None
    crypto.luks_header = lh


def _secret(secrets: dict[str, bytes], name: Any) -> bytes:
    if isinstance(name, bytes):
        return name
    if str(name) not in secrets:
        raise RequestError(f"No secret with id '{name}' found")
    return secrets[str(name)]


def _slots_of(lh: LuksHeader, area: bytes, secret: bytes) -> list[int]:
    found = []
    for i, s in enumerate(lh.slots):
        if s.active and luks._try_slot(lh, s, area, secret) is not None:
            found.append(i)
    return found
