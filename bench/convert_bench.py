"""``vdisk convert`` vs ``qemu-img convert``: the same source, the same flags, one run.

Both sides run as the commands users type (a fresh process each time, so vdisk's Python start-up
is in its figure), with their defaults: 8 parallel requests (``-m 8``), in-order writes, sparse
output (``-S 4k``) and no flush at the end (qemu-img convert's default cache mode ``unsafe``,
which vdisk follows: no fdatasync, not even of a qcow2 target's metadata).

Cases (sources made once by qemu-img/qemu-io, in 4 MiB stripes): qcow2 sources all data
(``full``), half data with a quarter zero clusters and a quarter unallocated (``half``), and
empty, each to a raw file; the half one to a new qcow2 image; and its raw conversion (a sparse
file) to a new qcow2 image.

Each run writes a new target: the last run's output is deleted and the page cache synced first,
untimed. Runs alternate A B B A; each pair gives a ratio (vdisk rate / qemu-img rate, i.e. qemu-img time / vdisk time) and the
table reports the median of those ratios.

Usage: python bench/convert_bench.py [--rounds N] [--size 1G] [--write-docs]
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
from dataclasses import dataclass, field
from pathlib import Path

from docs_section import replace_section  # bench/ is the script's directory
from installed import compile_package, vdisk_command

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "convert_bench.png"
SECTION = "## `vdisk convert` vs `qemu-img convert`"
VDISK = vdisk_command()

MIB = 1 << 20
STRIPE = 4 * MIB


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    source: str  # a key of make_sources(): "full", "half", "empty" (qcow2) or "raw"
    in_fmt: str
    out_fmt: str


CASES = (
    Case("full-to-raw", "qcow2 full -> raw", "full", "qcow2", "raw"),
    Case("half-to-raw", "qcow2 half -> raw", "half", "qcow2", "raw"),
    Case("empty-to-raw", "qcow2 empty -> raw", "empty", "qcow2", "raw"),
    Case("half-to-qcow2", "qcow2 half -> qcow2", "half", "qcow2", "qcow2"),
    Case("raw-to-qcow2", "raw (sparse) -> qcow2", "raw", "raw", "qcow2"),
)


@dataclass
class Result:
    case: Case
    vdisk_s: list[float] = field(default_factory=list)
    qemu_s: list[float] = field(default_factory=list)
    lib_s: list[float] = field(default_factory=list)  # the library call, in this process

    def ratios(self, lib: bool = False) -> list[float]:
        ours = self.lib_s if lib else self.vdisk_s
        return [q / v for v, q in zip(ours, self.qemu_s, strict=True)]

    def median(self, lib: bool = False) -> float:
        return statistics.median(self.ratios(lib)) if self.vdisk_s else 0.0


def _qemu_io_fill(path: str, size: int, full: bool) -> None:
    """Data in 4 MiB stripes (every stripe with ``full``; otherwise data, zero clusters,
    data, unallocated)."""
    cmds: list[str] = []
    for i, offset in enumerate(range(0, size, STRIPE)):
        kind = 0 if full else i % 4
        if kind in (0, 2):
            cmds += ["-c", f"write -q -P {i % 251 + 1} {offset} {STRIPE}"]
        elif kind == 1:
            cmds += ["-c", f"write -q -z {offset} {STRIPE}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, capture_output=True)


def make_sources(workdir: str, size: int) -> dict[str, str]:
    """The qcow2 sources (all data, half data, empty) and the raw conversion of the half one."""
    paths = {name: os.path.join(workdir, f"src-{name}.qcow2") for name in ("full", "half", "empty")}
    for name, path in paths.items():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
        if name != "empty":
            _qemu_io_fill(path, size, full=name == "full")
    paths["raw"] = os.path.join(workdir, "src.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", paths["half"], paths["raw"]], check=True)
    return paths


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def library_convert(case: Case, src: str, out: str) -> float:
    """What ``vdisk convert`` does, called in this process (no interpreter start-up)."""
    import vdisk
    from vdisk.convert import convert
    from vdisk.qcow2 import Qcow2Image

    start = time.perf_counter()
    with vdisk.open(src, format=case.in_fmt, readonly=True) as source:
        vdisk.create(out, source.size, format=case.out_fmt)
        if case.out_fmt == "raw":
            with vdisk.open(out, format="raw") as fresh:
                fresh.write(bytes(4096), 0)  # as vdisk convert does (QEMU's first block)
        with vdisk.open(out, format=case.out_fmt) as target:
            if isinstance(target, Qcow2Image):
                target.durable = False  # cache=unsafe, as the command's default
            convert([source], target, target_is_zero=True, flush=False, flush_interval=None)
    return time.perf_counter() - start


def run_case(case: Case, sources: dict[str, str], workdir: str, rounds: int) -> Result:
    src = sources[case.source]
    sides = ("vdisk", "qemu", "lib")
    outs = {side: os.path.join(workdir, f"out-{side}.{case.out_fmt}") for side in sides}
    cmds = {
        "vdisk": [*VDISK, "convert", "-f", case.in_fmt, "-O", case.out_fmt, src, outs["vdisk"]],
        "qemu": ["qemu-img", "convert", "-f", case.in_fmt, "-O", case.out_fmt, src, outs["qemu"]],
    }

    def one(side: str) -> float:
        # A fresh target path, as a user's usually is, and no dirty pages from earlier runs:
        # truncating an output under writeback, or the kernel's writeback throttling, would
        # cost a run a random part of a second.
        if os.path.exists(outs[side]):
            os.unlink(outs[side])
        os.sync()
        if side == "lib":
            return library_convert(case, src, outs["lib"])
        return timed(cmds[side])

    result = Result(case)
    for side in sides:  # warm-up: page cache, imports
        one(side)
    for side in ("vdisk", "lib"):
        subprocess.run(["qemu-img", "compare", "-q", outs[side], outs["qemu"]], check=True)
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        times = {side: one(side) for side in order}
        result.vdisk_s.append(times["vdisk"])
        result.qemu_s.append(times["qemu"])
        result.lib_s.append(times["lib"])
        print(
            f"  {case.name} round {r + 1}: vdisk {times['vdisk']:.3f} s, "
            f"library {times['lib']:.3f} s, qemu-img {times['qemu']:.3f} s, "
            f"ratio {times['qemu'] / times['vdisk']:.2f} (library {times['qemu'] / times['lib']:.2f})",
            flush=True,
        )
    return result


def drop_page_cache() -> bool:
    """Write back and drop the host's clean page cache (root only), so that every run finds
    free memory for its target's pages: with the cache full of other files, each new page
    costs a reclaim first, and how much varies from run to run by tenths of a second. The
    warm-up runs read the sources back in. False where it cannot be done."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def startup_seconds(rounds: int) -> float:
    """Median wall time of ``vdisk --version`` (interpreter and import start-up)."""
    return statistics.median(timed([*VDISK, "--version"]) for _ in range(max(3, rounds)))


# -- reporting -----------------------------------------------------------------------------------


def table(results: list[Result], meta: str) -> str:
    lines = [
        "| case | vdisk convert s | library s | qemu-img s | ratios vdisk convert / qemu-img | "
        "median | median, library / qemu-img |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for res in results:
        v = statistics.median(res.vdisk_s)
        lib = statistics.median(res.lib_s)
        q = statistics.median(res.qemu_s)
        ratios = ", ".join(f"{x:.2f}" for x in res.ratios())
        lines.append(
            f"| {res.case.label} | {v:.3f} | {lib:.3f} | {q:.3f} | {ratios} | "
            f"**{res.median():.2f}x** | {res.median(lib=True):.2f}x |"
        )
    return meta + "\n\n" + "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(results)))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r.median() for r in results], w, color="#4c72b0",
           label="vdisk convert (command)")  # fmt: skip
    ax.bar([x + w / 2 for x in xs], [r.median(lib=True) for r in results], w, color="#55a868",
           label="vdisk.convert (library call)")  # fmt: skip
    for x, res in zip(xs, results, strict=True):
        for dx, lib in ((-w / 2, False), (w / 2, True)):
            pts = res.ratios(lib)
            ax.scatter([x + dx] * len(pts), pts, color="black", s=8, zorder=3)
    ax.legend()
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.case.label for r in results])
    ax.set_ylabel("vdisk rate / qemu-img rate")
    ax.set_title("vdisk convert vs qemu-img convert (bars: median, dots: pairs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_docs(body: str) -> None:
    replace_section(SECTION, body, DOCS)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="measured runs per side")
    parser.add_argument("--size", default="1G", help="virtual size of the source")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--write-docs", action="store_true", help="update performance.md")
    parser.add_argument("--workdir", help="keep images here (default: a temporary directory)")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"convert_bench: {tool} is not installed", file=sys.stderr)
            return 1
    compile_package()
    from vdisk.sizes import parse_size

    size = parse_size(args.size)
    wanted = {name.strip() for name in args.cases.split(",")}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        print(f"making a {args.size} source with qemu-io...", flush=True)
        sources = make_sources(workdir, size)
        dropped = drop_page_cache()
        results = []
        for case in CASES:
            if case.name in wanted:
                print(f"{case.name}:", flush=True)
                results.append(run_case(case, sources, workdir, args.rounds))
    startup = startup_seconds(args.rounds)
    version = subprocess.run(
        ["qemu-img", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    cache_note = (
        "The host's page cache was dropped after making the sources, so that the targets find "
        "free memory (the warm-up runs read the sources back in). "
        if dropped
        else ""
    )
    meta = (
        f"`python bench/convert_bench.py --size {args.size}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {version}, Python "
        f"{sys.version.split()[0]}). Sources: {args.size} qcow2 images (64 KiB clusters) written "
        "by qemu-io in 4 MiB stripes: all data (full), or data, zero clusters, data, "
        "unallocated (half), or nothing (empty); the raw case uses the half one's (sparse) "
        "raw conversion. Both commands run with their defaults (`-m 8`, "
        "in-order writes, `-S 4k`, no flush), each as a fresh process (vdisk through its "
        "console script), into a new file (the last run's output deleted, then `sync`, untimed); "
        f"{args.rounds} runs per side in the order A B B A ... after one warm-up run "
        f"each. vdisk's process start-up (`vdisk --version`) takes {startup:.3f} s and is "
        "included in the command's times; the library column times the same work called in "
        "the benchmark's own process (open, create, copy, close), as a third side in the "
        f"alternation. {cache_note}Host load average at the end: {os.getloadavg()[0]:.2f}."
    )
    text = table(results, meta)
    print(text)
    if args.write_docs:
        plot(results, PLOT)
        write_docs(text + "\n![convert bench ratios](img/convert_bench.png)\n" + NOTES)
    return 0


NOTES = """
Reading the numbers:
- Both sides skip zero and unallocated ranges from block status alone and copy the data in
  2 MiB chunks (reused buffers, 8 reads in flight, writes in order).
- Neither side syncs: qemu-img convert's default cache mode is `unsafe`, and vdisk's is too
  (`-t unsafe`: even a qcow2 target's metadata is written back without fdatasync, through
  `Qcow2Image.durable = False`). `-t writeback` and the others sync as docs/cli.md says.
- The command's gap to the library column is Python's start-up: the interpreter and the
  package's imports. A plain convert loads neither click nor typing, numpy, zstandard or
  cryptography, which `tests/cli/test_startup.py` asserts. That is a fixed cost per run, and no
  copy speed can hide it. qemu-img needs a few milliseconds in all, and the empty source has
  nothing to copy, so on that row a bare `python -c pass` alone costs more than qemu-img's
  whole run.
"""


if __name__ == "__main__":
    sys.exit(main())
