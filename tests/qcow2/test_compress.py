"""qcow2.compress and compressed writes: decompress clusters that ``qemu-img convert -c``
wrote, with either codec; write them (``Qcow2Image.write_compressed``, ``compress=True``) so
that qemu-img check, compare and qemu-io agree."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import assert_check_clean, assert_compare_equal, needs_qemu, qemu_io, run
from vdisk.errors import (
    CorruptImageError,
    ReadOnlyError,
    RequestError,
    UnsupportedFeatureError,
)
from vdisk.qcow2 import Qcow2Image, compress
from vdisk.qcow2 import format as fmt
from vdisk.qcow2.compress import (
    DEFLATE_WBITS,
    compress_cluster,
    compress_many,
    decompress_cluster,
    decompress_into,
    decompress_many,
    decompress_many_into,
)

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


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("inflater", ["best", "zlib"])
def test_decompress_into_qemu_clusters(
    tmp_path: Path, ctype: str, inflater: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Straight into a slice of a bigger buffer: exactly the cluster's bytes, its neighbours
    # untouched; deflate with zlib too (vdisk without isal installed).
    if inflater == "zlib":
        monkeypatch.setattr(compress, "_fast_zlib", zlib)
    clusters = _compressed_clusters(tmp_path, ctype)
    buf = bytearray(b"\xaa" * (CLUSTER * (len(clusters) + 2)))
    outs = [memoryview(buf)[(i + 1) * CLUSTER : (i + 2) * CLUSTER] for i in range(len(clusters))]
    decompress_many_into([s for _gc, s, _w in clusters], TYPES[ctype], outs)
    assert buf[:CLUSTER] == buf[-CLUSTER:] == b"\xaa" * CLUSTER
    for (gc, _stored, want), out in zip(clusters, outs, strict=True):
        assert out == want, f"guest cluster {gc}"
    stored = max((s for _gc, s, _want in clusters), key=len)
    for damaged in (stored[:64], b"\xff" * len(stored)):
        with pytest.raises(CorruptImageError):
            decompress_into(damaged, TYPES[ctype], outs[0])


def test_zstd_into_odd_frames() -> None:
    # Only a frame that declares exactly one cluster decodes in place; padding after it is
    # ignored; others take the bounded one-by-one way, with the same outcome.
    rng = random.Random(4)
    cs = 65536
    data = _compressible(rng, cs)
    out = memoryview(bytearray(cs))
    for frame, want in (
        (zstandard.ZstdCompressor().compress(data) + bytes(300), data),
        (zstandard.ZstdCompressor(write_content_size=False).compress(data), data),
        (zstandard.ZstdCompressor().compress(bytes(4 * cs)), bytes(cs)),
    ):
        decompress_into(frame, fmt.COMPRESSION_ZSTD, out)
        assert out == want
    with pytest.raises(CorruptImageError):
        decompress_into(zstandard.ZstdCompressor().compress(data[:1000]), fmt.COMPRESSION_ZSTD, out)


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_read_many_compressed_clusters(tmp_path: Path, ctype: str) -> None:
    # A read over many compressed clusters decodes them in place (aligned or not); one
    # damaged cluster among them is named by its host offset.
    rng = random.Random(5)
    data = b"".join(_compressible(rng, CLUSTER) for _ in range(12))
    raw = tmp_path / "guest.raw"
    raw.write_bytes(data)
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"compression_type={ctype}", raw, image)  # fmt: skip
    with Qcow2Image.open(str(image), readonly=True) as img:
        assert img.pread(len(data), 0) == data
        assert img.pread(len(data) - 1000, 500) == data[500:-500]
        entry, _bitmap = img.map.entry(5)
        host, length = fmt.decode_compressed(entry, img.cluster_bits)
    with open(image, "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * length)
    with Qcow2Image.open(str(image), readonly=True) as img:
        assert img.pread(5 * CLUSTER, 0) == data[: 5 * CLUSTER]
        with pytest.raises(CorruptImageError, match=f"compressed cluster at {host:#x}"):
            img.pread(len(data), 0)


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


# -- compressed writes ------------------------------------------------------------------------
def _compressible(rng: random.Random, n: int) -> bytes:
    """Text-like data: words from a small vocabulary (shrinks well, never all zeros)."""
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(40)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def _mixed(rng: random.Random, clusters: int, cs: int) -> bytes:
    """Per cluster: text, zeros, random (incompressible) or small-alphabet noise."""
    parts = []
    for i in range(clusters):
        kind = i % 4
        if kind == 0:
            parts.append(_compressible(rng, cs))
        elif kind == 1:
            parts.append(bytes(cs))
        elif kind == 2:
            parts.append(rng.randbytes(cs))
        else:
            parts.append(bytes(rng.randrange(4) for _ in range(cs)))
    return b"".join(parts)


def _create(path: Path, size: int, cs: int, ctype: str = "zlib", extra: str = "") -> None:
    opts = f"cluster_size={cs},compression_type={ctype}" + (f",{extra}" if extra else "")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, str(size))


def _kinds(path: Path, clusters: int) -> list[str]:
    with Qcow2Image.open(str(path), readonly=True) as img:
        out = []
        for gc in range(clusters):
            e, _bm = img.map.entry(gc)
            out.append("c" if e & fmt.OFLAG_COMPRESSED else "d" if e else "-")
        return out


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 << 20])
def test_write_compressed_qemu_agrees(tmp_path: Path, ctype: str, cs: int) -> None:
    clusters = 8 if cs < (2 << 20) else 4
    # The last cluster is short (as the image end allows) where the cluster size permits.
    size = clusters * cs - (512 if cs > 512 else 0)
    data = _mixed(random.Random(cs), clusters, cs)[:size]
    image, raw = tmp_path / "c.qcow2", tmp_path / "c.raw"
    _create(image, size, cs, ctype)
    raw.write_bytes(data)
    with Qcow2Image.open(str(image)) as img:
        half = (clusters // 2) * cs
        assert img.write_compressed(data[:half], 0) == half
        img.write_compressed(data[half:], half)
        assert img.pread(size, 0) == data
    assert_check_clean(image)
    assert_compare_equal(image, raw)
    kinds = _kinds(image, clusters)
    # Random clusters do not shrink: stored as normal data; everything else compressed.
    assert kinds == ["d" if i % 4 == 2 else "c" for i in range(clusters)], kinds
    # QEMU reads every cluster back (qemu-io verifies a pattern-free read by comparing).
    out = qemu_io(image, f"read -v 0 {min(size, 512)}")
    assert "read" in out


@needs_qemu
def test_same_bytes_as_qemu_io(tmp_path: Path) -> None:
    # Cluster by cluster, qemu-io's `write -c` and ours pack the same bytes at the same
    # offsets: the files agree but for our zero padding to the last sector's end. (Deflate
    # only: QEMU streams zstd, whose output may differ from the one-shot frame by a byte.)
    ctype = "zlib"
    cs, clusters = 4096, 16
    data = _mixed(random.Random(5), clusters, cs)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _create(ours, clusters * cs, cs, ctype)
    _create(theirs, clusters * cs, cs, ctype)
    cmds = []
    for i in range(clusters):
        piece = tmp_path / f"p{i}"
        piece.write_bytes(data[i * cs : (i + 1) * cs])
        cmds += ["-c", f"write -c -s {piece} {i * cs} {cs}"]
    run("qemu-io", "-f", "qcow2", *cmds, theirs)
    with Qcow2Image.open(str(ours)) as img:
        for i in range(clusters):
            img.write_compressed(data[i * cs : (i + 1) * cs], i * cs)
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == (len(b) + 511) // 512 * 512
    assert a[: len(b)] == b and not any(a[len(b) :])


@needs_qemu
def test_packing_refcounts_and_frees(tmp_path: Path) -> None:
    cs, clusters = 4096, 24
    rng = random.Random(11)
    data = bytearray(b"".join(_compressible(rng, cs) for _ in range(clusters)))
    image, raw = tmp_path / "p.qcow2", tmp_path / "p.raw"
    _create(image, clusters * cs, cs)
    with Qcow2Image.open(str(image)) as img:
        img.write_compressed(bytes(data), 0)
        img.flush()
        touched: dict[int, int] = {}
        for gc in range(clusters):
            e, _bm = img.map.entry(gc)
            assert e & fmt.OFLAG_COMPRESSED
            for c in fmt.compressed_host_clusters(e, img.cluster_bits):
                touched[c] = touched.get(c, 0) + 1
        # Packed: fewer host clusters than guest clusters, several sharing one.
        assert len(touched) < clusters // 2 and max(touched.values()) >= 3
        assert all(img.refcounts.get(c) == n for c, n in touched.items())
    assert_check_clean(image)
    # Overwrite part of one compressed cluster, all of another, discard a third.
    with Qcow2Image.open(str(image)) as img:
        img.write(b"\xab" * 1000, 5 * cs + 100)
        data[5 * cs + 100 : 5 * cs + 1100] = b"\xab" * 1000
        img.write(b"\xcd" * cs, 9 * cs)
        data[9 * cs : 10 * cs] = b"\xcd" * cs
        img.discard(13 * cs, cs)
        data[13 * cs : 14 * cs] = bytes(cs)
    assert _kinds(image, clusters)[5] == "d" and _kinds(image, clusters)[9] == "d"
    raw.write_bytes(bytes(data))
    assert_check_clean(image)  # no leak: every touched host cluster lost its reference
    assert_compare_equal(image, raw)


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_qemu_io_over_ours_and_ours_over_qemu(tmp_path: Path, ctype: str) -> None:
    cs, clusters = 65536, 6
    rng = random.Random(3)
    data = bytearray(b"".join(_compressible(rng, cs) for _ in range(clusters)))
    image, raw = tmp_path / "x.qcow2", tmp_path / "x.raw"
    _create(image, clusters * cs, cs, ctype)
    with Qcow2Image.open(str(image)) as img:
        img.write_compressed(bytes(data[: 3 * cs]), 0)
    # QEMU writes into and compresses over what we compressed.
    qemu_io(image, f"write -P 0x11 {cs + 4096} 4096", f"write -c -P 0x22 {3 * cs} {cs}")
    data[cs + 4096 : cs + 8192] = b"\x11" * 4096
    data[3 * cs : 4 * cs] = b"\x22" * cs
    assert_check_clean(image)
    # We write into QEMU's compressed cluster and compress over the rest.
    with Qcow2Image.open(str(image)) as img:
        img.write(b"\x33" * 512, 3 * cs + 512)
        data[3 * cs + 512 : 3 * cs + 1024] = b"\x33" * 512
        img.write_compressed(bytes(data[4 * cs :]), 4 * cs)
        img.write_compressed(bytes(data[2 * cs : 3 * cs]), 2 * cs)  # over our own
    raw.write_bytes(bytes(data))
    assert_check_clean(image)
    assert_compare_equal(image, raw)
    assert _kinds(image, clusters) == ["c", "d", "c", "d", "c", "c"]


@needs_qemu
def test_open_with_compress(tmp_path: Path) -> None:
    cs = 4096
    rng = random.Random(8)
    data = bytearray(_compressible(rng, 8 * cs))
    image, raw = tmp_path / "o.qcow2", tmp_path / "o.raw"
    _create(image, 8 * cs, cs, "zstd")
    with Qcow2Image.open(str(image), compress=True) as img:
        img.write(bytes(data[: 4 * cs]), 0)  # whole clusters: compressed
        img.write(bytes(data[5 * cs + 512 : 7 * cs]), 5 * cs + 512)  # head partial
    raw.write_bytes(
        bytes(data[: 4 * cs]) + bytes(cs + 512) + bytes(data[5 * cs + 512 : 7 * cs]) + bytes(cs)
    )
    assert _kinds(image, 8) == ["c", "c", "c", "c", "-", "d", "c", "-"]
    assert_check_clean(image)
    assert_compare_equal(image, raw)


def test_refusals(tmp_path: Path) -> None:
    from vdisk.qcow2 import create

    image = tmp_path / "r.qcow2"
    create(str(image), 1 << 20, cluster_size=4096)
    with Qcow2Image.open(str(image)) as img:
        with pytest.raises(RequestError, match="aligned"):
            img.write_compressed(bytes(4096), 512)
        with pytest.raises(RequestError, match="whole clusters"):
            img.write_compressed(bytes(1024), 0)
        img.header.incompatible_features |= fmt.INCOMPAT_DATA_FILE
        with pytest.raises(UnsupportedFeatureError, match="Operation not supported"):
            img.write_compressed(bytes(4096), 0)
        img.header.incompatible_features &= ~fmt.INCOMPAT_DATA_FILE
        img.header.crypt_method = fmt.CRYPT_LUKS
        with pytest.raises(UnsupportedFeatureError, match="encryption"):
            img.write_compressed(bytes(4096), 0)
        img.header.crypt_method = 0
    with Qcow2Image.open(str(image), readonly=True) as img, pytest.raises(ReadOnlyError):
        img.write_compressed(bytes(4096), 0)


def test_codec_pool_matches_serial() -> None:
    rng = random.Random(2)
    cs = 65536
    clusters = [_compressible(rng, cs) for _ in range(6)] + [rng.randbytes(cs), b"abc"]
    for ctype in TYPES.values():
        blobs = compress_many(clusters, ctype, cs)
        assert blobs == [compress_cluster(c, ctype, cs) for c in clusters]
        assert blobs[6] is None  # random data does not shrink
        packed = [b for b in blobs if b is not None]
        want = [c.ljust(cs, b"\0") for c, b in zip(clusters, blobs, strict=True) if b]
        assert decompress_many(packed, ctype, cs) == want


def test_zstd_batch_padding_and_odd_frames() -> None:
    # The batched zstd path: sector padding after each frame is ignored, and a batch with a
    # frame of another size (or none declared) goes the one-by-one way, bounded as before.
    rng = random.Random(3)
    cs = 65536
    zstd = zstandard.ZstdCompressor()
    data = [_compressible(rng, cs) for _ in range(5)]
    padded = [zstd.compress(d) + bytes(300) for d in data]
    assert decompress_many(padded, fmt.COMPRESSION_ZSTD, cs) == data
    huge = zstd.compress(bytes(4 * cs))
    assert decompress_many([*padded, huge], fmt.COMPRESSION_ZSTD, cs)[-1] == bytes(cs)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(data[0])
    assert decompress_many([*padded, unsized], fmt.COMPRESSION_ZSTD, cs)[-1] == data[0]
    with pytest.raises(CorruptImageError):
        decompress_many([*padded, padded[0][:100]], fmt.COMPRESSION_ZSTD, cs)


# Ops: (kind, cluster, sectors or length in clusters, seed)
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["wc", "w", "z", "d", "f", "r"]),
        st.integers(0, 15),
        st.integers(1, 4),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=14,
)


@needs_qemu
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_OPS, ctype=st.sampled_from(["zlib", "zstd"]))
def test_op_mix_with_compressed_writes(tmp_path: Path, ops: list, ctype: str) -> None:
    cs, clusters = 4096, 16
    size = clusters * cs
    image = tmp_path / f"m-{ctype}.qcow2"
    image.unlink(missing_ok=True)
    _create(image, size, cs, ctype)
    model = bytearray(size)
    img = Qcow2Image.open(str(image))
    try:
        for kind, gc, n, seed in ops:
            rng = random.Random(seed)
            off = gc * cs
            if kind == "wc":
                n = min(n, clusters - gc)
                buf = _compressible(rng, n * cs) if seed % 5 else rng.randbytes(n * cs)
                img.write_compressed(buf, off)
                model[off : off + len(buf)] = buf
            elif kind == "w":
                off += rng.randrange(8) * 512
                length = min(n * 512 * 3, size - off)
                buf = rng.randbytes(length)
                img.write(buf, off)
                model[off : off + length] = buf
            elif kind in "zd":
                length = min(n * cs, size - off)
                if kind == "z":
                    img.write_zeroes(off, length)
                else:
                    img.discard(off, length)
                model[off : off + length] = bytes(length)
            elif kind == "f":
                img.flush()
            else:
                img.close()
                img = Qcow2Image.open(str(image))
            assert img.pread(size, 0) == model
    finally:
        img.close()
    raw = tmp_path / f"m-{ctype}.raw"
    raw.write_bytes(bytes(model))
    assert_check_clean(image)
    assert_compare_equal(image, raw)


@needs_qemu
def test_freed_host_cluster_is_not_packed_into(tmp_path: Path) -> None:
    # Two compressed clusters share host cluster H; both go, H is freed at the flush and
    # reused for plain data: the next compressed write must not land in H's free bytes.
    cs = 4096
    rng = random.Random(21)
    image, raw = tmp_path / "f.qcow2", tmp_path / "f.raw"
    _create(image, 8 * cs, cs)
    data = bytearray(8 * cs)
    with Qcow2Image.open(str(image)) as img:
        img.write_compressed(_compressible(rng, 2 * cs), 0)
        (e0, _), (e1, _) = img.map.entry(0), img.map.entry(1)
        shared = set(fmt.compressed_host_clusters(e0, 12)) & set(
            fmt.compressed_host_clusters(e1, 12)
        )
        assert shared
        img.discard(0, 2 * cs)
        img.flush()
        plain = rng.randbytes(cs)
        img.write(plain, 4 * cs)
        data[4 * cs : 5 * cs] = plain
        host = img.map.entry(4)[0] & fmt.L2E_OFFSET_MASK
        assert host >> 12 in shared  # the allocator reused H
        more = _compressible(rng, cs)
        img.write_compressed(more, 6 * cs)
        data[6 * cs : 7 * cs] = more
        assert img.pread(8 * cs, 0) == data
    raw.write_bytes(bytes(data))
    assert_check_clean(image)
    assert_compare_equal(image, raw)


@needs_qemu
@pytest.mark.parametrize("extra", ["extended_l2=on", "refcount_bits=1", "refcount_bits=2"])
def test_compressed_writes_other_layouts(tmp_path: Path, extra: str) -> None:
    # Extended L2 (compressed entries carry no subcluster bitmap); a refcount limit of 1
    # (no host cluster shared) or 3 (at most three clusters share one).
    cs = 65536 if extra.startswith("extended") else 4096
    rng = random.Random(9)
    data = bytearray(_compressible(rng, 16 * cs))
    image, raw = tmp_path / "l.qcow2", tmp_path / "l.raw"
    _create(image, 16 * cs, cs, extra=extra)
    with Qcow2Image.open(str(image)) as img:
        img.write_compressed(bytes(data[: 12 * cs]), 0)
        img.write(b"\x5a" * 512, 2 * cs + 1024)
        data[2 * cs + 1024 : 2 * cs + 1536] = b"\x5a" * 512
        # Not in one call: the second and fourth prepared clusters are not neighbours.
        prepared = img.prepare_compressed(bytes(data[12 * cs :]), 12 * cs)
        img.write_prepared([prepared[0], prepared[2], prepared[1], prepared[3]])
    raw.write_bytes(bytes(data))
    assert_check_clean(image)
    assert_compare_equal(image, raw)
    assert _kinds(image, 16).count("c") == 15
