"""Start-up: ``vdisk --help`` and ``vdisk info`` import none of the heavy modules, the quick
commands (``--version``, ``--help``, ``info``) load not even click or typing and answer byte for
byte as the click tree does, the lazy command table agrees with the commands, and a bare
``vdisk`` / ``--version`` behave as qemu-img's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import VdiskRunner, qemu_img

import vdisk
from vdisk.cli import COMMAND_TABLE, cli

HEAVY = (
    "numpy",
    "zstandard",
    "isal",
    "cryptography",
    "prometheus_client",
    "tqdm",
    "importlib.metadata",
)
# What the quick commands must not load either: each costs a good part of a bare start.
STDLIB_HEAVY = (
    "click",
    "typing",
    "typing_extensions",
    "re",
    "dataclasses",
    "inspect",
    "enum",
    "ctypes",
    "json",
    "datetime",
    "threading",
)

_PROBE = """
import contextlib, io, sys
from vdisk.cli import main
for argv in ({argvs}):
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    assert rc == 0, (argv, rc)
print(",".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _loaded_heavy_modules(*argvs: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    code = _PROBE.format(argvs="".join(f"{a!r}, " for a in argvs), heavy=heavy)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in proc.stdout.strip().split(",") if m]


def test_help_imports_no_heavy_module() -> None:
    assert _loaded_heavy_modules(["--help"]) == []


def test_version_imports_no_heavy_module() -> None:
    assert _loaded_heavy_modules(["--version"]) == []


def test_info_raw_imports_no_heavy_module(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * 65536)
    assert _loaded_heavy_modules(["info", str(raw)], ["--help"]) == []


def test_info_qcow2_imports_no_heavy_module(tmp_path: Path) -> None:
    """`vdisk info` on a qcow2 image (with a snapshot and a bitmap, which it lists) reads the
    header only: none of numpy, zstandard, cryptography, prometheus_client, tqdm."""
    image = tmp_path / "disk.qcow2"
    assert qemu_img(["create", "-q", "-f", "qcow2", image.name, "64M"], tmp_path).rc == 0
    assert qemu_img(["snapshot", "-c", "s1", image.name], tmp_path).rc == 0
    assert qemu_img(["bitmap", "--add", image.name, "b0"], tmp_path).rc == 0
    assert _loaded_heavy_modules(["info", str(image)], ["info", "--output=json", str(image)]) == []


def test_quick_commands_load_no_click_nor_typing(tmp_path: Path) -> None:
    """--version, --help and info (raw; qcow2 with a backing file, a snapshot and a bitmap;
    human and JSON) run on the bare interpreter's modules plus vdisk's own."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * 65536)
    image = tmp_path / "disk.qcow2"
    create = ["create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", image.name]
    assert qemu_img(create, tmp_path).rc == 0
    assert qemu_img(["snapshot", "-c", "s1", image.name], tmp_path).rc == 0
    assert qemu_img(["bitmap", "--add", image.name, "b0"], tmp_path).rc == 0
    argvs = (
        ["--version"],
        ["-h"],
        ["info", str(raw)],
        ["info", "-U", "--backing-chain", str(image)],
        ["info", "--output", "json", "-f", "qcow2", str(image)],
    )
    assert _loaded_heavy_modules(*argvs, heavy=HEAVY + STDLIB_HEAVY) == []


def test_help_imports_no_command_module() -> None:
    code = (
        "import contextlib, io, sys\nfrom vdisk.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
        "print(','.join(m for m in sys.modules if m.startswith('vdisk.cli.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "vdisk.cli.quick"


@pytest.mark.parametrize("columns", [*range(40, 82), 200])
def test_quick_help_is_clicks_help(columns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At every terminal width, the quick --help prints what click's formatter would."""
    from vdisk.cli import quick

    monkeypatch.setenv("COLUMNS", str(columns))
    ctx = cli.make_context("vdisk", [], resilient_parsing=True)
    assert quick.help_text(quick.help_width()) == cli.get_help(ctx) + "\n"


def test_quick_info_is_clicks_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each spelling the quick info answers prints what the click command prints."""
    from vdisk.cli import quick
    from vdisk.cli.app import run_click

    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    assert qemu_img(["create", "-q", "-f", "qcow2", base.name, "1M"], tmp_path).rc == 0
    create = ["create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top.name]
    assert qemu_img(create, tmp_path).rc == 0
    spellings = (
        [str(top)],
        ["--output=json", str(top)],
        ["--backing-chain", "--output", "json", str(top)],
        ["-f", "raw", "-U", str(top)],
        [str(base), "--force-share"],
    )
    for args in spellings:
        assert quick.answer(["info", *args]) == 0
        ours = capsys.readouterr().out
        assert run_click(["info", *args]) == 0
        assert ours == capsys.readouterr().out, args
    for odd in (
        ["-h"],
        ["--object", "secret,id=s,data=x", str(top)],
        ["-Uf", "qcow2", str(top)],
        [str(top), str(base)],
        ["--output=xml", str(top)],
        ["--", str(top)],
    ):
        assert quick.answer(["info", *odd]) is None, odd  # click's to parse (or refuse)


@pytest.mark.parametrize("name", sorted(COMMAND_TABLE))
def test_table_help_is_the_command_help(name: str) -> None:
    command = cli.get_command(None, name)  # type: ignore[arg-type]
    assert command is not None
    assert command.name == name
    assert COMMAND_TABLE[name][2] == command.get_short_help_str(limit=500)


def test_bare_vdisk_is_a_bare_qemu_img(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    theirs = qemu_img([], tmp_path)
    ours = vdisk_cli([], tmp_path)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out) == (1, "")
    assert ours.err == theirs.err.replace("qemu-img", "vdisk")


def test_version(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    theirs = qemu_img(["--version"], tmp_path)
    assert theirs.rc == 0 and theirs.out.startswith("qemu-img version ")
    for flag in ("--version", "-V"):
        ours = vdisk_cli([flag], tmp_path)
        assert ours.rc == 0
        assert ours.out == f"vdisk version {vdisk.__version__}\n"


def test_unknown_command_is_qemu_img_message(vdisk_cli: VdiskRunner, tmp_path: Path) -> None:
    theirs = qemu_img(["frobnicate", "x"], tmp_path)
    ours = vdisk_cli(["frobnicate", "x"], tmp_path)
    assert (ours.rc, ours.out) == (theirs.rc, theirs.out) == (1, "")
    assert ours.err == theirs.err.replace("qemu-img", "vdisk")


def test_probe_magic_is_the_codec_magic() -> None:
    from vdisk.qcow2.format import MAGIC

    assert vdisk.QCOW2_MAGIC == MAGIC


def test_convert_imports_no_heavy_module(tmp_path: Path) -> None:
    """A plain `vdisk convert` (qcow2 with data, zeros and holes to raw and to qcow2, raw to
    qcow2) loads none of numpy, zstandard, cryptography, prometheus_client, tqdm: the copy,
    its zero detection and the qcow2 read and write paths need none of them."""
    image = tmp_path / "disk.qcow2"
    assert qemu_img(["create", "-q", "-f", "qcow2", image.name, "8M"], tmp_path).rc == 0
    write = ["-c", "write -P 7 0 1M", "-c", "write -z 1M 1M", "-c", "write -P 9 3M 64k"]
    assert subprocess.run(["qemu-io", *write, str(image)], capture_output=True).returncode == 0
    raw, out = tmp_path / "disk.raw", tmp_path / "out.qcow2"
    assert (
        _loaded_heavy_modules(
            ["convert", "-O", "raw", str(image), str(raw)],
            ["convert", "-O", "qcow2", str(image), str(out)],
            ["convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
        )
        == []
    )
    assert qemu_img(["compare", "-q", str(out), str(image)], tmp_path).rc == 0


# `convert` spellings the quick path answers, each run in a directory holding src.qcow2 (data,
# zeros, a hole), src.raw, and old.raw (a target for -n).
_QUICK_CONVERTS = (
    ["src.qcow2", "out"],
    ["-O", "qcow2", "src.qcow2", "out"],
    ["-f", "qcow2", "-O", "raw", "-S", "0", "src.qcow2", "out"],
    ["src.qcow2", "-O", "qcow2", "out"],
    ["-f", "raw", "-O", "qcow2", "-S", "64k", "src.raw", "out"],
    ["-m", "1", "-W", "-t", "none", "-T", "none", "src.qcow2", "out"],
    ["-U", "-q", "-r", "100M", "-t", "writeback", "src.qcow2", "out"],
    ["--force-share", "-O", "raw", "-O", "qcow2", "src.qcow2", "src.raw", "out"],
    ["-n", "-O", "raw", "src.qcow2", "old.raw"],
    ["-f", "raw", "src.qcow2", "out"],
    # qemu-img's refusals, raised by the shared code after either parser
    ["-S", "3", "src.qcow2", "out"],
    ["-S", "1x", "src.qcow2", "out"],
    ["-m", "17", "src.qcow2", "out"],
    ["-m", "x", "src.qcow2", "out"],
    ["src.qcow2"],
    [],
    ["-f", "vmdk", "src.qcow2", "out"],
    ["-O", "vmdk", "src.qcow2", "out"],
    ["-t", "bogus", "src.qcow2", "out"],
    ["-T", "bogus", "src.qcow2", "out"],
    ["-r", "fast", "src.qcow2", "out"],
    ["missing.qcow2", "out"],
    ["-n", "src.qcow2", "missing.raw"],
    ["-n", "-O", "qcow2", "src.qcow2", "old.raw"],
)

# Spellings left to click: flags the quick path does not take, joined or odd forms, help.
_CLICK_CONVERTS = (
    ["-Oqcow2", "src.qcow2", "out"],
    ["-qU", "src.qcow2", "out"],
    ["-h"],
    ["--help"],
    ["-p", "src.qcow2", "out"],
    ["-o", "cluster_size=4k", "-O", "qcow2", "src.qcow2", "out"],
    ["-c", "-O", "qcow2", "src.qcow2", "out"],
    ["-B", "src.qcow2", "-O", "qcow2", "src.qcow2", "out"],
    ["-l", "s1", "src.qcow2", "out"],
    ["--salvage", "src.qcow2", "out"],
    ["--bitmaps", "-O", "qcow2", "src.qcow2", "out"],
    ["--object", "secret,id=s,data=x", "src.qcow2", "out"],
    ["--image-opts", "driver=qcow2,file.filename=src.qcow2", "out"],
    ["--", "src.qcow2", "out"],
    ["-", "out"],
    ["-f"],
    ["src.qcow2", "out", "-O"],
    ["-S", "-1", "src.qcow2", "out"],
    ["--force", "src.qcow2", "out"],
)


def _convert_dir(tmp_path: Path) -> Path:
    assert qemu_img(["create", "-q", "-f", "qcow2", "src.qcow2", "4M"], tmp_path).rc == 0
    write = ["-c", "write -P 7 0 1M", "-c", "write -z 1M 1M", "-c", "write -P 9 3M 64k"]
    image = str(tmp_path / "src.qcow2")
    assert subprocess.run(["qemu-io", *write, image], capture_output=True).returncode == 0
    assert qemu_img(["convert", "-O", "raw", "src.qcow2", "src.raw"], tmp_path).rc == 0
    return tmp_path


def _run_convert(
    args: list[str], where: Path, click_only: bool, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str, bytes | None]:
    """``vdisk convert ARGS`` through main (quick path first, or click alone), in a fresh
    copy of the directory: exit status, stdout, stderr and the bytes of the target."""
    import os
    import shutil

    from vdisk.cli import main, quick

    for name in ("out", "old.raw"):
        (where / name).unlink(missing_ok=True)
    shutil.copy(where / "src.raw", where / "old.raw")
    old_answer = quick.answer
    if click_only:
        quick.answer = lambda args: None
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(where)
    try:
        rc = main(["convert", *args])
    finally:
        os.chdir(cwd)
        quick.answer = old_answer
    out, err = capsys.readouterr()
    target = where / (args[-1] if args and args[-1] in ("out", "old.raw") else "out")
    return rc, out, err, target.read_bytes() if target.exists() else None


def test_quick_convert_is_clicks_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each spelling the quick convert answers (copies and refusals) ends as the click
    command ends: the same exit status, output, messages and target bytes."""
    from vdisk.cli import quick

    where = _convert_dir(tmp_path)
    for args in _QUICK_CONVERTS:
        ours = _run_convert(args, where, False, capsys)
        theirs = _run_convert(args, where, True, capsys)
        assert ours == theirs, args
    monkeypatch.chdir(where)
    for args in _QUICK_CONVERTS[:3]:  # and the quick path did answer them
        assert quick.answer(["convert", *args]) == 0


def test_quick_convert_leaves_odd_spellings_to_click(tmp_path: Path) -> None:
    from vdisk.cli import quick

    where = _convert_dir(tmp_path)
    for args in _CLICK_CONVERTS:
        assert quick.answer(["convert", *[str(where / a) if "." in a else a for a in args]]) is None
        assert not (where / "out").exists(), args


def test_quick_convert_loads_no_click_nor_typing(tmp_path: Path) -> None:
    """A plain convert (qcow2 to raw and to qcow2, raw to qcow2) runs on the bare interpreter's
    modules and vdisk's own; its copy pool runs on _thread, without threading."""
    where = _convert_dir(tmp_path)
    src, raw, out = (str(where / n) for n in ("src.qcow2", "src.raw", "out"))
    argvs = (
        ["convert", "-O", "raw", src, out],
        ["convert", "-O", "qcow2", src, out],
        ["convert", "-f", "raw", "-O", "qcow2", raw, out],
    )
    assert _loaded_heavy_modules(*argvs, heavy=HEAVY + STDLIB_HEAVY) == []


def test_quick_commands_end_their_process_cleanly(tmp_path: Path) -> None:
    """The quick commands end without the interpreter's teardown: as processes they still
    print everything, exit with their status and leave a complete target."""
    where = _convert_dir(tmp_path)
    vdisk_cmd = [sys.executable, "-m", "vdisk"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*vdisk_cmd, *args], cwd=where, capture_output=True, text=True)

    done = run("convert", "-O", "qcow2", "src.qcow2", "out")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert qemu_img(["compare", "-q", "src.qcow2", "out"], where).rc == 0
    refused = run("convert", "missing.qcow2", "out")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == "vdisk: missing.qcow2: No such file or directory\n"
    info = run("info", "--output=json", "src.qcow2")
    theirs = qemu_img(["info", "--output=json", "src.qcow2"], where)
    assert info.returncode == 0
    assert info.stdout == theirs.out
