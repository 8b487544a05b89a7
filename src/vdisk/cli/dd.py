"""``dd`` and ``bench``, as ``qemu-img dd`` and ``qemu-img bench``.

``dd`` copies an image into a new one, with dd(1)-style operands.

qemu-img's quirks kept on purpose: ``count`` limits the input size *before* ``skip`` is taken
off it (so ``count=2 skip=1`` copies one block), a ``skip`` past the end only warns and leaves
an empty output (exit status 0), and new images are sized in whole 512-byte sectors, as QEMU
creates them. Raw inputs are sized as QEMU sees them: rounded up to whole sectors.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import threading
import time

import click

from ..block import BlockDevice
from ..errors import RequestError, UnsupportedFeatureError, VdiskError
from .tools import SECTOR, _SectorPadded

_FORMATS = ("qcow2", "raw")
_INT_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_CHUNK = 1 << 20  # copy in large pieces: the bytes written are the same as bs-sized ones
_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# qemu_strtosz: decimal (a fraction only with a suffix above bytes) or hex, one suffix letter.
_NUM_RE = re.compile(r"^\s*(?:(0x[0-9a-f]+)|(\d+(?:\.\d*)?|\.\d+))([bkmgtpe]?)$", re.IGNORECASE)


def cvtnum(name: str, text: str, low: int = 0, high: int = _INT64_MAX) -> int:
    """A size operand as qemu-img's cvtnum_full parses it, with its error messages."""
    m = _NUM_RE.match(text)
    value: int | None = None
    if m is not None:
        hexa, dec, suffix = m.groups()
        shift = _SHIFTS[suffix.lower()] if suffix else 0
        if hexa is not None:
            value = int(hexa, 16) << shift
        elif "." not in dec:
            value = int(dec) << shift
        elif shift:  # qemu truncates the fractional bytes
            whole, _, frac = dec.partition(".")
            value = (int(whole or "0") << shift) + int(float("0." + (frac or "0")) * (1 << shift))
    if value is None:
        raise RequestError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    if not low <= value <= high:
        raise RequestError(f"Invalid {name} specified. Must be between {low} and {high}.")
    return value


@click.command("dd", context_settings={"ignore_unknown_options": False})
@click.option("-f", "fmt", metavar="FMT", help="Input format (default: probe).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (raw, qcow2).")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.argument("operands", nargs=-1, metavar="[bs=N] [count=N] [skip=N] if=IN of=OUT")
def dd_cmd(fmt: str | None, out_fmt: str, force_share: bool, operands: tuple[str, ...]) -> int:
    """Copy IN into a new image OUT (of format -O), like qemu-img dd."""
    import vdisk

    bs, count, skip = 512, None, None
    src = dst = None
    for operand in operands:
        key, eq, value = operand.partition("=")
        if not eq or key not in ("bs", "count", "if", "of", "skip"):
            raise RequestError(f"unrecognized operand {key}")
        if key == "bs":
            bs = cvtnum("bs", value, 1, _INT_MAX)
        elif key == "count":
            count = cvtnum("count", value)
        elif key == "skip":
            skip = cvtnum("skip", value)
        elif key == "if":
            src = value
        else:
            dst = value
    if src is None or dst is None:
        raise RequestError("Must specify both input and output files")
    if fmt is not None and fmt not in _FORMATS:
        raise UnsupportedFeatureError(f"Could not open '{src}': Unknown driver '{fmt}'")
    source = vdisk.open(src, format=fmt, readonly=True)
    try:
        from ..backends.raw import RawDevice

        inp: BlockDevice | _SectorPadded = source
        if isinstance(source, RawDevice):
            inp = _SectorPadded(source)
        if out_fmt not in _FORMATS:
            raise UnsupportedFeatureError("Unknown file format")
        size = inp.size
        if count is not None and count <= _INT64_MAX // bs and count * bs < size:
            size = count * bs
        beyond = skip is not None and (skip > _INT64_MAX // bs or size < skip * bs)
        start = size if beyond else (skip or 0) * bs
        out_size = size - start
        vdisk.create(dst, -(-out_size // SECTOR) * SECTOR, format=out_fmt)
        with vdisk.open(dst, format=out_fmt) as target:
            if beyond:  # like dd(1): a warning and an empty output, not a failure
                click.echo(f"vdisk: {src}: cannot skip to specified offset", err=True)
            buf = bytearray(min(_CHUNK, max(out_size, 1)))
            pos = start
            while pos < size:
                n = min(len(buf), size - pos)
                view = memoryview(buf)[:n]
                inp.readinto(view, pos)
                target.write(view, pos - start)
                pos += n
            target.flush()
    finally:
        source.close()
    return 0


# -- bench -----------------------------------------------------------------------------------

_CACHE_MODES = {"none": True, "off": True, "directsync": True, "writeback": False}
_CACHE_MODES |= {"writethrough": False, "unsafe": False}  # mode -> O_DIRECT
_AIO_MODES = ("threads", "native", "io_uring")


def strtoul(text: str) -> int | None:
    """C's strtoul with base 0 over the whole string (qemu_strtoul): None if not a number.

    A leading minus wraps around, as in C, so that "-1" comes out huge."""
    body = text.lstrip()
    neg = body.startswith("-")
    body = body[1:] if body[:1] in "+-" else body
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
        value = int(body, 16)
    elif re.fullmatch(r"0[0-7]*", body):
        value = int(body, 8)
    elif re.fullmatch(r"[1-9][0-9]*", body):
        value = int(body)
    else:
        return None
    return (-value) % (1 << 64) if neg else value


def _ulong_opt(text: str | None, default: int, high: int, message: str) -> int:
    if text is None:
        return default
    value = strtoul(text)
    if value is None or value > high:
        raise RequestError(message)
    return value


class _Bench:
    """qemu-img bench's request loop over threads: ``depth`` workers share one offset cursor.

    Request i goes to offset (start + i*step) mod size; every write carries the same pattern
    buffer, so the image ends up as with qemu-img whatever the completion order."""

    def __init__(self, dev: BlockDevice, size: int, real: int, args: dict[str, int]) -> None:
        self.dev, self.size, self.real = dev, size, real
        self.bufsize, self.step = args["bufsize"], args["step"]
        self.write, self.pattern = bool(args["write"]), args["pattern"]
        self.flush_interval, self.drain = args["flush_interval"], bool(args["drain"])
        self.todo = args["count"]  # requests not yet submitted
        self.offset = args["offset"]
        self.in_flight = 0
        self.flushing = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def _next(self) -> int | None:
        """The next request's offset, or None when all are submitted or one failed."""
        with self.cond:
            while self.flushing and self.error is None:
                self.cond.wait()
            if self.todo == 0 or self.error is not None:
                return None
            self.todo -= 1
            self.in_flight += 1
            offset = self.offset
            self.offset = (self.offset + self.step) % self.size
            return offset

    def _io(self, buf: bytearray, offset: int) -> None:
        if offset + self.bufsize > self.size:
            raise VdiskError("Failed request: Input/output error")
        # A raw file's tail past its last byte (QEMU counts whole sectors) is not in the file.
        n = max(0, min(self.bufsize, self.real - offset))
        view = memoryview(buf)
        if self.write:
            if n:
                self.dev.write(view[:n], offset)
        elif n:
            self.dev.readinto(view[:n], offset)

    def _done(self) -> None:
        with self.cond:
            self.in_flight -= 1
            flush = bool(self.flush_interval) and self.todo % self.flush_interval == 0
            if flush and self.drain:
                # Stop submitting; the last request to come back issues the flush.
                self.flushing = True
                flush = self.in_flight == 0
            self.cond.notify_all()
        if flush:
            try:
                self.dev.flush()
            finally:
                with self.cond:
                    self.flushing = False
                    self.cond.notify_all()

    def worker(self) -> None:
        buf = bytearray([self.pattern]) * self.bufsize
        try:
            while (offset := self._next()) is not None:
                try:
                    self._io(buf, offset)
                finally:
                    self._done()
        except BaseException as exc:  # handed to the main thread
            with self.cond:
                if self.error is None:
                    self.error = exc
                self.cond.notify_all()

    def run(self, depth: int) -> None:
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(depth)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            if isinstance(self.error, VdiskError) and self.error.message.startswith("Failed"):
                raise self.error
            code = getattr(self.error, "errno", None) or _errno.EIO
            raise VdiskError(f"Failed request: {os.strerror(code)}") from self.error


@click.command("bench")
@click.option("-c", "count", metavar="COUNT", help="Number of requests (default 75000).")
@click.option("-d", "depth", metavar="DEPTH", help="Requests in parallel (default 64).")
@click.option("-f", "fmt", metavar="FMT", help="Image format (default: probe).")
@click.option("-n", "native", is_flag=True, help="Native AIO (needs -t none or directsync).")
@click.option("-i", "aio", metavar="AIO", help="AIO mode: threads, native or io_uring.")
@click.option("-o", "offset", metavar="OFFSET", help="First request's offset (default 0).")
@click.option("-q", "quiet", is_flag=True, help="Quiet (accepted; the report still prints).")
@click.option("-s", "bufsize", metavar="BUFFER_SIZE", help="Bytes per request (default 4k).")
@click.option("-S", "step", metavar="STEP_SIZE", help="Offset step (default: buffer size).")
@click.option("-t", "cache", default="writeback", metavar="CACHE", help="Cache mode.")
@click.option("-w", "write", is_flag=True, help="Write requests instead of reads.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Accepted (no locking).")
@click.option("--pattern", "pattern", metavar="N", help="Byte written by -w (default 0).")
@click.option("--flush-interval", "flush_interval", metavar="N", help="Flush every N writes.")
@click.option("--no-drain", "no_drain", is_flag=True, help="Flush without draining the queue.")
@click.argument("files", nargs=-1, metavar="FILE")
def bench_cmd(
    count: str | None,
    depth: str | None,
    fmt: str | None,
    native: bool,
    aio: str | None,
    offset: str | None,
    quiet: bool,
    bufsize: str | None,
    step: str | None,
    cache: str,
    write: bool,
    force_share: bool,
    pattern: str | None,
    flush_interval: str | None,
    no_drain: bool,
    files: tuple[str, ...],
) -> int:
    """Run a simple I/O benchmark on FILE, like qemu-img bench."""
    import vdisk

    from ..backends.raw import RawDevice

    n = _ulong_opt(count, 75000, _INT_MAX, "Invalid request count specified")
    nrreq = _ulong_opt(depth, 64, _INT_MAX, "Invalid queue depth specified")
    start = 0 if offset is None else cvtnum("offset", offset)
    size = 4096 if bufsize is None else cvtnum("buffer size", bufsize, 0, _INT_MAX)
    stride = 0 if step is None else cvtnum("step_size", step, 0, _INT_MAX)
    if cache not in _CACHE_MODES:
        raise RequestError("Invalid cache mode")
    if aio is not None and aio not in _AIO_MODES:
        raise RequestError(f"Invalid aio option: {aio}")
    byte = _ulong_opt(pattern, 0, 0xFF, "Invalid pattern byte specified")
    interval = _ulong_opt(flush_interval, 0, _INT_MAX, "Invalid flush interval specified")
    if len(files) != 1:
        raise click.UsageError("Expecting one image file name")
    path = files[0]
    if not write and interval:
        raise RequestError("--flush-interval is only available in write tests")
    if interval and interval < nrreq:
        raise RequestError("Flush interval can't be smaller than depth")
    if fmt is not None and fmt not in _FORMATS:
        raise UnsupportedFeatureError(f"Could not open '{path}': Unknown driver '{fmt}'")
    if (native or aio == "native") and not _CACHE_MODES[cache]:
        raise RequestError(
            f"Could not open '{path}': aio=native was specified, but it requires "
            "cache.direct=on, which was not specified."
        )
    if nrreq == 0 and n:
        # qemu-img would wait forever for requests it never sends.
        raise RequestError("Invalid queue depth specified")
    dev = vdisk.open(path, format=fmt, readonly=not write)
    try:
        real = dev.size
        image_size = -(-real // SECTOR) * SECTOR if isinstance(dev, RawDevice) else real
        kind = "write" if write else "read"
        click.echo(
            f"Sending {n} {kind} requests, {size} bytes each, {nrreq} in parallel "
            f"(starting at offset {start}, step size {stride or size})"
        )
        if interval:
            click.echo(f"Sending flush every {interval} requests")
        if n and image_size == 0:
            raise VdiskError("Failed request: Input/output error")
        args = {
            "bufsize": size,
            "step": stride or size,
            "write": write,
            "pattern": byte,
            "flush_interval": interval,
            "drain": not no_drain,
            "count": n,
            "offset": start,
        }
        bench = _Bench(dev, image_size, real, args)
        t0 = time.monotonic()
        bench.run(min(nrreq, n))
        click.echo(f"Run completed in {time.monotonic() - t0:.3f} seconds.")
    finally:
        dev.close()
    return 0


COMMANDS = [dd_cmd, bench_cmd]
