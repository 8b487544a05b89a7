"""Image locking as QEMU does it: open file description (OFD) locks, one byte per permission.

QEMU's file-posix driver marks what an open of an image may do, and what it lets others do, with
shared (read) OFD locks on single bytes of the image file:

- byte ``PERM_BASE + bit`` (100 + bit) for each permission the open holds;
- byte ``SHARED_BASE + bit`` (200 + bit) for each permission it does not share.

The bits are QEMU's: consistent read 0, write 1, write unchanged 2, resize 3. Only read locks are
ever taken, so taking one never fails; a conflict is found afterwards with F_OFD_GETLK, which
reports locks held by other open file descriptions only. Locking first and checking second (in
QEMU's order) means two racing openers both see each other and both fail, never both succeed.

The locks belong to the open file description, so they go away when the fd is closed, and two
opens in one process conflict just as two processes do. Where OFD locks do not exist (not Linux,
or a file system answering EINVAL/ENOLCK), locking is skipped without an error.

What lives here: the permission bits, the lock modes vdisk's opens use (measured against
qemu-img/qemu-io 7.2), and :func:`lock`/:func:`unlock`. The opens themselves call :func:`lock`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import LockError
from .record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PERM_BASE = 100  # byte PERM_BASE + bit: the holder has the permission
SHARED_BASE = 200  # byte SHARED_BASE + bit: the holder does not share the permission


class Permission:
    """QEMU's block permissions (BLK_PERM_*), by bit. Plain ints, not an enum: this module is
    on ``vdisk info``'s start-up path."""

    CONSISTENT_READ = 1 << 0
    WRITE = 1 << 1
    WRITE_UNCHANGED = 1 << 2
    RESIZE = 1 << 3


PERMISSION_NAMES = {
    Permission.CONSISTENT_READ: "consistent read",
    Permission.WRITE: "write",
    Permission.WRITE_UNCHANGED: "write unchanged",
    Permission.RESIZE: "resize",
}
ALL = sum(PERMISSION_NAMES)


@record(frozen=True)
class LockMode:
    """What an open holds and what it lets others hold at the same time (Permission bits)."""

    held: int
    shared: int
    force_share: bool = False  # qemu-img -U: shares everything whatever the user asks


_READ = Permission.CONSISTENT_READ
_QCOW2_SHARED = Permission.CONSISTENT_READ | Permission.WRITE_UNCHANGED

# As qemu-io and qemu-nbd take them. A format with metadata (qcow2) never lets others write or
# resize under it, even read-only, and holds resize when writable (it grows its file). Raw
# passes its user's permissions through and the user shares everything. -U (force share) still
# holds consistent read, as QEMU's does, and shares everything.
QCOW2_READ_WRITE = LockMode(_READ | Permission.WRITE | Permission.RESIZE, _QCOW2_SHARED)
QCOW2_READ_ONLY = LockMode(_READ, _QCOW2_SHARED)
RAW_READ_WRITE = LockMode(_READ | Permission.WRITE, ALL)
RAW_READ_ONLY = LockMode(_READ, ALL)
RAW_RESIZE = LockMode(_READ | Permission.WRITE | Permission.RESIZE, ALL)  # qemu-img resize
FORCE_SHARE = LockMode(_READ, ALL, force_share=True)


def mode_for(format: str, readonly: bool, force_share: bool = False) -> LockMode:
    """The lock mode of an open of a ``format`` image, as qemu-img would take it."""
    if force_share:
        return FORCE_SHARE
    if format == "qcow2":
        return QCOW2_READ_ONLY if readonly else QCOW2_READ_WRITE
    return RAW_READ_ONLY if readonly else RAW_READ_WRITE


# struct flock as the kernel reads it on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid
# (off_t is 64 bits; native alignment pads it as C does).
_FLOCK = struct.Struct("hhqqi4x")


# Answers meaning "this file (system) has no OFD locks", as QEMU treats them.
_UNSUPPORTED = {errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _fcntl_lock(fd: int, command: int, lock_type: int, start: int, length: int = 1) -> int:
    """One F_OFD_* call on [start, start+length); returns the l_type the kernel answered."""
    answer = fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0))
    lock_answered: int = _FLOCK.unpack(answer)[0]
    return lock_answered


def _bytes_of(perms: int, base: int) -> list[tuple[int, int]]:
    return [(p, base + p.bit_length() - 1) for p in PERMISSION_NAMES if p & perms]


def supported(fd: int) -> bool:
    """True if ``fd`` takes OFD locks (Linux, and a file system that has them)."""
    if not hasattr(fcntl, "F_OFD_GETLK"):
        return False
    try:
        _fcntl_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, 0, 0)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def _offsets(mode: LockMode) -> set[int]:
    """The bytes ``mode`` locks: what it holds and what it does not share."""
    held = _bytes_of(mode.held, PERM_BASE) + _bytes_of(ALL & ~mode.shared, SHARED_BASE)
    return {offset for _, offset in held}


def _apply(fd: int, mode: LockMode, previous: LockMode | None = None) -> None:
    """Read-lock ``mode``'s bytes; drop those only ``previous`` (the mode held so far) had."""
    for offset in sorted(_offsets(mode)):
        _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
    if previous is not None:
        for offset in sorted(_offsets(previous) - _offsets(mode)):
            _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)


def _restore(fd: int, previous: LockMode | None) -> None:
    unlock(fd)
    if previous is not None:
        _apply(fd, previous)


def _find_conflict(fd: int, mode: LockMode) -> tuple[int, bool] | None:
    """The first clash with another open, as (permission, we_unshare_it), or None.

    Checked in QEMU's order: what we hold against others' unshared bytes, then what we do not
    share against others' held bytes.
    """
    for perm, offset in _bytes_of(mode.held, SHARED_BASE):
        if _fcntl_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK:
            return perm, False
    for perm, offset in _bytes_of(ALL & ~mode.shared, PERM_BASE):
        if _fcntl_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK:
            return perm, True
    return None


def conflict_error(path: str, perm: int, unshared: bool) -> LockError:
    """qemu-img's two-line refusal for a clash on ``perm``."""
    kind = "shared " if unshared else ""
    name = PERMISSION_NAMES[perm]
    return LockError(
        f'Failed to get {kind}"{name}" lock\nIs another process using the image [{path}]?',
        path=path,
        permission=name,
    )


def lock(fd: int, path: str, mode: LockMode, previous: LockMode | None = None) -> bool:
    """Take ``mode``'s locks on ``fd`` (an image opened at ``path``).

    ``previous`` is the mode ``fd`` holds already, when changing it. Returns False, having done
    nothing, where OFD locks are unavailable. On a clash with another open, ``fd`` is put back
    as it was and :class:`LockError` is raised.
    """
    if not supported(fd):
        return False
    try:
        _apply(fd, mode, previous)
        clash = _find_conflict(fd, mode)
    except OSError as exc:
        _restore(fd, previous)
        if exc.errno in _UNSUPPORTED:
            return False
        raise LockError(f"Failed to lock the image: {exc.strerror}", path=path) from None
    if clash is not None:
        _restore(fd, previous)
        raise conflict_error(path, *clash)
    return True


def open_locked(path: str, flags: int, mode: LockMode) -> int:
    """``os.open(path, flags)`` holding ``mode``'s image locks (closing the fd unlocks)."""
    from .errors import from_oserror

    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        lock(fd, path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def export_mode(mode: LockMode) -> LockMode:
    """``mode`` as an NBD or ublk export takes it: the size it announced must stay, so nobody
    else may resize (qemu-nbd unshares resize even on raw). -U still shares everything."""
    if mode.force_share:
        return mode
    return LockMode(mode.held, mode.shared & ~Permission.RESIZE)


def lock_for_export(device: Any) -> None:
    """Narrow the locks of an open image to its ``export_mode``.

    Servers call it once after opening what they serve; devices that are not locked image
    files (memory, NBD client, zip member, or where locking was skipped) are left alone.
    """
    held = getattr(device, "lock_mode", None)
    if not isinstance(held, LockMode):
        return
    narrowed = export_mode(held)
    if narrowed != held:
        lock(device.fd, device.path, narrowed, previous=held)
        device.lock_mode = narrowed


def unlock(fd: int) -> None:
    """Drop every permission byte ``fd`` holds (closing the fd does the same)."""
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return
    for base in (PERM_BASE, SHARED_BASE):
        try:
            _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base, len(PERMISSION_NAMES))
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
