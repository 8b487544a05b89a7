"""How a ublk queue lays out its io_uring, shared by the queue and the targets that put their
own ops on that ring (``file_target``).

- Each tag owns two SQE slots: ``2 * tag`` for a target's op on the backing file, ``2 * tag + 1``
  for the tag's ublk command (see ``Queue._build_templates`` for why they are fixed).
- A CQE's ``user_data`` is ``kind << KIND_SHIFT | tag``.
- Registered file 0 is the char device, 1 the backing file (if any).
"""

from __future__ import annotations

import struct

from ..uring import ops

KIND_SHIFT = 16
TAG_MASK = 0xFFFF
CMD = 0  # FETCH_REQ, COMMIT_AND_FETCH_REQ or NEED_GET_DATA of a tag
RETRY = 1  # a commit re-issued from the queue thread after the kernel refused its linked twin
BACKING = 2  # an unlinked op on the backing file (its commit follows its CQE), or a probe
LINKED_BACKING = 3  # READ or WRITE linked to its commit: a CQE only on failure or short I/O
EXTENT = 4  # READ or WRITE at a host extent (extent_target), linked to its commit: always a CQE
RING_RW = 5  # READ or WRITE the compiled loop queued unlinked; it commits a full one itself

CDEV_SLOT = 0
BACKING_SLOT = 1

SQE_SIZE = 64

# Fields patched into SQE templates: off, addr, len, rw_flags at byte 8; io_cmd.result.
SQE_IO = struct.Struct("<QQII")
SQE_IO_OFFSET = 8
SQE_RESULT = struct.Struct("<i")
RESULT_OFFSET = ops.CMD_OFFSET + 4


def backing_slot(tag: int) -> int:
    """The SQE slot of ``tag``'s op on the backing file."""
    return 2 * tag


def command_slot(tag: int) -> int:
    """The SQE slot of ``tag``'s ublk command."""
    return 2 * tag + 1
