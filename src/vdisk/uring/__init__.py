"""A pure-Python io_uring (ctypes and mmap, no compiler): rings in ``ring``, SQE builders in
``ops``."""

from .ring import Ring, UringError

__all__ = ["Ring", "UringError", "available"]


def available() -> bool:
    """True if this kernel lets us set up an io_uring (containers and old kernels may not)."""
    try:
        Ring(2).close()
    except UringError:
        return False
    return True
