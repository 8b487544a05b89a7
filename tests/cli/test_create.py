"""`vdisk create` against `qemu-img create`: same arguments, same output, equivalent images.

Each tool creates its image in its own directory under the same relative name, so the
``Formatting ...`` lines must be identical. The images are then compared with qemu-img itself:
`qemu-img info` field for field (only the disk size may differ: allocation is ours to choose),
`qemu-img check` clean, and `qemu-img compare` equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import Run, VdiskRunner, qemu_img

# (id, arguments after "create"); FILE is "img" plus an extension in the arguments.
CREATE_CASES: list[tuple[str, list[str]]] = [
    ("raw", ["-f", "raw", "img.raw", "10M"]),
    ("raw-default-format", ["img.raw", "1G"]),
    ("raw-falloc", ["-f", "raw", "-o", "preallocation=falloc", "img.raw", "4M"]),
    ("qcow2-default", ["-f", "qcow2", "img.qcow2", "1G"]),
    ("qcow2-v2", ["-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "100M"]),
    ("qcow2-v2-alias", ["-f", "qcow2", "-o", "compat=v2", "img.qcow2", "100M"]),
    ("qcow2-v3-alias", ["-f", "qcow2", "-o", "compat=v3", "img.qcow2", "100M"]),
    ("qcow2-512", ["-f", "qcow2", "-o", "cluster_size=512", "img.qcow2", "64M"]),
    ("qcow2-4k-suffix", ["-f", "qcow2", "-o", "cluster_size=4k", "img.qcow2", "1.5G"]),
    ("qcow2-2m", ["-f", "qcow2", "-o", "cluster_size=2M", "img.qcow2", "10G"]),
    ("qcow2-refcount1", ["-f", "qcow2", "-o", "refcount_bits=1", "img.qcow2", "1G"]),
    ("qcow2-refcount64", ["-f", "qcow2", "-o", "refcount_bits=64", "img.qcow2", "1G"]),
    (
        "qcow2-repeated-o",
        ["-f", "qcow2", "-o", "cluster_size=4k", "-o", "cluster_size=8k,refcount_bits=8", "img.qcow2", "1G"],
    ),
    ("qcow2-lazy", ["-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "1G"]),
    ("qcow2-lazy-bare", ["-f", "qcow2", "-o", "lazy_refcounts", "img.qcow2", "1G"]),
    ("qcow2-extl2", ["-f", "qcow2", "-o", "extended_l2=on", "img.qcow2", "1G"]),
    ("qcow2-zstd", ["-f", "qcow2", "-o", "compression_type=zstd", "img.qcow2", "1G"]),
    ("qcow2-prealloc-metadata", ["-f", "qcow2", "-o", "preallocation=metadata", "img.qcow2", "64M"]),
    ("qcow2-prealloc-falloc", ["-f", "qcow2", "-o", "preallocation=falloc", "img.qcow2", "8M"]),
    ("qcow2-prealloc-full", ["-f", "qcow2", "-o", "preallocation=full", "img.qcow2", "8M"]),
    ("qcow2-size-in-o", ["-f", "qcow2", "-o", "size=2M", "img.qcow2"]),
    ("qcow2-odd-size", ["-f", "qcow2", "img.qcow2", "12345"]),
    ("qcow2-4t", ["-f", "qcow2", "img.qcow2", "4T"]),
    ("qcow2-backing", ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"]),
    ("qcow2-backing-sized", ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "2G"]),
    ("qcow2-backing-raw", ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "img.qcow2"]),
    (
        "qcow2-backing-in-o",
        ["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "img.qcow2"],
    ),
    (
        "qcow2-backing-unsafe-missing",
        ["-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "img.qcow2", "1M"],
    ),
    ("qcow2-quiet", ["-q", "-f", "qcow2", "img.qcow2", "1M"]),
]

ERROR_CASES: list[tuple[str, list[str]]] = [
    ("no-size", ["-f", "qcow2", "img.qcow2"]),
    ("bad-size", ["-f", "qcow2", "img.qcow2", "12Q"]),
    ("extra-arg", ["-f", "qcow2", "img.qcow2", "1M", "extra"]),
    ("size-twice", ["-f", "qcow2", "-o", "size=2M", "img.qcow2", "3M"]),
    ("unknown-option", ["-f", "qcow2", "-o", "foo=bar", "img.qcow2", "1M"]),
    ("unknown-format", ["-f", "foo", "img.qcow2", "1M"]),
    ("bad-cluster-number", ["-f", "qcow2", "-o", "cluster_size=4k,,x", "img.qcow2", "1M"]),
    ("cluster-not-pow2", ["-f", "qcow2", "-o", "cluster_size=1000", "img.qcow2", "1M"]),
    ("cluster-too-big", ["-f", "qcow2", "-o", "cluster_size=4M", "img.qcow2", "1M"]),
    ("bad-bool", ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "img.qcow2", "1M"]),
    ("bad-number", ["-f", "qcow2", "-o", "refcount_bits=x", "img.qcow2", "1M"]),
    ("refcount-3", ["-f", "qcow2", "-o", "refcount_bits=3", "img.qcow2", "1M"]),
    ("refcount-128", ["-f", "qcow2", "-o", "refcount_bits=128", "img.qcow2", "1M"]),
    ("v2-refcount64", ["-f", "qcow2", "-o", "refcount_bits=64,compat=0.10", "img.qcow2", "1M"]),
    ("v2-lazy", ["-f", "qcow2", "-o", "lazy_refcounts=on,compat=0.10", "img.qcow2", "1M"]),
    ("v2-zstd", ["-f", "qcow2", "-o", "compression_type=zstd,compat=0.10", "img.qcow2", "1M"]),
    ("bad-compat", ["-f", "qcow2", "-o", "compat=2", "img.qcow2", "1M"]),
    ("bad-prealloc", ["-f", "qcow2", "-o", "preallocation=bad", "img.qcow2", "1M"]),
    ("bad-compression", ["-f", "qcow2", "-o", "compression_type=lz", "img.qcow2", "1M"]),
    ("extl2-small-cluster", ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "img.qcow2", "1M"]),
    ("backing-no-format", ["-f", "qcow2", "-b", "base.qcow2", "img.qcow2"]),
    ("backing-missing", ["-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "img.qcow2", "1M"]),
    ("backing-unsafe-no-size", ["-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "img.qcow2"]),
    ("raw-with-backing", ["-f", "raw", "-b", "base.qcow2", "-F", "qcow2", "img.raw"]),
    ("too-large", ["-f", "qcow2", "img.qcow2", "1E"]),
    ("data-file-raw-alone", ["-f", "qcow2", "-o", "data_file_raw=on", "img.qcow2", "1M"]),
    ("data-file-v2", ["-f", "qcow2", "-o", "data_file=d.raw,compat=0.10", "img.qcow2", "1M"]),
    (
        "data-file-raw-backing",
        ["-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    ),
    ("no-file", ["-f", "qcow2"]),
]


def _setup_dir(d: Path) -> Path:
    d.mkdir()
    assert qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "256M"], d).rc == 0
    assert qemu_img(["create", "-q", "-f", "raw", "base.raw", "300M"], d).rc == 0
    return d


def _image_name(args: list[str]) -> str | None:
    return next((a for a in args if a.startswith("img.")), None)


def _info_without_disk_size(name: str, d: Path) -> dict[str, object]:
    run = qemu_img(["info", "--output=json", name], d)
    assert run.rc == 0, run.err
    info: dict[str, object] = json.loads(run.out)
    info.pop("actual-size", None)
    return info


@pytest.mark.parametrize("args", [a for _, a in CREATE_CASES], ids=[i for i, _ in CREATE_CASES])
def test_create_matches_qemu_img(args: list[str], tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    ours_dir, theirs_dir = _setup_dir(tmp_path / "vdisk"), _setup_dir(tmp_path / "qemu")
    ours: Run = vdisk_cli(["create", *args], ours_dir)
    theirs = qemu_img(["create", *args], theirs_dir)
    assert theirs.rc == 0, theirs.err
    assert ours.rc == 0, ours.err
    assert ours.out == theirs.out
    name = _image_name(args)
    assert name is not None
    assert _info_without_disk_size(name, ours_dir) == _info_without_disk_size(name, theirs_dir)
    # And our info of our image is qemu-img's info of it, byte for byte.
    for output in ("human", "json"):
        mine = vdisk_cli(["info", f"--output={output}", name], ours_dir)
        oracle = qemu_img(["info", f"--output={output}", name], ours_dir)
        assert (mine.rc, mine.out) == (oracle.rc, oracle.out), mine.err + oracle.err
    fmt = "raw" if name.endswith(".raw") else "qcow2"
    if fmt == "qcow2" and "-u" not in args:  # check opens the (missing) backing file
        check = qemu_img(["check", "--output=json", name], ours_dir)
        assert check.rc == 0, check.out + check.err
        report = json.loads(check.out)
        assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    if "-u" not in args:
        compare = qemu_img(
            ["compare", "-f", fmt, "-F", fmt, str(ours_dir / name), str(theirs_dir / name)],
            tmp_path,
        )
        assert compare.rc == 0, compare.out + compare.err


@pytest.mark.parametrize("args", [a for _, a in ERROR_CASES], ids=[i for i, _ in ERROR_CASES])
def test_create_errors_like_qemu_img(
    args: list[str], tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    ours_dir, theirs_dir = _setup_dir(tmp_path / "vdisk"), _setup_dir(tmp_path / "qemu")
    ours = vdisk_cli(["create", *args], ours_dir)
    theirs = qemu_img(["create", *args], theirs_dir)
    assert theirs.rc == 1, theirs.out
    assert ours.rc == 1, ours.out
    # qemu-img prints its Formatting line before the format driver's own checks fail.
    assert ours.out == theirs.out
    assert len(ours.err.splitlines()) == 1 and ours.err.startswith("vdisk: "), ours.err
    assert "Traceback" not in ours.err


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "-o", "help"],
        ["-f", "qcow2", "-o", "?"],
        ["-f", "raw", "-o", "help"],
        ["-o", "help"],
        ["-f", "raw", "-o", "help", "img.raw"],
    ],
    ids=["qcow2-help", "qcow2-question", "raw-help", "default-format-help", "raw-help-file"],
)
def test_option_help_lines_are_qemu_lines(
    args: list[str], tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    """We list the options we implement; each line is exactly qemu-img's line for it."""
    ours = vdisk_cli(["create", *args], tmp_path)
    theirs = qemu_img(["create", *args], tmp_path)
    assert (ours.rc, theirs.rc) == (0, 0), ours.err
    ours_lines, theirs_lines = ours.out.splitlines(), theirs.out.splitlines()
    assert ours_lines[0] == theirs_lines[0]
    assert set(ours_lines) <= set(theirs_lines), set(ours_lines) - set(theirs_lines)
    assert ours.out.endswith(theirs.out[theirs.out.rfind("\n\n") :] if "\n\n" in theirs.out else "")
    assert not list(tmp_path.iterdir())


def test_created_image_takes_data(tmp_path: Path, vdisk_cli: VdiskRunner) -> None:
    """A vdisk-made qcow2 is writable by QEMU and reads back what QEMU wrote."""
    import subprocess

    assert vdisk_cli(["create", "-q", "-f", "qcow2", "img.qcow2", "64M"], tmp_path).rc == 0
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x7e 1M 3M", "img.qcow2"], cwd=tmp_path, check=True,
        capture_output=True,
    )  # fmt: skip
    check = qemu_img(["check", "img.qcow2"], tmp_path)
    assert check.rc == 0, check.out
    import vdisk

    with vdisk.open(str(tmp_path / "img.qcow2"), readonly=True) as dev:
        assert dev.pread(3 << 20, 1 << 20) == b"\x7e" * (3 << 20)  # type: ignore[attr-defined]


DATA_FILE_CASES: list[tuple[str, list[str]]] = [
    ("data-file", ["-o", "data_file=img.data"]),
    ("data-file-raw", ["-o", "data_file=img.data,data_file_raw=on"]),
    ("data-file-raw-off", ["-o", "data_file=img.data,data_file_raw=off"]),
    ("data-file-metadata", ["-o", "data_file=img.data,preallocation=metadata"]),
    ("data-file-full", ["-o", "data_file=img.data,preallocation=full"]),
    ("data-file-extl2", ["-o", "data_file=img.data,extended_l2=on"]),
    ("data-file-4k-raw", ["-o", "cluster_size=4k", "-o", "data_file=img.data,data_file_raw=on"]),
]


@pytest.mark.parametrize(
    "opts", [a for _, a in DATA_FILE_CASES], ids=[i for i, _ in DATA_FILE_CASES]
)
def test_create_data_file_matches_qemu_img(
    opts: list[str], tmp_path: Path, vdisk_cli: VdiskRunner
) -> None:
    """Both tools make the image and its data file (relative to the working directory, as
    qemu-img does): the same Formatting line, the same bytes, the same info."""
    ours_dir, theirs_dir = _setup_dir(tmp_path / "vdisk"), _setup_dir(tmp_path / "qemu")
    args = ["create", "-f", "qcow2", *opts, "img.qcow2", "64M"]
    ours, theirs = vdisk_cli(args, ours_dir), qemu_img(args, theirs_dir)
    assert (ours.rc, theirs.rc) == (0, 0), ours.err + theirs.err
    assert ours.out == theirs.out
    for name in ("img.qcow2", "img.data"):
        assert (ours_dir / name).read_bytes() == (theirs_dir / name).read_bytes(), name
    for output in ("human", "json"):
        mine = vdisk_cli(["info", f"--output={output}", "img.qcow2"], ours_dir)
        oracle = qemu_img(["info", f"--output={output}", "img.qcow2"], ours_dir)
        assert (mine.rc, mine.out) == (oracle.rc, oracle.out), mine.err + oracle.err
    check = qemu_img(["check", "--output=json", "img.qcow2"], ours_dir)
    assert check.rc == 0, check.out + check.err
    compare = qemu_img(["compare", "img.qcow2", "img.data"], ours_dir)
    assert compare.rc == 0, compare.out + compare.err


@pytest.mark.parametrize("size", ["0", "1000", "3000", "5000", "64M"])
def test_create_raw_layout_like_qemu(tmp_path: Path, vdisk_cli: VdiskRunner, size: str) -> None:
    """A new raw file: QEMU's size (whole sectors) and its written first block, so that
    `qemu-img map` and the file sizes agree."""
    assert vdisk_cli(["create", "-q", "-f", "raw", "ours.raw", size], tmp_path).rc == 0
    assert qemu_img(["create", "-q", "-f", "raw", "theirs.raw", size], tmp_path).rc == 0
    maps = [
        qemu_img(["map", "-f", "raw", "--output=json", name], tmp_path).out
        for name in ("ours.raw", "theirs.raw")
    ]
    assert maps[0] == maps[1]
    assert (tmp_path / "ours.raw").stat().st_size == (tmp_path / "theirs.raw").stat().st_size
