"""Run one command inside a throw-away QEMU (TCG) VM that sees the host's files.

The host kernel may lack ublk, so tests that need a real kernel feature boot a small VM: the
kernel comes from ``VDISK_TEST_KERNEL`` (a bzImage with ublk, io_uring, 9p, overlayfs... built
in; or, with ``VDISK_TEST_INITRD``, a modular kernel whose initramfs loads those modules and then
mounts the same root and runs the same init, see scripts/fetch-test-kernel), the guest's root is the host's ``/`` shared read-only over virtio-9p, and a tmpfs-backed
overlayfs on top makes it writable without hiding any host path (so a venv under /tmp or
/var/tmp stays visible). A generated init mounts the basics, runs the one command as root with
the project's venv first on PATH, writes its output and exit status into a second, writable
9p share (a host temp dir, mounted in the guest at the same path), then powers off.

Every run is bounded by a hard timeout that kills QEMU; a boot failure or a timeout comes back
as a `VMResult` whose ``status`` says so, with the serial console's tail for diagnosis.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from vdisk.errors import VdiskError

__all__ = [
    "KernelSpec",
    "VMBootError",
    "VMError",
    "VMResult",
    "VMTimeoutError",
    "VMUnavailableError",
    "extra_kernels",
    "find_initrd",
    "find_kernel",
    "find_qemu",
    "project_root",
    "run",
    "unavailable_reason",
]

#: Set in the guest's environment; the pytest plugin runs vm tests directly when it sees it.
IN_VM_ENV = "VDISK_IN_VM"
#: The guest-side path of the writable results directory (same path as on the host).
RESULTS_ENV = "VDISK_VM_RESULTS"
#: A command may write its exit status into this file of the results directory once its work is
#: done: if the guest then fails to power off (say, a process stuck in the kernel cannot exit),
#: the run ends DONE_GRACE seconds later, with that status, instead of at its hard timeout.
DONE_NAME = "done"
DONE_GRACE = 20.0

DEFAULT_MEMORY = "2G"
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 300.0
_RESULTS_TAG = "vdiskres"
_CONSOLE_TAIL_LINES = 40
# Terminal control sequences SeaBIOS and the kernel print on the serial line.
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[@-Z\\-_c])")

Status = Literal["ok", "timeout", "boot-failed"]


class VMError(VdiskError):
    """The VM could not run the command to completion."""


class VMUnavailableError(VMError):
    """No test kernel or no qemu-system-x86_64 on this host."""


class VMBootError(VMError):
    """QEMU exited without the command reporting an exit status (boot or init failure)."""


class VMTimeoutError(VMError):
    """The VM run exceeded its hard timeout and QEMU was killed."""


@dataclass
class VMResult:
    """What came back from one VM run."""

    status: Status
    #: The command's exit status; None unless ``status == "ok"``.
    returncode: int | None
    #: The command's stdout and stderr, interleaved (partial on timeout).
    output: str
    #: The whole serial console log (kernel messages, init diagnostics).
    console: str
    #: Wall-clock seconds from QEMU start to exit.
    duration: float
    argv: list[str]
    #: Files named in ``run(collect=...)``, read back from the results directory if present.
    files: dict[str, bytes] = field(default_factory=dict)
    #: The guest kernel log, saved when the command failed (empty otherwise).
    dmesg: str = ""

    @property
    def console_tail(self) -> str:
        return "\n".join(self.console.splitlines()[-_CONSOLE_TAIL_LINES:])

    def describe(self) -> str:
        """A multi-line account fit for a test failure message."""
        cmd = shlex.join(self.argv)
        if self.status == "ok":
            head = f"VM command exited with status {self.returncode}: {cmd}"
        elif self.status == "timeout":
            head = f"VM run timed out after {self.duration:.0f}s and was killed: {cmd}"
        elif "Kernel panic" in self.console:
            head = f"VM kernel panicked before the command finished: {cmd}"
        else:
            head = f"VM stopped with no exit status (boot or init failure): {cmd}"
        parts = [head]
        if self.output:
            parts.append("--- command output ---\n" + self.output.rstrip())
        if self.dmesg:
            tail = "\n".join(self.dmesg.splitlines()[-_CONSOLE_TAIL_LINES:])
            parts.append("--- guest kernel log tail ---\n" + tail.rstrip())
        if self.status != "ok" or not self.output:
            parts.append("--- console tail ---\n" + self.console_tail.rstrip())
        return "\n".join(parts)

    def check(self) -> VMResult:
        """Raise `VMTimeoutError` / `VMBootError` unless the command ran (any exit status)."""
        if self.status == "timeout":
            raise VMTimeoutError(self.describe())
        if self.status == "boot-failed":
            raise VMBootError(self.describe())
        return self


def project_root() -> Path:
    """The source checkout this module lives in (``src/vdisk/testing`` -> root)."""
    return Path(__file__).resolve().parents[3]


def find_kernel() -> Path | None:
    """The test kernel: ``$VDISK_TEST_KERNEL``, else the newest scripts/build-test-kernel build."""
    env = os.environ.get("VDISK_TEST_KERNEL")
    if env:
        p = Path(env)
        return p if p.is_file() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vdisk"
    built = sorted(cache.glob("bzImage-*"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else None


def find_initrd() -> Path | None:
    """The initramfs for the default kernel: ``$VDISK_TEST_INITRD`` (None: boot without one)."""
    env = os.environ.get("VDISK_TEST_INITRD")
    return Path(env) if env else None


@dataclass(frozen=True)
class KernelSpec:
    """A further kernel the vm tests also run on (one entry of ``$VDISK_TEST_KERNELS``)."""

    #: Short name shown in test ids, e.g. ``linux-6.12``.
    label: str
    kernel: Path | None
    initrd: Path | None = None
    #: Why it cannot boot (missing files, or the reason given in the entry); None when it can.
    unavailable: str | None = None


def extra_kernels(value: str | None = None) -> list[KernelSpec]:
    """Parse ``$VDISK_TEST_KERNELS``: ``;``-separated ``LABEL=KERNEL[,INITRD]`` entries, or
    ``LABEL=!REASON`` for a kernel that was wanted but could not be had (its tests skip)."""
    if value is None:
        value = os.environ.get("VDISK_TEST_KERNELS", "")
    specs = []
    for entry in value.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        label, sep, rest = entry.partition("=")
        label = label.strip()
        if not sep or not label or not rest:
            specs.append(
                KernelSpec(label or entry, None, None, f"bad VDISK_TEST_KERNELS entry {entry!r}")
            )
            continue
        if rest.startswith("!"):
            specs.append(KernelSpec(label, None, None, rest[1:].strip() or "unavailable"))
            continue
        kpath, _, ipath = rest.partition(",")
        kernel = Path(kpath)
        initrd = Path(ipath) if ipath else None
        missing = [str(p) for p in (kernel, initrd) if p is not None and not p.is_file()]
        why = f"{' and '.join(missing)} missing" if missing else None
        specs.append(KernelSpec(label, kernel, initrd, why))
    return specs


def find_qemu() -> str | None:
    return os.environ.get("VDISK_QEMU") or shutil.which("qemu-system-x86_64")


def unavailable_reason() -> str | None:
    """Why VM runs cannot happen here, or None when they can."""
    missing = []
    env = os.environ.get("VDISK_TEST_KERNEL")
    if find_kernel() is None:
        if env:
            missing.append(f"test kernel VDISK_TEST_KERNEL={env} does not exist")
        else:
            missing.append(
                "no test kernel (set VDISK_TEST_KERNEL to a bzImage, or run scripts/build-test-kernel)"
            )
    initrd = find_initrd()
    if initrd is not None and not initrd.is_file():
        missing.append(f"initramfs VDISK_TEST_INITRD={initrd} does not exist")
    if find_qemu() is None:
        missing.append("qemu-system-x86_64 not found (apt install qemu-system-x86)")
    return "; ".join(missing) if missing else None


def _venv_bin() -> Path:
    """The bin dir of the Python running us (a venv), else of the project's .venv."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    local = project_root() / ".venv" / "bin"
    return local if local.is_dir() else Path(sys.executable).parent


# Stage 1 runs as PID 1 on the read-only 9p root: build the overlay, then chroot into it.
# The overlay's lower layer is the 9p root mount itself, so the tmpfs mounted for upper/work
# (over some existing directory) hides nothing in the merged view.
_STAGE1 = r"""#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
die() {
    echo "vdisk-vm: init: $*"
    echo o > /proc/sysrq-trigger
    sleep 60
}
mount -t proc proc /proc || die "cannot mount /proc"
S=
for d in /run /mnt /tmp /media /srv; do
    if [ -d "$d" ]; then S=$d; break; fi
done
[ -n "$S" ] || die "no directory to mount the overlay's tmpfs on"
mount -t tmpfs -o mode=0755 vdisk-overlay "$S" || die "cannot mount tmpfs on $S"
mkdir -p "$S/upper" "$S/work" "$S/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$S/root" \
    || die "cannot mount the overlay over /"
exec chroot "$S/root" /bin/sh @STAGE2@
die "cannot chroot into the overlay"
"""

# Stage 2 runs as PID 1 inside the writable overlay root: mount the rest, run the command,
# report, power off. The exit status goes to a file written only after the command ended.
_STAGE2 = r"""#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
R=@RESULTS@
off() {
    sync
    echo o > /proc/sysrq-trigger
    sleep 60
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none @TAG@ "$R"; then
    echo "vdisk-vm: init: cannot mount the results share on $R"
    off
fi
if command -v ip >/dev/null 2>&1; then
    ip link set lo up
else
    @PYTHON@ -c '
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
req = struct.pack("16sH", b"lo", 0)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, req)[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
' || echo "vdisk-vm: init: cannot bring up lo"
fi
hostname vdisk-vm 2>/dev/null
. @DIR@/env.sh
cd @CWD@ || cd /
echo "vdisk-vm: running command"
/bin/sh @DIR@/cmd.sh </dev/null >"$R/output" 2>&1
rc=$?
[ "$rc" = 0 ] || dmesg >"$R/dmesg" 2>&1
echo "$rc" >"$R/status.tmp" && mv "$R/status.tmp" "$R/status"
echo "vdisk-vm: command exited with status $rc"
off
"""


_HOST_ONLY = frozenset({"VDISK_TEST_KERNEL", "VDISK_TEST_INITRD", "VDISK_TEST_KERNELS"})


def _guest_env(results: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    venv = _venv_bin()
    env = {
        "PATH": f"{venv}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": str(venv.parent),
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        IN_VM_ENV: "1",
        RESULTS_ENV: str(results),
    }
    # Pass the host's VDISK_* knobs through (the test kernel paths are meaningless inside).
    for key, value in os.environ.items():
        if key.startswith("VDISK_") and key not in env and key not in _HOST_ONLY:
            env[key] = value
    if extra:
        env.update(extra)
    return env


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    memory: str | None = None,
    cpus: int | None = None,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    collect: Sequence[str] = (),
    stream: TextIO | None = None,
) -> VMResult:
    """Boot a VM, run ``argv`` in it (as root, via /bin/sh from ``cwd``), and power it off.

    Never raises for a failed boot or a timeout: look at ``result.status`` or call
    ``result.check()``. Raises `VMUnavailableError` when there is no kernel or no QEMU.
    ``collect`` names files the command may write into ``$VDISK_VM_RESULTS``; they come back in
    ``result.files``. ``stream`` receives the command's output live, as it is produced.
    ``kernel`` and ``initrd`` default to `find_kernel` and `find_initrd`; a ``kernel`` given
    without ``initrd`` boots without an initramfs.
    """
    argv = list(argv)
    if not argv:
        raise VMError("empty command")
    qemu = find_qemu()
    if kernel is not None:
        kpath: Path | None = Path(kernel)
        ipath = Path(initrd) if initrd is not None else None
    else:
        kpath = find_kernel()
        ipath = Path(initrd) if initrd is not None else find_initrd()
    if qemu is None or kpath is None or not kpath.is_file():
        reason = unavailable_reason() or f"test kernel {kpath} does not exist"
        raise VMUnavailableError(reason)
    if ipath is not None and not ipath.is_file():
        raise VMUnavailableError(f"initramfs {ipath} does not exist")
    memory = memory or os.environ.get("VDISK_VM_MEMORY", DEFAULT_MEMORY)
    cpus = cpus or int(os.environ.get("VDISK_VM_CPUS", DEFAULT_CPUS))
    guest_cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()

    # The temp dir must be on a host path the guest sees through the root share (any local
    # directory is; /tmp is not special because the overlay hides nothing).
    work = Path(tempfile.mkdtemp(prefix="vdisk-vm-", dir=os.environ.get("VDISK_VM_TMPDIR")))
    try:
        results = work / "results"
        results.mkdir()
        _write_boot_files(work, results, argv, env, guest_cwd)
        cmd = _qemu_command(qemu, memory, cpus, kpath, ipath, work, results)
        console_path = work / "console.log"
        start = time.monotonic()
        with open(console_path, "wb") as console_f:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console_f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            try:
                ended = _wait(proc, start + timeout, results, stream)
            finally:
                # Interrupted (Ctrl-C, pytest-timeout...): never leave QEMU running.
                if proc.poll() is None:
                    _kill(proc)
        duration = time.monotonic() - start
        console = _ANSI.sub("", _read_text(console_path).replace("\r\n", "\n"))
        status, returncode, note = _outcome(ended, proc.returncode, results)
        files = {}
        for name in collect:
            try:
                files[name] = (results / name).read_bytes()
            except OSError:
                pass
        return VMResult(
            status,
            returncode,
            _read_text(results / "output"),
            console + note,
            duration,
            argv,
            files,
            _read_text(results / "dmesg"),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_boot_files(
    work: Path, results: Path, argv: list[str], env: Mapping[str, str] | None, guest_cwd: Path
) -> None:
    """The guest's environment, command and both init stages, in the run's temp dir."""
    env_sh = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _guest_env(results, env).items())
    (work / "env.sh").write_text(env_sh)
    (work / "cmd.sh").write_text("exec " + shlex.join(argv) + "\n")
    subst = {
        "@STAGE2@": shlex.quote(str(work / "stage2")),
        "@RESULTS@": shlex.quote(str(results)),
        "@DIR@": shlex.quote(str(work)),
        "@CWD@": shlex.quote(str(guest_cwd)),
        "@TAG@": _RESULTS_TAG,
        "@PYTHON@": shlex.quote(str(_venv_bin() / "python")),
    }
    for name, text in (("init", _STAGE1), ("stage2", _STAGE2)):
        for key, value in subst.items():
            text = text.replace(key, value)
        (work / name).write_text(text)
        (work / name).chmod(0o755)


def _qemu_command(
    qemu: str,
    memory: str,
    cpus: int,
    kernel: Path,
    initrd: Path | None,
    work: Path,
    results: Path,
) -> list[str]:
    """TCG, a serial console, the host's / read-only over 9p as root and the results share."""
    return [
        qemu,
        "-accel", "tcg",
        "-cpu", "max",
        "-m", memory,
        "-smp", str(cpus),
        "-kernel", str(kernel),
        *(["-initrd", str(initrd)] if initrd is not None else []),
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial", "stdio",
        "-net", "none",
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=root",
        "-fsdev", f"local,id=res,path={results},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=res,mount_tag={_RESULTS_TAG}",
        "-append",
        "root=root rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro"
        f" console=ttyS0 init={work / 'init'} panic=-1 quiet",
    ]  # fmt: skip


def _outcome(ended: str, qemu_status: int | None, results: Path) -> tuple[Status, int | None, str]:
    """(status, the command's exit status, a note for the console log) from the results."""
    status_text = _read_text(results / "status").strip()
    done_text = _read_text(results / DONE_NAME).strip()
    if ended == "timeout":
        return "timeout", None, ""
    if status_text.lstrip("-").isdigit():
        return "ok", int(status_text), ""
    if done_text.lstrip("-").isdigit():
        returncode = int(done_text)
        return (
            "ok",
            returncode,
            f"\n[the command reported done (status {returncode}) but the VM did not power off"
            f" within {DONE_GRACE:g}s: killed]",
        )
    return "boot-failed", None, f"\n[qemu exited with status {qemu_status}]" if qemu_status else ""


def _wait(
    proc: subprocess.Popen[bytes], deadline: float, results: Path, stream: TextIO | None
) -> Literal["exited", "timeout", "done"]:
    """Wait for QEMU until ``deadline``, or until DONE_GRACE after the command wrote its
    DONE_NAME file; kill it (and its group) then. Says how the wait ended."""
    output, done = results / "output", results / DONE_NAME
    pos = 0
    ending: Literal["timeout", "done"] = "timeout"
    while True:
        if stream is not None:
            pos = _pump(output, pos, stream)
        if ending == "timeout" and done.exists():
            ending = "done"
            deadline = min(deadline, time.monotonic() + DONE_GRACE)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            proc.wait(timeout=min(left, 0.2 if stream is not None else 1.0))
            if stream is not None:
                _pump(output, pos, stream)
            return "exited"
        except subprocess.TimeoutExpired:
            continue
    _kill(proc)
    if stream is not None:
        _pump(output, pos, stream)
    return ending


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if our parent dies, so a killed test run leaves no VM."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _pump(path: Path, pos: int, stream: TextIO) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    if data:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()
    return pos + len(data)


def main(args: Sequence[str] | None = None) -> int:
    """``scripts/vm-run``: run a command in the VM, stream its output, exit with its status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vm-run",
        description="Run one command as root inside the vdisk test VM (QEMU TCG) and exit with "
        "its status. The guest sees the host's files (read-only root + a throw-away overlay), "
        "starts in the current directory and has the project's venv first on PATH.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="hard limit in seconds for the whole run (default %(default)s)",
    )
    parser.add_argument("--memory", default=None, help=f"guest RAM (default {DEFAULT_MEMORY})")
    parser.add_argument(
        "--cpus", type=int, default=None, help=f"guest vCPUs (default {DEFAULT_CPUS})"
    )
    parser.add_argument(
        "--kernel",
        default=None,
        help="bzImage (default $VDISK_TEST_KERNEL, else the newest "
        "scripts/build-test-kernel build)",
    )
    parser.add_argument(
        "--initrd",
        default=None,
        help="initramfs for a modular kernel (default $VDISK_TEST_INITRD when --kernel is not "
        "given; see scripts/fetch-test-kernel)",
    )
    parser.add_argument(
        "--console", action="store_true", help="print the whole serial console log afterwards"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the command (repeatable)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    ns = parser.parse_args(args)
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given")
    extra = dict(kv.split("=", 1) for kv in ns.env)
    try:
        result = run(
            command,
            timeout=ns.timeout,
            memory=ns.memory,
            cpus=ns.cpus,
            kernel=ns.kernel,
            initrd=ns.initrd,
            env=extra,
            stream=sys.stdout,
        )
    except VMError as e:
        print(f"vm-run: {e}", file=sys.stderr)
        return 125
    if ns.console:
        print("--- console ---\n" + result.console.rstrip(), file=sys.stderr)
    if result.status != "ok":
        print(f"vm-run: {result.describe()}", file=sys.stderr)
        return 124 if result.status == "timeout" else 125
    print(f"vm-run: exit status {result.returncode} ({result.duration:.1f}s)", file=sys.stderr)
    assert result.returncode is not None
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
