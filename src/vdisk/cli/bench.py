"""``vdisk bench``, as ``qemu-img bench``: a simple request loop against one image.

Flags, report lines and errors are qemu-img's; its queue depth is served by threads. Raw files
are sized as QEMU sees them: rounded up to whole sectors.
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
from ..sizes import round_up_to_sector
from .options import cvtnum

_INT_MAX = (1 << 31) - 1

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
@click.option("-U", "--force-share", "force_share", is_flag=True, help="Force share: open read-only beside a writer (no write lock).")
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
    if fmt is not None and fmt not in vdisk.FORMATS:
        raise UnsupportedFeatureError(f"Could not open '{path}': Unknown driver '{fmt}'")
    if (native or aio == "native") and not _CACHE_MODES[cache]:
        raise RequestError(
            f"Could not open '{path}': aio=native was specified, but it requires "
            "cache.direct=on, which was not specified."
        )
    if nrreq == 0 and n:
        # qemu-img would wait forever for requests it never sends.
        raise RequestError("Invalid queue depth specified")
    dev = vdisk.open(path, format=fmt, readonly=not write, force_share=force_share)
    try:
        real = dev.size
        image_size = round_up_to_sector(real) if isinstance(dev, RawDevice) else real
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


COMMANDS: tuple[click.Command, ...] = (bench_cmd,)
