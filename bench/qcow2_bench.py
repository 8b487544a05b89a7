"""QCOW2 library vs ``qemu-img bench -d 1``: the same image, the same access pattern, one run.

``qemu-img bench`` has no random mode: it starts at ``-o`` and advances by ``-S`` (default: the
buffer size) after each request, wrapping modulo the image size. Our side replays exactly that
offset sequence with ``readinto``/``write`` at queue depth 1. Both sides use the host page cache
(qemu-img bench's default cache mode, ``writeback``; vdisk opens files buffered), so read numbers
compare per-request overhead, not the disk.

Cases:
- ``read-4k-seq``: 4 KiB reads, step 4 KiB, on a fully allocated image.
- ``read-4k-stride``: 4 KiB reads, step 1 MiB + 4 KiB (a new L2 entry, often a new L2 table).
- ``read-1m-seq``: 1 MiB sequential reads (one contiguous host run per request).
- ``write-64k-alloc``: 64 KiB writes, step 64 KiB, on an empty image: each allocates a cluster.
  Each side re-creates its own image before every run (qemu-img create / vdisk.create).

Runs alternate A B B A; each pair gives a ratio (vdisk rate / qemu-img rate) and the table
reports the median of those ratios. Only the request loop is timed on both sides: qemu-img
bench's own "Run completed in" figure excludes opening and closing, and so does ours.

Usage: python bench/qcow2_bench.py [--rounds N] [--quick] [--write-docs] [--profile CASE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import vdisk
from docs_section import replace_section  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "qcow2_bench.png"
SECTION = "## QCOW2 library vs `qemu-img bench`"

KIB = 1 << 10
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    bufsize: int
    step: int
    count: int
    write: bool
    target: float


CASES = (
    Case("read-4k-seq", "4K read, step 4K", 4 * KIB, 4 * KIB, 40000, False, 2.0),
    Case("read-4k-stride", "4K read, step 1M+4K", 4 * KIB, MIB + 4 * KIB, 40000, False, 2.0),
    Case("read-1m-seq", "1M sequential read", MIB, MIB, 3000, False, 1.0),
    Case("write-64k-alloc", "64K allocating write", 64 * KIB, 64 * KIB, 4000, True, 1.0),
)


@dataclass
class Result:
    case: Case
    vdisk_s: list[float] = field(default_factory=list)
    qemu_s: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        # Same request count on both sides: rate ratio = qemu time / vdisk time.
        return [q / v for v, q in zip(self.vdisk_s, self.qemu_s)]

    def median(self) -> float:
        return statistics.median(self.ratios())


def offsets(start: int, step: int, count: int, size: int) -> list[int]:
    """qemu-img bench's offset sequence (7.2: offset += step, then offset %= image size)."""
    seq = []
    offset = start
    for _ in range(count):
        seq.append(offset)
        offset = (offset + step) % size
    return seq


# -- the two sides -------------------------------------------------------------------------------


def qemu_bench(case: Case, image: str, count: int) -> float:
    cmd = ["qemu-img", "bench", "-f", "qcow2", "-d", "1", "-c", str(count)]
    cmd += ["-s", str(case.bufsize), "-S", str(case.step)]
    if case.write:
        cmd.append("-w")
    cmd.append(image)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    match = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not match:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    return float(match.group(1))


def vdisk_bench(case: Case, image: str, count: int) -> float:
    with vdisk.open(image, readonly=not case.write) as dev:
        seq = offsets(0, case.step, count, dev.size)
        buf = bytearray(b"\xa5" * case.bufsize)  # qemu-img bench's default write pattern
        op = dev.write if case.write else dev.readinto
        start = time.perf_counter()
        for offset in seq:
            op(buf, offset)
        elapsed = time.perf_counter() - start
    return elapsed


def make_empty(path: str, size: int, own: str) -> None:
    """Re-create an empty image in place, each side with its own tool."""
    if own == "qemu":
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True
        )
    else:
        vdisk.create(path, size, format="qcow2")


def make_data_image(path: str, size: int) -> None:
    """A fully allocated qcow2 image made by QEMU (64 MiB writes of a pattern)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    cmds: list[str] = []
    for offset in range(0, size, 64 * MIB):
        cmds += ["-c", f"write -q -P {(offset // (64 * MIB)) % 255 + 1} {offset} {64 * MIB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, capture_output=True)


# -- running -------------------------------------------------------------------------------------


def run_case(case: Case, workdir: str, data_image: str, rounds: int, scale: float) -> Result:
    count = max(1, int(case.count * scale))
    result = Result(case)
    write_size = max(1 << 30, count * case.step)
    images = {"vdisk": os.path.join(workdir, "w-vdisk.qcow2"),
              "qemu": os.path.join(workdir, "w-qemu.qcow2")}  # fmt: skip

    def one(side: str) -> float:
        image = data_image
        if case.write:
            image = images[side]
            make_empty(image, write_size, side)
        fn: Callable[[Case, str, int], float] = vdisk_bench if side == "vdisk" else qemu_bench
        return fn(case, image, count)

    one("vdisk")  # warm-up: page cache, imports
    one("qemu")
    for r in range(rounds):
        order = ("vdisk", "qemu") if r % 2 == 0 else ("qemu", "vdisk")
        times = {side: one(side) for side in order}
        result.vdisk_s.append(times["vdisk"])
        result.qemu_s.append(times["qemu"])
        print(
            f"  {case.name} round {r + 1}: vdisk {count / times['vdisk']:10.0f} op/s, "
            f"qemu-img {count / times['qemu']:10.0f} op/s, "
            f"ratio {times['qemu'] / times['vdisk']:.2f}",
            flush=True,
        )
    return result


def profile_case(case: Case, workdir: str, data_image: str, scale: float) -> str:
    count = max(1, int(case.count * scale))
    image = data_image
    if case.write:
        image = os.path.join(workdir, "w-vdisk.qcow2")
        make_empty(image, max(1 << 30, count * case.step), "vdisk")
    prof = cProfile.Profile()
    prof.enable()
    vdisk_bench(case, image, count)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


# -- reporting -----------------------------------------------------------------------------------


def table(results: list[Result], meta: str) -> str:
    lines = [
        "| case | requests/run | vdisk op/s | qemu-img op/s | ratios (vdisk/qemu) | median | target |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for res in results:
        c = res.case
        n = c.count
        v_rate = statistics.median(n / t for t in res.vdisk_s) if res.vdisk_s else 0.0
        q_rate = statistics.median(n / t for t in res.qemu_s) if res.qemu_s else 0.0
        ratios = ", ".join(f"{x:.2f}" for x in res.ratios())
        ok = "met" if res.median() >= c.target else "**missed**"
        lines.append(
            f"| {c.label} | {n} | {v_rate:,.0f} | {q_rate:,.0f} | {ratios} | "
            f"**{res.median():.2f}x** | >= {c.target:.1f}x ({ok}) |"
        )
    return meta + "\n\n" + "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r.case.label for r in results]
    medians = [r.median() for r in results]
    xs = range(len(results))
    ax.bar(xs, medians, color="#4c72b0", label="median ratio")
    for x, res in zip(xs, results):
        ax.scatter([x] * len(res.ratios()), res.ratios(), color="black", s=10, zorder=3)
        ax.hlines(res.case.target, x - 0.4, x + 0.4, colors="#c44e52", linestyles="dashed")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel("vdisk rate / qemu-img bench rate")
    ax.set_title("QCOW2 library vs qemu-img bench -d 1 (dots: pairs, dashes: targets)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


NOTES = """\
Reading the numbers:
- 4K reads measure per-request overhead. A bare `os.preadv` loop on the same file takes about
  1.3 us per 4 KiB read here; vdisk's single-cluster fast path (cached L2 table, plain data
  entry: one lock round trip, one `preadv`) adds about 1.5-2 us to that, while qemu-img bench
  hands each request to its thread pool and back.
- 1M sequential reads are bound by the kernel's copy out of the page cache: vdisk issues one
  `preadv` per request (contiguous clusters coalesced) and its time per request is within about
  10% of a bare `preadv` of 1 MiB, so the ratio sits around 1.0 and single pairs scatter on
  either side of it with host load.
- 64K allocating writes are likewise dominated by copying 64 KiB into the page cache; vdisk
  issues exactly one `pwritev` per request (strace: metadata goes out at flush/close), and the
  metadata work per new cluster (refcount, L2 entry) is a small share of it. Neither side's
  close (and its flush) is timed.
- Host load moves the two I/O-bound cases, and we have no confirmed explanation for the
  direction. CPU per request is not it: in one A/B, an allocating 64K write cost vdisk 14.5 us
  of CPU (time.process_time) against qemu-img bench's 21-23 us (its whole run's rusage over the
  request count, start-up included). Runs on this 2-CPU machine on 2026-11-21: at load ~2,
  1M reads 0.95x-1.11x and allocating writes 0.92x-1.21x (three runs); at load 5-9 (other
  jobs' TCG VMs running), 0.70x-0.92x and 0.58x-0.62x, with single pairs between 0.3x and 4x.
  The 4K read ratios were 1.9x-2.8x in every run since the single-cluster fast path. Re-run on
  a quiet host before drawing conclusions from the two I/O-bound rows.
"""


def write_docs(body: str) -> None:
    replace_section(SECTION, body, DOCS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="measured runs per side (A B B A)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--image-size", default="1G", help="size of the read image")
    parser.add_argument("--write-docs", action="store_true", help="update performance.md")
    parser.add_argument("--profile", metavar="CASE", help="cProfile vdisk's side of one case")
    parser.add_argument("--workdir", help="keep images here (default: a temporary directory)")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"qcow2_bench: {tool} is not installed", file=sys.stderr)
            return 1
    from vdisk.sizes import parse_size

    scale = 0.1 if args.quick else 1.0
    wanted = {name.strip() for name in args.cases.split(",")}
    cases = [c for c in CASES if c.name in wanted]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        data_image = os.path.join(workdir, "data.qcow2")
        size = parse_size(args.image_size)
        print(f"making a fully allocated {args.image_size} qcow2 image with qemu-io...", flush=True)
        make_data_image(data_image, size)
        if args.profile:
            case = next(c for c in CASES if c.name == args.profile)
            print(profile_case(case, workdir, data_image, scale))
            return 0
        results = []
        for case in cases:
            print(f"{case.name}:", flush=True)
            results.append(run_case(case, workdir, data_image, args.rounds, scale))
    if scale != 1.0:
        for res in results:
            res.case = Case(**{**res.case.__dict__, "count": max(1, int(res.case.count * scale))})
    qemu_version = subprocess.run(
        ["qemu-img", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    meta = (
        f"`python bench/qcow2_bench.py` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"{qemu_version}, Python {sys.version.split()[0]}). Each side opens the image, issues "
        f"the requests at queue depth 1 and closes it; {args.rounds} runs per side in the order "
        "A B B A ...; only the request loop is timed (qemu-img bench's own \"Run completed\" "
        "figure). Cache mode: both sides go through the host page cache (qemu-img bench's "
        "default `-t writeback`; vdisk's buffered file). Reads use one fully allocated "
        f"{args.image_size} image written by qemu-io; writes re-create an empty image per run "
        "(qemu-img create for qemu-img, vdisk.create for vdisk). Offsets follow qemu-img "
        "bench's sequence (start 0, `+= step`, wrap modulo the image size) on both sides. "
        f"Host load average at the end of the run: {os.getloadavg()[0]:.2f} (the machine is "
        "shared with other jobs, which is why single pairs scatter; the median is the figure)."
    )
    report = table(results, meta)
    print(report)
    if args.write_docs:
        plot(results, PLOT)
        write_docs(report + f"\n![QCOW2 bench ratios](img/{PLOT.name})\n\n" + NOTES)
        print(f"wrote {DOCS} and {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
