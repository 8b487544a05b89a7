"""vdisk's NBD server against qemu-nbd, same images, same clients, in one run.

For the qcow2 and the raw image, each workload runs on both servers in A B B A order (a fresh
server per measurement, each writing into the same image file in place); a row's figure is the
median of the pairwise ratios (vdisk rate / qemu-nbd rate). Workloads: fio's nbd engine (4K
random read at QD1/8/64, 4K random write at QD8, 1M sequential read and write at QD8) and
``qemu-img convert nbd+unix://... -O raw``.

    .venv/bin/python bench/nbd_bench.py [--size 1024] [--runtime 5] [--pairs 2] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "nbd_bench.png"
SECTION = "## NBD server vs `qemu-nbd`"

FIO_JOBS = [
    ("4K randread QD1", "randread", "4k", 1),
    ("4K randread QD8", "randread", "4k", 8),
    ("4K randread QD64", "randread", "4k", 64),
    ("4K randwrite QD8", "randwrite", "4k", 8),
    ("1M seq read QD8", "read", "1M", 8),
    ("1M seq write QD8", "write", "1M", 8),
]


def start_server(kind: str, fmt: str, image: Path, sock: str) -> subprocess.Popen[bytes]:
    if kind == "vdisk":
        cmd = [sys.executable, "-m", "vdisk", "nbd", "-f", fmt, "-k", sock, "-t", "-e", "0",
               "--cache=writeback", str(image)]
    else:
        cmd = ["qemu-nbd", "-f", fmt, "-k", sock, "-t", "-e", "0", "--cache=writeback",
               str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    import socket

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
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out)], check=True)
    dt = time.perf_counter() - t0
    out.unlink()
    return size_mib / dt


def measure(kind: str, fmt: str, image: Path, workdir: Path, job: tuple[str, str, str, int] | None,
            size_mib: int, runtime: float) -> float:
    sock = str(workdir / f"{kind}.sock")
    proc = start_server(kind, fmt, image, sock)
    try:
        uri = f"nbd+unix:///?socket={sock}"
        if job is None:
            return run_convert(uri, workdir / "convert.raw", size_mib)
        _, rw, bs, qd = job
        return run_fio(uri, rw, bs, qd, size_mib, runtime)
    finally:
        stop_server(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    ap.add_argument("--pairs", type=int, default=2, help="A B B A pairs per row (x2 runs)")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs alone")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"nbd_bench: {tool} is not installed")
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="nbdbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "disk.raw"
    qcow2 = workdir / "disk.qcow2"
    with open(raw, "wb") as f:  # fully allocated, incompressible data
        for _ in range(args.size):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    rows: list[dict[str, object]] = []
    jobs: list[tuple[str, tuple[str, str, str, int] | None]] = [(j[0], j) for j in FIO_JOBS]
    jobs.append(("qemu-img convert", None))
    for fmt, image in (("qcow2", qcow2), ("raw", raw)):
        for label, job in jobs:
            ours: list[float] = []
            theirs: list[float] = []
            for _ in range(args.pairs):
                for kind in ("vdisk", "qemu", "qemu", "vdisk"):
                    rate = measure(kind, fmt, image, workdir, job, args.size, args.runtime)
                    (ours if kind == "vdisk" else theirs).append(rate)
            # pair run i of vdisk with run i of qemu-nbd (A B B A: 1st with 1st, 2nd with 2nd)
            ratios = [a / b for a, b in zip(ours, theirs)]
            row = {"format": fmt, "workload": label, "vdisk_mib_s": statistics.median(ours),
                   "qemu_mib_s": statistics.median(theirs), "ratio": statistics.median(ratios),
                   "ratios": ratios}
            rows.append(row)
            print(f"{fmt:5} {label:18} vdisk {row['vdisk_mib_s']:9.1f} MiB/s  qemu-nbd "
                  f"{row['qemu_mib_s']:9.1f} MiB/s  ratio {row['ratio']:.2f}", flush=True)
    (workdir / "results.json").write_text(json.dumps(rows, indent=1))
    if not args.no_docs:
        write_docs(rows, args)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_docs(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['format']}: {r['workload']}" for r in rows]
    ratios = [float(r["ratio"]) for r in rows]  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    colors = ["tab:blue" if r["format"] == "qcow2" else "tab:orange" for r in rows]
    ax.barh(labels[::-1], ratios[::-1], color=colors[::-1])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(0.8, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlabel("vdisk nbd / qemu-nbd (higher is better)")
    ax.set_title("NBD server throughput ratio (median of A B B A pairs)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    lines = [
        SECTION,
        "",
        f"`bench/nbd_bench.py --size {args.size} --runtime {args.runtime} --pairs {args.pairs}` "
        f"on {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}. Both servers run with `-t -e 0 "
        "--cache=writeback` on a unix socket, serving the same fully allocated image of random "
        "data (a fresh server per run, alternating A B B A); fio 3.33's nbd engine and "
        "`qemu-img convert` are the clients. Ratio: median of the pairwise vdisk/qemu-nbd rates "
        "(above 1.0: vdisk faster). Targets: >= 1.0 on qcow2, >= 0.8 on raw.",
        "",
        "| image | workload | vdisk MiB/s | qemu-nbd MiB/s | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['workload']} | {float(r['vdisk_mib_s']):.1f} | "  # type: ignore[arg-type]
                     f"{float(r['qemu_mib_s']):.1f} | {float(r['ratio']):.2f} |")  # type: ignore[arg-type]
    lines += ["", "![NBD ratios](img/nbd_bench.png)", ""]
    text = DOC.read_text()
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    DOC.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
