"""qcow2.compress: decompress clusters that ``qemu-img convert -c`` wrote, with either codec."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import zstandard

from oracles import needs_qemu, run
from vdisk.errors import CorruptImageError, UnsupportedFeatureError
from vdisk.qcow2 import Qcow2Image
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.compress import DEFLATE_WBITS, decompress_cluster

CLUSTER = 65536
TYPES = {"zlib": fmt.COMPRESSION_ZLIB, "zstd": fmt.COMPRESSION_ZSTD}


def _guest_data() -> bytes:
    rng = random.Random(7)
    clusters = [
        bytes(CLUSTER),  # all zeros: qemu-img leaves it unallocated
        b"vdisk compress " * (CLUSTER // 15) + b"x" * (CLUSTER % 15),
        bytes(rng.randrange(4) for _ in range(CLUSTER)),  # compressible noise
        rng.randbytes(CLUSTER),  # incompressible: stored uncompressed
        bytes(range(256)) * (CLUSTER // 256),
    ]
    return b"".join(clusters)


def _compressed_clusters(tmp_path: Path, ctype: str) -> list[tuple[int, bytes, bytes]]:
    """(guest cluster, compressed bytes as stored, guest data) for each compressed cluster."""
    raw = tmp_path / "guest.raw"
    data = _guest_data()
    raw.write_bytes(data)
    image = tmp_path / f"{ctype}.qcow2"
    run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"compression_type={ctype}", raw, image)  # fmt: skip
    out = []
    img = Qcow2Image.open(str(image), readonly=True)
    try:
        assert img.header.compression_type == TYPES[ctype]
        fd = os.open(image, os.O_RDONLY)
        try:
            for gc in range(len(data) // CLUSTER):
                entry, _bitmap = img.map.entry(gc)
                if not entry & fmt.OFLAG_COMPRESSED:
                    continue
                host, length = fmt.decode_compressed(entry, img.cluster_bits)
                stored = os.pread(fd, length, host)
                out.append((gc, stored, data[gc * CLUSTER : (gc + 1) * CLUSTER]))
        finally:
            os.close(fd)
    finally:
        img.close()
    return out


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_decompress_qemu_clusters(tmp_path: Path, ctype: str) -> None:
    clusters = _compressed_clusters(tmp_path, ctype)
    assert len(clusters) >= 3, "qemu-img should have compressed the compressible clusters"
    for gc, stored, want in clusters:
        got = decompress_cluster(stored, TYPES[ctype], CLUSTER)
        assert got == want, f"guest cluster {gc}"


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_damaged_cluster_is_corrupt(tmp_path: Path, ctype: str) -> None:
    # The noisiest cluster: its compressed data fills many sectors, so a cut loses data.
    stored = max((s for _gc, s, _want in _compressed_clusters(tmp_path, ctype)), key=len)
    with pytest.raises(CorruptImageError):
        decompress_cluster(stored[:64], TYPES[ctype], CLUSTER)
    with pytest.raises(CorruptImageError):
        decompress_cluster(b"\xff" * len(stored), TYPES[ctype], CLUSTER)


def test_output_is_bounded_by_the_cluster() -> None:
    # A stream that claims far more than a cluster yields one cluster, not all of it.
    huge = bytes(64 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, DEFLATE_WBITS)
    deflated = deflater.compress(huge) + deflater.flush()
    assert decompress_cluster(deflated, fmt.COMPRESSION_ZLIB, 4096) == bytes(4096)
    framed = zstandard.ZstdCompressor().compress(huge)
    assert decompress_cluster(framed, fmt.COMPRESSION_ZSTD, 4096) == bytes(4096)


def test_short_output_and_unknown_type() -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, DEFLATE_WBITS)
    short = deflater.compress(b"a" * 1000) + deflater.flush()
    with pytest.raises(CorruptImageError, match="1000 bytes"):
        decompress_cluster(short + bytes(512), fmt.COMPRESSION_ZLIB, 4096)
    with pytest.raises(UnsupportedFeatureError):
        decompress_cluster(b"", 7, 4096)
