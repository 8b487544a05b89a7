"""A pure-Python io_uring (ctypes and mmap, no compiler): rings in ``ring``, SQE builders in
``ops``."""

from .ring import Ring, UringError

__all__ = ["Ring", "UringError"]
