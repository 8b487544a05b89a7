"""Images QEMU left dirty with lazy refcounts: read right read-only, repaired read-write.

qemu-io writes to a lazy_refcounts=on image and is killed (``sigraise 9``) before it can flush
its refcounts, so the file carries the dirty bit and `qemu-img check` finds refcount errors.
vdisk must read it exactly as `qemu-img convert` does without touching it, and opening it
read-write must rebuild the refcounts: `qemu-img check` clean, dirty bit clear, same contents.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import vdisk
from oracles import assert_check_clean, needs_qemu, qemu_to_raw

pytestmark = [needs_qemu, pytest.mark.timeout(120)]

WRITES = [
    "write -P 0x5a 0 1M",
    "write -P 0x11 5M 300k",
    "write -P 0x22 7340544 4097",  # unaligned, crossing clusters
    "write -z 512k 128k",
    "write -P 0x33 15M 1M",
]


def _dirty_image(path: Path, options: str, backing: Path | None = None) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts=on,{options}"]
    if backing is not None:
        cmd += ["-b", backing.name, "-F", "qcow2"]
    subprocess.run([*cmd, str(path), "16M"], check=True, capture_output=True)
    args = ["qemu-io"]
    for command in [*WRITES, "sigraise 9"]:
        args += ["-c", command]
    proc = subprocess.run([*args, str(path)], capture_output=True, check=False)
    assert proc.returncode == -9, proc  # killed: no clean shutdown


def _dirty_flag(path: Path) -> bool:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return bool(json.loads(out)["dirty-flag"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "options",
    ["cluster_size=65536", "cluster_size=4096", "cluster_size=512,refcount_bits=1",
     "cluster_size=65536,refcount_bits=64", "cluster_size=65536,extended_l2=on"],
    ids=["c64k", "c4k", "c512-r1", "c64k-r64", "c64k-extl2"],
)  # fmt: skip
def test_dirty_lazy_image(tmp_path: Path, options: str) -> None:
    image = tmp_path / "dirty.qcow2"
    _dirty_image(image, options)
    assert _dirty_flag(image)
    # The oracle's view of the contents (convert opens read-only and does not repair).
    expected = qemu_to_raw(image, tmp_path / "expected.raw")
    digest = _sha(image)

    with vdisk.open(str(image), readonly=True) as dev:
        got = dev.pread(dev.size, 0)  # type: ignore[attr-defined]
    assert got == expected
    assert _sha(image) == digest, "a read-only open modified the file"

    with vdisk.open(str(image)) as dev:
        assert dev.pread(dev.size, 0) == expected  # type: ignore[attr-defined]
    assert not _dirty_flag(image)
    assert_check_clean(image)
    assert qemu_to_raw(image, tmp_path / "after.raw") == expected


def test_dirty_lazy_image_then_write(tmp_path: Path) -> None:
    """After the repair the image is fully usable: new writes allocate without collisions."""
    image = tmp_path / "dirty.qcow2"
    _dirty_image(image, "cluster_size=4096")
    expected = bytearray(qemu_to_raw(image, tmp_path / "expected.raw"))
    with vdisk.open(str(image)) as dev:
        for i in range(64):
            offset = (i * 257 * 1024) % (dev.size - 8192)
            data = bytes([i + 1]) * 8192
            dev.write(data, offset)
            expected[offset : offset + len(data)] = data
    assert_check_clean(image)
    assert qemu_to_raw(image, tmp_path / "after.raw") == expected


def test_dirty_lazy_overlay_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True
    )
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x77 0 16M", str(base)], check=True, capture_output=True
    )
    base_digest = _sha(base)
    image = tmp_path / "top.qcow2"
    _dirty_image(image, "cluster_size=65536", backing=base)
    expected = qemu_to_raw(image, tmp_path / "expected.raw")
    with vdisk.open(str(image), readonly=True) as dev:
        assert dev.pread(dev.size, 0) == expected  # type: ignore[attr-defined]
    with vdisk.open(str(image)) as dev:
        dev.flush()
    assert not _dirty_flag(image)
    assert_check_clean(image)
    assert _sha(base) == base_digest  # the backing file is opened read-only
    assert qemu_to_raw(image, tmp_path / "after.raw") == expected
