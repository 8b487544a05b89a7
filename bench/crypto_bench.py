"""``vdisk convert`` vs ``qemu-img convert`` on LUKS-encrypted qcow2 (aes-256-xts-plain64).

Cases, on the same files for both tools, each run as the command a user types (a fresh
process, so vdisk's Python start-up is in its figure), with default flags:
- ``luks-to-raw``: a fully written LUKS image (random data, so nothing is sparse) to raw.
- ``raw-to-luks``: that raw data to a new LUKS qcow2 (``-o encrypt.format=luks``,
  ``encrypt.iter-time=100`` on both sides, so both spend the same PBKDF2 time).

Runs alternate A B B A per round; each pair gives a ratio (qemu-img time / vdisk time, so
above 1.0 means vdisk is faster) and the table reports the median of those ratios.

Usage: python bench/crypto_bench.py [--rounds N] [--size 1G] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import replace_section  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
SECTION = "## Encrypted images: `vdisk convert` vs `qemu-img convert` (LUKS)"
VDISK = [sys.executable, "-m", "vdisk"]
SECRET = ["--object", "secret,id=s0,data=bench-passphrase"]
LUKS_OPTS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100"
MIB = 1 << 20


def _run(cmd: list[str]) -> None:
    for _attempt in range(8):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        # qemu-img's PBKDF2 benchmark gives up on a busy host now and then.
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: {proc.stderr}")


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    _run(cmd)
    return time.perf_counter() - start


def _image_opts(path: str) -> list[str]:
    return ["--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"]


def make_sources(workdir: str, size: int) -> tuple[str, str]:
    raw = os.path.join(workdir, "src.raw")
    with open(raw, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    luks = os.path.join(workdir, "src.qcow2")
    _run(["qemu-img", "convert", *SECRET, "-O", "qcow2", "-o", LUKS_OPTS, raw, luks])
    return raw, luks


def commands(case: str, tool: list[str], raw: str, luks: str, out: str) -> list[str]:
    if case == "luks-to-raw":
        return [*tool, "convert", *SECRET, *_image_opts(luks), "-O", "raw", out]
    return [*tool, "convert", *SECRET, "-O", "qcow2", "-o", LUKS_OPTS, raw, out]


def run_case(case: str, raw: str, luks: str, workdir: str, rounds: int) -> dict[str, object]:
    times: dict[str, list[float]] = {"qemu": [], "vdisk": []}
    ratios: list[float] = []
    for _ in range(rounds):
        pair: dict[str, list[float]] = {"qemu": [], "vdisk": []}
        for side in ("vdisk", "qemu", "qemu", "vdisk"):  # A B B A
            tool = VDISK if side == "vdisk" else ["qemu-img"]
            out = os.path.join(workdir, f"out-{side}")
            if os.path.exists(out):
                os.unlink(out)
            pair[side].append(_timed(commands(case, tool, raw, luks, out)))
        for side in pair:
            times[side].extend(pair[side])
        ratios.extend(q / v for q, v in zip(pair["qemu"], reversed(pair["vdisk"]), strict=True))
    return {
        "case": case,
        "qemu": statistics.median(times["qemu"]),
        "vdisk": statistics.median(times["vdisk"]),
        "ratio": statistics.median(ratios),
    }


def table(results: list[dict[str, object]], size: int, rounds: int) -> str:
    lines = [
        f"{size // MIB} MiB of random data, aes-256-xts-plain64, {rounds} round(s) of A B B A, "
        f"{os.cpu_count()} cores (shared with other work while measured).",
        "",
        "| case | qemu-img (s, median) | vdisk (s, median) | ratio (median of qemu/vdisk) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['case']} | {r['qemu']:.2f} | {r['vdisk']:.2f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def write_docs(body: str) -> None:
    replace_section(SECTION, body, DOCS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--notes", default="", help="text appended under the table")
    args = parser.parse_args()
    from vdisk.sizes import parse_size

    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="vdisk-crypto-bench-", dir="/var/tmp") as workdir:
        raw, luks = make_sources(workdir, size)
        results = [
            run_case(case, raw, luks, workdir, args.rounds)
            for case in ("luks-to-raw", "raw-to-luks")
        ]
    text = table(results, size, args.rounds)
    print(text)
    if args.write_docs:
        write_docs(text + ("\n\n" + args.notes if args.notes else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
