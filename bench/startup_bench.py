"""Start-up cost of the ``vdisk`` command next to a bare interpreter and ``qemu-img``.

Rows: ``vdisk --help``, ``vdisk --version``, ``vdisk info`` on a raw file and on a qcow2 image,
each as a fresh process (the console script next to this interpreter). Each row is timed against
``python -c pass`` (the floor any Python tool pays) and against the qemu-img equivalent, in the
order A B B A ... so drift in the host's load hits both sides alike. Every pair gives a ratio
(vdisk time / other time); the table prints the medians of those ratios and the median times.

vdisk's modules are byte-compiled first, as an installed package is: with PYTHONDONTWRITEBYTECODE
set (or a fresh editable install) every start would otherwise compile them anew. With
``--callgrind`` (and valgrind installed) each row also gets its instruction count, and the bare
interpreter's, under ``valgrind --tool=callgrind``: repeatable where wall times on a loaded host
are not.

Usage: python bench/startup_bench.py [--rounds N] [--callgrind]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from installed import compile_package, vdisk_command  # bench/ is the script's directory


def _instructions(argv: list[str]) -> float:
    """Millions of instructions ``argv`` executes (callgrind's total)."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    for line in proc.stderr.splitlines():
        if "Collected" in line:
            return int(line.split()[-1]) / 1e6
    raise RuntimeError("callgrind printed no instruction count")


def _time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _paired(a: list[str], b: list[str], rounds: int) -> tuple[list[float], list[float]]:
    """Time a and b alternately, A B B A ..., returning both lists of seconds."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            ta.append(_time_once(a))
            tb.append(_time_once(b))
        else:
            tb.append(_time_once(b))
            ta.append(_time_once(a))
    return ta, tb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--callgrind", action="store_true", help="add instruction counts")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("startup_bench: qemu-img is not installed")
    if args.callgrind and shutil.which("valgrind") is None:
        sys.exit("startup_bench: --callgrind needs valgrind")
    compile_package()
    vdisk = vdisk_command()
    bare = [sys.executable, "-c", "pass"]
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "disk.raw")
        qcow2 = os.path.join(tmp, "disk.qcow2")
        with open(raw, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "64M"], check=True)
        rows = [
            ("--help", ["--help"], ["--help"]),
            ("--version", ["--version"], ["--version"]),
            ("info raw", ["info", raw], ["info", raw]),
            ("info qcow2", ["info", qcow2], ["info", qcow2]),
        ]
        print(f"{args.rounds} runs per side, A B B A; medians (ms) and medians of ratios")
        print(
            f"{'command':12} {'vdisk':>8} {'python':>8} {'qemu-img':>9} "
            f"{'x python':>9} {'x qemu-img':>11}"
            + (f" {'vdisk Mi':>9} {'python Mi':>9} {'x python':>9}" if args.callgrind else "")
        )
        bare_instructions = _instructions(bare) if args.callgrind else 0.0
        for label, ours, theirs in rows:
            t_ours, t_bare = _paired(vdisk + ours, bare, args.rounds)
            t_ours2, t_qemu = _paired(vdisk + ours, ["qemu-img", *theirs], args.rounds)
            vs_bare = statistics.median(a / b for a, b in zip(t_ours, t_bare, strict=True))
            vs_qemu = statistics.median(a / b for a, b in zip(t_ours2, t_qemu, strict=True))
            print(
                f"{label:12} {statistics.median(t_ours + t_ours2) * 1e3:8.1f} "
                f"{statistics.median(t_bare) * 1e3:8.1f} {statistics.median(t_qemu) * 1e3:9.1f} "
                f"{vs_bare:9.2f} {vs_qemu:11.2f}",
                end="",
            )
            if args.callgrind:
                ours_instructions = _instructions(vdisk + ours)
                print(
                    f" {ours_instructions:9.1f} {bare_instructions:9.1f} "
                    f"{ours_instructions / bare_instructions:9.2f}",
                    end="",
                )
            print(flush=True)


if __name__ == "__main__":
    main()
