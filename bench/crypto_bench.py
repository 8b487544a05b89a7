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
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from docs_section import plot_ratios, replace_section  # bench/ is the script's directory
from installed import compile_package, vdisk_command

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "crypto_bench.png"
SECTION = "## Encrypted images: `vdisk convert` vs `qemu-img convert` (LUKS)"
VDISK = vdisk_command()
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


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the command and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _run(cmd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


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
    times: dict[str, list[tuple[float, float]]] = {"qemu": [], "vdisk": []}
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for _ in range(rounds):
        pair: dict[str, list[tuple[float, float]]] = {"qemu": [], "vdisk": []}
        for side in ("vdisk", "qemu", "qemu", "vdisk"):  # A B B A
            tool = VDISK if side == "vdisk" else ["qemu-img"]
            out = os.path.join(workdir, f"out-{side}")
            if os.path.exists(out):
                os.unlink(out)
            pair[side].append(_timed(commands(case, tool, raw, luks, out)))
        for side in pair:
            times[side].extend(pair[side])
        # Pairs next to each other in time: (A, B) and (B, A).
        for q, v in zip(pair["qemu"], pair["vdisk"], strict=True):
            ratios.append(q[0] / v[0])
            cpu_ratios.append(q[1] / v[1])
    load = os.getloadavg()[0]
    print(f"{case}: ratios {ratios} cpu ratios {cpu_ratios} load {load:.2f}", flush=True)
    return {
        "case": case,
        "qemu": statistics.median(t[0] for t in times["qemu"]),
        "vdisk": statistics.median(t[0] for t in times["vdisk"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "qemu_cpu": statistics.median(t[1] for t in times["qemu"]),
        "vdisk_cpu": statistics.median(t[1] for t in times["vdisk"]),
        "cpu_ratio": statistics.median(cpu_ratios),
        "load": load,
    }


def table(results: list[dict[str, object]], size: int, rounds: int) -> str:
    lines = [
        f"`bench/crypto_bench.py --size {size // MIB}M --rounds {rounds}`: {size // MIB} MiB of "
        f"random data, aes-256-xts-plain64, {rounds} round(s) of A B B A, a fresh process per "
        f"run (vdisk byte-compiled first, as installed), {os.cpu_count()} cores shared with "
        "other work. Ratios are qemu-img / vdisk (>1: vdisk faster), the median of the "
        "pairwise ratios; CPU is user + system seconds of the process.",
        "",
        "| case | qemu-img (s) | vdisk (s) | ratio (wall) | pairwise | qemu-img CPU s | "
        "vdisk CPU s | ratio (CPU) | load avg |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        f = {k: float(v) for k, v in r.items() if isinstance(v, float)}
        pairs = ", ".join(f"{x:.2f}" for x in r["ratios"])  # type: ignore[attr-defined]
        lines.append(
            f"| {r['case']} | {f['qemu']:.2f} | {f['vdisk']:.2f} | **{f['ratio']:.2f}x** | "
            f"{pairs} | {f['qemu_cpu']:.2f} | {f['vdisk_cpu']:.2f} | {f['cpu_ratio']:.2f}x | "
            f"{f['load']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, object]], path: Path) -> None:
    plot_ratios(
        [str(r["case"]) for r in results],
        [float(r["ratio"]) for r in results],  # type: ignore[arg-type]
        [float(r["cpu_ratio"]) for r in results],  # type: ignore[arg-type]
        [list(r["ratios"]) for r in results],  # type: ignore[call-overload]
        "LUKS convert: qemu-img time / vdisk time (bars: median, dots: pairs)", path,
    )


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
    compile_package()
    with tempfile.TemporaryDirectory(prefix="vdisk-crypto-bench-", dir="/var/tmp") as workdir:
        raw, luks = make_sources(workdir, size)
        results = [
            run_case(case, raw, luks, workdir, args.rounds)
            for case in ("luks-to-raw", "raw-to-luks")
        ]
    text = table(results, size, args.rounds)
    print(text)
    if args.write_docs:
        plot(results, PLOT)
        figure = "\n\n![LUKS convert ratios](img/crypto_bench.png)"
        write_docs(text + figure + ("\n\n" + args.notes if args.notes else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
