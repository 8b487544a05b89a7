"""vdisk's NBD server against qemu-nbd and nbdkit, same images, same clients, in one run.

For each file system (the work dir's, and tmpfs at /dev/shm) and for the qcow2 and the raw
image, each workload runs on every server in A B C C B A order (a fresh server per
measurement, each writing into the same image file in place); a row's figure against each
anchor is the median of the pairwise ratios (vdisk rate / anchor rate, run i with run i).
The anchors: qemu-nbd, and nbdkit's file plugin (raw only; skipped with a note when nbdkit is
not installed). Workloads: fio's nbd engine (4K random read at QD1/8/64, 4K random write at
QD8, 1M sequential read and write at QD8) and ``qemu-img convert -n nbd+unix://... -O raw OUT``
into a preallocated OUT made once per file system and kept.
The host load (1-minute average) is recorded around every row.

    .venv/bin/python bench/nbd_bench.py [--size 256] [--runtime 3] [--pairs 2] [--fs disk,tmpfs]
                                        [--formats qcow2,raw] [--no-docs] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "nbd_bench.png"
SECTION = "## NBD server vs `qemu-nbd` and `nbdkit`"
OLD_SECTIONS = (SECTION, "## NBD server vs `qemu-nbd`")
EXPORT = "exp"

FIO_JOBS = [
    ("4K randread QD1", "randread", "4k", 1),
    ("4K randread QD8", "randread", "4k", 8),
    ("4K randread QD64", "randread", "4k", 64),
    ("4K randwrite QD8", "randwrite", "4k", 8),
    ("1M seq read QD8", "read", "1M", 8),
    ("1M seq write QD8", "write", "1M", 8),
]
ANCHORS = ("qemu-nbd", "nbdkit")


def server_command(kind: str, fmt: str, image: Path, sock: str) -> list[str]:
    """Each server as the issue runs it: one export named EXPORT, persistent, 8 at once."""
    if kind == "vdisk":
        return [sys.executable, "-m", "vdisk", "nbd", "-f", fmt, "-k", sock, "-x", EXPORT, "-t",
                "-e", "8", "--cache=writeback", str(image)]
    if kind == "qemu-nbd":
        return ["qemu-nbd", "-f", fmt, "-k", sock, "-x", EXPORT, "-t", "-e", "8",
                "--cache=writeback", str(image)]
    assert kind == "nbdkit" and fmt == "raw"
    return ["nbdkit", "-f", "-U", sock, "-e", EXPORT, "-t", "8", "file", f"file={image}"]


def start_server(kind: str, fmt: str, image: Path, sock: str) -> subprocess.Popen[bytes]:
    if os.path.exists(sock):  # a server killed by SIGTERM may leave its socket behind
        os.unlink(sock)
    proc = subprocess.Popen(server_command(kind, fmt, image, sock), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_fio(uri: str, rw: str, bs: str, qd: int, size_mib: int, runtime: float) -> float:
    """MiB/s of one fio run."""
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={size_mib}M", f"--runtime={runtime}", "--time_based",
         "--randrepeat=0", "--output-format=json"],
        capture_output=True, text=True, check=True,
    ).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = "read" if "read" in rw else "write"
    return float(job[side]["bw_bytes"]) / (1 << 20)


def run_convert(uri: str, out: Path, size_mib: int) -> float:
    """MiB/s of ``qemu-img convert -n`` into OUT, which is made once and kept: a file made and
    deleted per run hands its page cache back to this VM's host (free page reporting), and the
    next run's faults then swing one run by 5x for every server alike."""
    if not out.exists():
        subprocess.run(["qemu-img", "create", "-f", "raw", "-o", "preallocation=full", str(out),
                        f"{size_mib}M"], check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", uri, "-O", "raw", str(out)],
                   check=True)
    return size_mib / (time.perf_counter() - t0)


def measure(kind: str, fmt: str, image: Path, workdir: Path, job: tuple[str, str, str, int] | None,
            size_mib: int, runtime: float) -> float:
    sock = str(workdir / f"{kind}.sock")
    proc = start_server(kind, fmt, image, sock)
    try:
        uri = f"nbd+unix:///{EXPORT}?socket={sock}"
        if job is None:
            return run_convert(uri, image.parent / "convert.raw", size_mib)
        _, rw, bs, qd = job
        return run_fio(uri, rw, bs, qd, size_mib, runtime)
    finally:
        stop_server(proc)


def fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def make_images(where: Path, size_mib: int) -> dict[str, Path]:
    raw = where / "disk.raw"
    qcow2 = where / "disk.qcow2"
    with open(raw, "wb") as f:  # fully allocated, incompressible data
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    return {"qcow2": qcow2, "raw": raw}


def measure_row(fs: str, fmt: str, image: Path, workdir: Path, label: str,
                job: tuple[str, str, str, int] | None, sides: list[str],
                args: argparse.Namespace) -> dict[str, object]:
    """One workload on every side, A B C C B A per pair; medians and pairwise ratios."""
    rates: dict[str, list[float]] = {kind: [] for kind in sides}
    load = [os.getloadavg()[0]]
    for _ in range(args.pairs):
        for kind in [*sides, *sides[::-1]]:
            rates[kind].append(measure(kind, fmt, image, workdir, job, args.size, args.runtime))
    load.append(os.getloadavg()[0])
    row: dict[str, object] = {"fs": fs, "format": fmt, "workload": label,
                              "load": [round(x, 2) for x in load]}
    for kind in sides:
        row[f"{kind}_mib_s"] = statistics.median(rates[kind])
    for anchor in sides[1:]:
        ratios = [a / b for a, b in zip(rates["vdisk"], rates[anchor], strict=True)]
        row[f"ratio_{anchor}"] = statistics.median(ratios)
        row[f"ratios_{anchor}"] = [round(r, 3) for r in ratios]
    return row


def describe(row: dict[str, object]) -> str:
    text = f"{row['fs']:5} {row['format']:5} {row['workload']:18} vdisk {row['vdisk_mib_s']:8.1f}"
    for anchor in ANCHORS:
        if f"ratio_{anchor}" in row:
            text += f"  {anchor} {row[f'{anchor}_mib_s']:8.1f} ratio {row[f'ratio_{anchor}']:.2f}"
    return text + f"  load {row['load']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    ap.add_argument("--pairs", type=int, default=2, help="A B C C B A rounds per row")
    ap.add_argument("--fs", default="disk,tmpfs",
                    help="file systems: disk (the work dir's), tmpfs (/dev/shm)")
    ap.add_argument("--formats", default="qcow2,raw", help="image formats to serve")
    ap.add_argument("--jobs", default=None, help="only workloads whose name contains this")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs alone")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--from-json", default=None, help="write the docs from a saved results.json")
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"nbd_bench: {tool} is not installed")
    have_nbdkit = shutil.which("nbdkit") is not None
    if not have_nbdkit:
        print("nbd_bench: nbdkit is not installed: the nbdkit side is skipped", flush=True)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="nbdbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, tuple[str, str, str, int] | None]] = [(j[0], j) for j in FIO_JOBS]
    jobs.append(("qemu-img convert", None))
    if args.jobs:
        jobs = [j for j in jobs if args.jobs in j[0]]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args.size, args.runtime, args.pairs = (saved["args"][k] for k in ("size", "runtime", "pairs"))
        write_docs(saved["rows"], saved["fs_types"], args)
        return 0
    rows: list[dict[str, object]] = []
    fs_types: dict[str, str] = {}
    results = workdir / "results.json"  # rewritten after every row: a cut-short run keeps its rows
    for fs in args.fs.split(","):
        where = workdir / "disk" if fs == "disk" else Path(tempfile.mkdtemp(prefix="nbdbench-",
                                                                             dir="/dev/shm"))
        where.mkdir(exist_ok=True)
        fs_types[fs] = fs_type(where)
        try:
            images = make_images(where, args.size)
            for fmt in args.formats.split(","):
                sides = ["vdisk", "qemu-nbd"] + (["nbdkit"] if have_nbdkit and fmt == "raw" else [])
                for label, job in jobs:
                    row = measure_row(fs, fmt, images[fmt], workdir, label, job, sides, args)
                    rows.append(row)
                    print(describe(row), flush=True)
                    results.write_text(json.dumps({"fs_types": fs_types, "rows": rows,
                                                   "args": vars(args)}, indent=1))
        finally:
            shutil.rmtree(where, ignore_errors=True)
    print(f"nbd_bench: results in {results}", flush=True)
    if not args.no_docs:
        write_docs(rows, fs_types, args)
    return 0


def write_plot(rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['fs']} {r['format']}: {r['workload']}" for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    height = 0.4
    for i, (anchor, color) in enumerate(zip(ANCHORS, ("tab:blue", "tab:orange"), strict=True)):
        ys = [y + (i - 0.5) * height for y in range(len(labels))]
        vals = [float(r.get(f"ratio_{anchor}", 0.0)) for r in rows][::-1]  # type: ignore[arg-type]
        ax.barh(ys, vals, height=height, color=color, label=f"vdisk / {anchor}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("throughput ratio (higher is better; 1.0: as fast as the anchor)")
    ax.set_title("vdisk nbd against qemu-nbd and nbdkit (median of pairwise ratios)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def write_docs(rows: list[dict[str, object]], fs_types: dict[str, str],
               args: argparse.Namespace) -> None:
    write_plot(rows)
    loads = [x for r in rows for x in r["load"]]  # type: ignore[attr-defined]
    fs_text = ", ".join(f"{fs} = {t}" for fs, t in fs_types.items())
    lines = [
        SECTION,
        "",
        f"`bench/nbd_bench.py --size {args.size} --runtime {args.runtime} --pairs {args.pairs}` "
        f"on {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, file systems {fs_text}, host load "
        f"(1-minute average) {min(loads):.1f}-{max(loads):.1f} during the run. "
        f"`vdisk nbd` and qemu-nbd run with `-x {EXPORT} -t -e 8 --cache=writeback`, nbdkit "
        f"with `-U SOCK -e {EXPORT} -t 8 file file=IMG` (raw only), on a unix socket, serving "
        "the same fully allocated image of random data (a fresh server per run, alternating "
        "A B C C B A); fio's nbd engine and `qemu-img convert -n` (into a preallocated raw file "
        "on the same file system, made once and kept) are the clients. Ratios: median "
        "of the pairwise vdisk/anchor rates (above 1.0: vdisk faster).",
        "",
        "| fs | image | workload | vdisk MiB/s | qemu-nbd MiB/s | nbdkit MiB/s | "
        "vdisk / qemu-nbd | vdisk / nbdkit |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [str(r["fs"]), str(r["format"]), str(r["workload"]),
                 f"{float(r['vdisk_mib_s']):.1f}"]  # type: ignore[arg-type]
        cells += [f"{float(r[f'{a}_mib_s']):.1f}" if f"{a}_mib_s" in r else "-" for a in ANCHORS]  # type: ignore[arg-type]
        cells += [f"{float(r[f'ratio_{a}']):.2f}" if f"ratio_{a}" in r else "-" for a in ANCHORS]  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![NBD ratios](img/nbd_bench.png)", ""]
    text = DOC.read_text()
    start = next(text.index(s) for s in OLD_SECTIONS if s in text)
    nxt = text.find("\n## ", start + 4)
    # keep the hand-written prose after the generated table (it starts at "How the server")
    prose = text.find("\nHow the server", start)
    end = len(text) if nxt < 0 else nxt + 1
    keep = text[prose + 1 : end] if 0 <= prose < end else ""
    DOC.write_text(text[:start] + "\n".join(lines) + "\n" + keep + text[end:])


if __name__ == "__main__":
    sys.exit(main())
