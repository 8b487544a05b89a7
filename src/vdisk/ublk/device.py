"""A ublk device: its lifecycle, its parameters and its queues.

    dev = Device.create(backend, UblkParams(queues=2))   # ADD_DEV + SET_PARAMS
    dev.start()                                          # queues FETCH every tag, START_DEV
    ...                                                  # /dev/ublkbN serves the backend
    dev.stop()                                           # STOP_DEV while serving, queues drain
    dev.close()                                          # close /dev/ublkcN, DEL_DEV

``close()`` does whatever of stop/close is still needed and is idempotent, so a ``with`` block
or a signal handler can always call it. After a crash of the server (kill -9) a device created
with ``user_recovery`` stays, quiesced; ``Device.recover(dev_id, backend)`` reattaches it.
``delete(dev_id, control)`` removes a device from outside its server (``vdisk ublk del``); it
never sends a second DEL_DEV while the server sends its own (Linux 6.1 deadlocks on that, see
``Device._del_dev`` and the ublk section of docs/architecture.md).
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import logging.handlers
import os
import queue as queue_mod
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Self

from ..block import BlockDevice, FileBacked
from ..metrics import IoMetrics, register, unregister
from . import uapi
from .control import Control, encoded_mode
from .errors import UblkError
from .queue import Queue

log = logging.getLogger("vdisk.ublk")

#: below 4 GiB so that a whole request still fits the kernel's 32-bit byte counts
MAX_DISCARD_BYTES = (1 << 32) - (1 << 20)
DEVICE_APPEAR_TIMEOUT = 10.0
QUEUE_READY_TIMEOUT = 30.0
QUEUE_EXIT_TIMEOUT = 30.0


def run_dir() -> str:
    """Where servers leave a note per device (backing file, pid) for list and recover."""
    return os.environ.get("VDISK_UBLK_RUN_DIR", "/run/vdisk-ublk")


#: the fields a note may carry and their types (a field of another type is dropped)
_NOTE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str, "file": str, "backend_size": int, "size": int, "pid": int, "dev_id": int,
}
_NOTE_MAX_BYTES = 64 << 10


def read_note(dev_id: int) -> dict[str, Any] | None:
    """The note of device ``dev_id`` (see ``decode_note``), or None when there is none."""
    try:
        with open(os.path.join(run_dir(), f"{dev_id}.json"), "rb") as f:
            return decode_note(f.read(_NOTE_MAX_BYTES + 1))
    except OSError:
        return None


def decode_note(text: bytes) -> dict[str, Any] | None:
    """A note's fields, or None unless it is a JSON object of at most 64 KiB. A note is anyone's
    file in run_dir(): a known field of the wrong type is dropped."""
    if len(text) > _NOTE_MAX_BYTES:
        return None
    try:
        note = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(note, dict):
        return None
    return {
        key: value for key, value in note.items()
        if key not in _NOTE_FIELDS or (
            isinstance(value, _NOTE_FIELDS[key]) and not isinstance(value, bool)
        )
    }


_CHAR_CLASS = "/sys/class/ublk-char"


def device_registered(dev_id: int) -> bool:
    """Is ublkcN still registered with the driver, i.e. has no DEL_DEV begun? DEL_DEV removes
    the char device from sysfs first, then waits for the device's last reference. Without
    sysfs we cannot tell and say yes."""
    if not os.path.isdir(_CHAR_CLASS):
        return True
    return os.path.exists(f"{_CHAR_CLASS}/ublkc{dev_id}")


def process_alive(pid: int) -> bool:
    """Does process ``pid`` exist and still run (a zombie or a dying task does not count)?"""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may itself contain parentheses).
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def fds_open_on(*paths: str) -> list[tuple[int, str]]:
    """This process's descriptors open on any of ``paths`` (also after the node was deleted)."""
    found = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for name in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        path = target.removesuffix(" (deleted)")
        if path in paths:
            found.append((int(name), path))
    return found


class DeviceState(enum.Enum):
    CREATED = "created"  # added and parameterised, not serving
    LIVE = "live"  # serving I/O
    STOPPED = "stopped"  # stopped, queues gone, still registered with the driver
    CLOSED = "closed"  # deleted from the driver
    FAILED = "failed"  # a queue died; close() cleans up


@dataclass
class UblkParams:
    """What the device looks like to the kernel. Sizes in bytes."""

    queues: int = 1
    depth: int = 128
    max_io_buf_bytes: int = 512 << 10
    logical_block_size: int = 512
    physical_block_size: int = 4096
    io_min: int | None = None  # defaults to the logical block size
    io_opt: int | None = None  # defaults to the physical block size
    max_sectors: int | None = None  # defaults to max_io_buf_bytes / 512
    discard: bool = True
    discard_granularity: int = 4096
    max_discard_bytes: int = MAX_DISCARD_BYTES
    max_write_zeroes_bytes: int = MAX_DISCARD_BYTES
    volatile_cache: bool = True
    fua: bool = True
    readonly: bool | None = None  # None: as the backend
    rotational: bool = False
    dev_id: int = -1  # -1: the kernel picks
    user_recovery: bool = False
    need_get_data: bool = False
    size: int | None = None  # None: the backend's size

    def validate(self, size: int) -> None:
        """Refuse nonsense with a one-line error before the kernel sees it."""

        def bad(detail: str) -> UblkError:
            return UblkError(errno.EINVAL, "invalid parameters", detail)

        if not 1 <= self.queues <= uapi.UBLK_MAX_NR_QUEUES:
            raise bad(f"queues must be 1..{uapi.UBLK_MAX_NR_QUEUES}, not {self.queues}")
        if not 1 <= self.depth <= uapi.UBLK_MAX_QUEUE_DEPTH:
            raise bad(f"depth must be 1..{uapi.UBLK_MAX_QUEUE_DEPTH}, not {self.depth}")
        for name in ("logical_block_size", "physical_block_size"):
            value = getattr(self, name)
            if value < 512 or value & (value - 1) or value > 65536:
                raise bad(f"{name} must be a power of two from 512 to 64k, not {value}")
        if self.logical_block_size > 4096:
            raise bad("logical_block_size above the page size (4096) is not supported")
        if self.physical_block_size < self.logical_block_size:
            raise bad("physical_block_size is smaller than logical_block_size")
        buf = self.max_io_buf_bytes
        if buf < 4096 or buf % 4096 or buf > (32 << 20):
            raise bad(f"max_io_buf_bytes must be a multiple of 4096 up to 32M, not {buf}")
        if self.max_sectors is not None and not 1 <= self.max_sectors <= buf >> 9:
            raise bad(f"max_sectors must be 1..{buf >> 9} (max_io_buf_bytes/512)")
        if size <= 0:
            raise bad(f"device size must be positive, not {size}")
        if size % self.logical_block_size:
            raise bad(f"size {size} is not a multiple of the {self.logical_block_size}-byte block")
        if self.dev_id < -1 or self.dev_id >= 1 << 20:
            raise bad(f"device id must be 0..{(1 << 20) - 1} or -1, not {self.dev_id}")
        if self.discard and (
            self.discard_granularity < self.logical_block_size
            or self.discard_granularity & (self.discard_granularity - 1)
        ):
            raise bad("discard_granularity must be a power of two >= the logical block size")

    def to_uapi(self, size: int, readonly: bool) -> uapi.Params:
        attrs = 0
        if readonly:
            attrs |= uapi.UBLK_ATTR_READ_ONLY
        if self.rotational:
            attrs |= uapi.UBLK_ATTR_ROTATIONAL
        if self.volatile_cache:
            attrs |= uapi.UBLK_ATTR_VOLATILE_CACHE
            if self.fua:
                attrs |= uapi.UBLK_ATTR_FUA
        basic = uapi.ParamBasic(
            attrs=attrs,
            logical_bs_shift=self.logical_block_size.bit_length() - 1,
            physical_bs_shift=self.physical_block_size.bit_length() - 1,
            io_opt_shift=(self.io_opt or self.physical_block_size).bit_length() - 1,
            io_min_shift=(self.io_min or self.logical_block_size).bit_length() - 1,
            max_sectors=self.max_sectors or self.max_io_buf_bytes >> 9,
            dev_sectors=size >> 9,
        )
        params = uapi.Params(types=uapi.UBLK_PARAM_TYPE_BASIC, basic=basic)
        if self.discard and not readonly:
            params.types |= uapi.UBLK_PARAM_TYPE_DISCARD
            params.discard = uapi.ParamDiscard(
                discard_alignment=0,
                discard_granularity=self.discard_granularity,
                max_discard_sectors=min(self.max_discard_bytes, MAX_DISCARD_BYTES) >> 9,
                max_write_zeroes_sectors=min(self.max_write_zeroes_bytes, MAX_DISCARD_BYTES) >> 9,
                max_discard_segments=1,
            )
        return params


class _IoLogging:
    """Route vdisk.ublk.io records through a QueueHandler so queue threads never block on a
    slow log sink; a QueueListener thread does the writing."""

    _lock = threading.Lock()
    _users = 0
    _listener: logging.handlers.QueueListener | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            cls._users += 1
            if cls._listener is not None:
                return
            logger = logging.getLogger("vdisk.ublk.io")
            handlers = logging.getLogger().handlers
            if not handlers:
                return  # nothing to write to: records go to the last-resort handler
            q: queue_mod.SimpleQueue[logging.LogRecord] = queue_mod.SimpleQueue()
            logger.addHandler(logging.handlers.QueueHandler(q))
            logger.propagate = False
            cls._listener = logging.handlers.QueueListener(
                q, *handlers, respect_handler_level=True
            )
            cls._listener.start()

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._listener is not None:
                cls._listener.stop()
                cls._listener = None
                logger = logging.getLogger("vdisk.ublk.io")
                for h in list(logger.handlers):
                    logger.removeHandler(h)
                logger.propagate = True


class Device:
    """One ublk device serving a BlockDevice."""

    def __init__(
        self,
        control: Control,
        info: uapi.DevInfo,
        backend: BlockDevice,
        params: UblkParams,
        size: int,
        metrics: IoMetrics | None,
        owns_control: bool,
        note: dict[str, Any] | None,
    ) -> None:
        self.control = control
        self.info = info
        self.backend = backend
        self.params = params
        self.size = size
        self.metrics = metrics
        self.state = DeviceState.CREATED
        self.queues: list[Queue] = []
        self._owns_control = owns_control
        self._note = note
        self._cdev_fd: int | None = None
        self._lock = threading.RLock()
        self._exited = threading.Event()
        self._exit_lock = threading.Lock()
        self._queues_serving = 0
        self._stop_requested = threading.Event()
        self._logging = False
        #: close the backend too when the device closes (the CLI's devices own theirs)
        self.close_backend = False

    # -- identity -----------------------------------------------------------------------

    @property
    def dev_id(self) -> int:
        return self.info.dev_id

    @property
    def char_path(self) -> str:
        return f"/dev/ublkc{self.dev_id}"

    @property
    def block_path(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    def __repr__(self) -> str:
        return f"<Device {self.block_path} {self.state.value} size={self.size}>"

    # -- creation -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        backend: BlockDevice,
        params: UblkParams | None = None,
        *,
        control: Control | None = None,
        metrics: bool | IoMetrics = True,
        note: dict[str, Any] | None = None,
    ) -> Device:
        """ADD_DEV and SET_PARAMS: the device exists (as /dev/ublkcN) but does not serve yet.

        ``note`` (e.g. the backing file and type) is saved under run_dir() for ``list`` and
        ``recover``.
        """
        params = params or UblkParams()
        size = params.size if params.size is not None else backend.size
        params.validate(size)
        if size > backend.size:
            raise UblkError(errno.EINVAL, "invalid parameters",
                            f"size {size} exceeds the backend's {backend.size} bytes")
        readonly = backend.readonly if params.readonly is None else params.readonly
        if backend.readonly and not readonly:
            raise UblkError(errno.EROFS, "invalid parameters",
                            "the backend is read-only; the device must be too")
        owns = control is None
        ctl = control or Control()
        flags = 0
        if params.user_recovery:
            flags |= uapi.UBLK_F_USER_RECOVERY
        if params.need_get_data:
            flags |= uapi.UBLK_F_NEED_GET_DATA
        want = uapi.DevInfo(
            nr_hw_queues=params.queues,
            queue_depth=params.depth,
            max_io_buf_bytes=params.max_io_buf_bytes,
            dev_id=params.dev_id,
            flags=flags,
        )
        try:
            info = ctl.add_dev(want)
        except UblkError as exc:
            if owns:
                ctl.close()
            if exc.errno == errno.EEXIST:
                raise UblkError(errno.EEXIST, "ADD_DEV", f"device {params.dev_id} already exists") from None
            if exc.errno == errno.EINVAL:
                raise UblkError(
                    errno.EINVAL, "ADD_DEV",
                    f"the kernel refused {params.queues} queue(s) of depth {params.depth} "
                    f"(at most {os.cpu_count()} queues here)",
                ) from None
            raise
        info.dev_id = info.dev_id & 0xFFFFFFFF
        if metrics is True:
            metrics_obj: IoMetrics | None = IoMetrics(f"ublkb{info.dev_id}")
        elif metrics is False:
            metrics_obj = None
        else:
            metrics_obj = metrics
        dev = cls(ctl, info, backend, params, size, metrics_obj, owns, note)
        try:
            ctl.set_params(info.dev_id, params.to_uapi(size, readonly))
        except BaseException:
            dev.close()
            raise
        if metrics_obj is not None:
            register(metrics_obj)
        return dev

    @classmethod
    def recover(
        cls,
        dev_id: int,
        backend: BlockDevice,
        *,
        control: Control | None = None,
        metrics: bool | IoMetrics = True,
        note: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> Device:
        """Reattach a device whose server died (it needs UBLK_F_USER_RECOVERY); returns it live."""
        owns = control is None
        ctl = control or Control()
        op = f"recover ublk{dev_id}"
        try:
            check_recoverable(dev_id, ctl)
            params = ctl.get_params(dev_id)
            size = params.basic.dev_sectors << 9
            if size > backend.size:
                raise UblkError(errno.EINVAL, op,
                                f"backend has {backend.size} bytes, the device {size}")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    ctl.start_user_recovery(dev_id)
                    break
                except UblkError as exc:
                    # The old server's files are still being released, or the driver has not
                    # noticed its death yet (it looks every 5 s).
                    if exc.errno not in (errno.EBUSY, errno.EINVAL):
                        raise
                    if time.monotonic() > deadline:
                        raise UblkError(exc.errno, op, f"START_USER_RECOVERY still refused "
                                        f"after {timeout:g} s ({os.strerror(exc.errno)}): is the old "
                                        "server still holding /dev/ublkc"
                                        f"{dev_id} open?") from None
                    time.sleep(0.2)
            info = ctl.get_dev_info(dev_id)
        except BaseException:
            if owns:
                ctl.close()
            raise
        up = UblkParams(
            queues=info.nr_hw_queues,
            depth=info.queue_depth,
            max_io_buf_bytes=info.max_io_buf_bytes,
            dev_id=dev_id,
            user_recovery=True,
            need_get_data=bool(info.flags & uapi.UBLK_F_NEED_GET_DATA),
            size=size,
        )
        if metrics is True:
            metrics_obj: IoMetrics | None = IoMetrics(f"ublkb{dev_id}")
        else:
            metrics_obj = metrics or None
        dev = cls(ctl, info, backend, up, size, metrics_obj, owns, note)
        if metrics_obj is not None:
            register(metrics_obj)
        try:
            dev._start_queues()
            ctl.end_user_recovery(dev_id, os.getpid())
        except BaseException:
            dev.state = DeviceState.FAILED
            dev.close()
            raise
        dev.state = DeviceState.LIVE
        dev._write_note()
        return dev

    # -- serving ------------------------------------------------------------------------

    def start(self) -> str:
        """Serve: queues fetch every tag, then START_DEV. Returns the block device path."""
        with self._lock:
            if self.state is not DeviceState.CREATED:
                raise UblkError(errno.EINVAL, "start", f"device is {self.state.value}")
            try:
                self._start_queues()
                self.control.start_dev(self.dev_id, os.getpid())
                self.state = DeviceState.LIVE
                _wait_for_path(self.block_path, DEVICE_APPEAR_TIMEOUT)
            except BaseException:
                self.state = DeviceState.FAILED
                self.close()
                raise
            self._write_note()
        return self.block_path

    def _start_queues(self) -> None:
        _wait_for_path(self.char_path, DEVICE_APPEAR_TIMEOUT)
        try:
            self._cdev_fd = os.open(self.char_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise UblkError(exc.errno or errno.EIO, f"open {self.char_path}") from None
        if not self._logging:
            _IoLogging.acquire()
            self._logging = True
        backing_fd = _async_fd(self.backend)
        self._queues_serving = self.info.nr_hw_queues
        for q_id in range(self.info.nr_hw_queues):
            q = Queue(q_id, self._cdev_fd, self.info, self.backend, self.metrics,
                      bool(encoded_mode()), backing_fd, self._queue_exited,
                      self._queue_cpus(q_id))
            self.queues.append(q)
            q.start()
        deadline = time.monotonic() + QUEUE_READY_TIMEOUT
        for q in self.queues:
            q.ready.wait(max(deadline - time.monotonic(), 0))
            if q.error is not None:
                raise _as_ublk_error(q.error, f"queue {q.q_id} setup")
            if not q.ready.is_set():
                raise UblkError(errno.ETIMEDOUT, f"queue {q.q_id} setup")

    def _queue_cpus(self, q_id: int) -> set[int] | None:
        """The CPUs queue ``q_id`` serves (None: all of them, or unknown)."""
        try:
            cpus = self.control.get_queue_affinity(self.dev_id, q_id)
        except UblkError as exc:
            log.info("GET_QUEUE_AFFINITY of queue %d: %s", q_id, exc)
            return None
        return cpus if cpus and cpus != os.sched_getaffinity(0) else None

    def _queue_exited(self, q: Queue) -> None:
        """Called by each queue thread as it ends. Counted, not told by is_alive(): queues that
        end together are all still alive here, and each would wait for the others."""
        if q.error is not None and self.state is DeviceState.LIVE:
            self.state = DeviceState.FAILED
        with self._exit_lock:
            self._queues_serving -= 1
            if self._queues_serving <= 0:
                self._exited.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the device stops serving (stopped here, deleted from outside, or a queue
        failed). Returns False on timeout."""
        if not self.queues:
            return True
        return self._exited.wait(timeout)

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until SIGINT/SIGTERM (or ``stop`` is set, when given: then the caller handles
        the signals) or until the device is stopped from outside; then close."""
        if stop is None:
            self.install_signal_handlers()
            stop = self._stop_requested
        try:
            while not stop.is_set() and not self._stop_requested.is_set() and not self.wait(0.5):
                pass
        finally:
            self.close()

    def request_stop(self) -> None:
        """Ask serve_forever() to stop, drain and close (safe from a signal handler)."""
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM request an orderly close (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self._stop_requested.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    # -- shutdown -----------------------------------------------------------------------

    def stop(self) -> None:
        """STOP_DEV while the queues still serve (so the kernel can drain), then wait for them
        to see every tag aborted."""
        with self._lock:
            if self.state in (DeviceState.LIVE, DeviceState.FAILED):
                log.info("%s: STOP_DEV", self.block_path)
                try:
                    self.control.stop_dev(self.dev_id)
                except UblkError as exc:
                    if exc.errno != errno.ENODEV:
                        log.warning("%s", exc)
            self._join_queues()
            if self.state in (DeviceState.LIVE, DeviceState.FAILED):
                self.state = DeviceState.STOPPED

    def _join_queues(self) -> None:
        deadline = time.monotonic() + QUEUE_EXIT_TIMEOUT
        for q in self.queues:
            q.join(max(deadline - time.monotonic(), 0))
            if q.is_alive():
                log.warning("queue %d of %s did not exit", q.q_id, self.block_path)

    def close(self) -> None:
        """Stop if serving, close /dev/ublkcN, DEL_DEV. Idempotent."""
        with self._lock:
            if self.state is DeviceState.CLOSED:
                return
            self.stop()
            if self._cdev_fd is not None and not any(q.is_alive() for q in self.queues):
                os.close(self._cdev_fd)
                self._cdev_fd = None
            error: UblkError | None = None
            if self._cdev_fd is None:
                try:
                    self._del_dev()
                except UblkError as exc:
                    error = exc
            else:
                # A queue thread is stuck with the char device open: DEL_DEV would wait for it
                # for ever. Leave the device; `vdisk ublk del` can remove it once we are gone.
                error = UblkError(errno.EBUSY, f"DEL_DEV (device {self.dev_id})",
                                  "a queue did not exit; the device is left stopped")
            self.state = DeviceState.CLOSED
            self._remove_note()
            if self.metrics is not None:
                unregister(self.metrics)
            if self._logging:
                _IoLogging.release()
                self._logging = False
            if self._owns_control:
                self.control.close()
            if self.close_backend:
                self.backend.close()
            if error is not None:
                raise error

    def _del_dev(self) -> None:
        """DEL_DEV, unless someone else's DEL_DEV of this device has already begun.

        Linux 6.1 deadlocks on two DEL_DEVs of one device: ublk_ctrl_del_dev() holds the global
        ublk_ctl_mutex while it waits (uninterruptibly) for the device's last reference, and the
        second command holds a reference (taken when it looks the device up, before it asks for
        the mutex) while it waits for that mutex. Later kernels drop the mutex before waiting.
        So exactly one party deletes a device: its server when it has one (``delete()`` below
        only stops a served device and lets the server finish), else ``delete()`` itself.
        """
        if not device_registered(self.dev_id):
            log.info("%s: already being deleted", self.block_path)
            return
        # DEL_DEV waits for every opener, and a process cannot finish exiting while its own
        # DEL_DEV waits (io_uring cancels it first, the wait is uninterruptible): refuse instead
        # of hanging for ever on our own descriptor.
        for fd, path in fds_open_on(self.block_path, self.char_path):
            raise UblkError(errno.EBUSY, f"DEL_DEV (device {self.dev_id})",
                            f"this process still has {path} open (fd {fd}); close it, then "
                            f"vdisk ublk del -n {self.dev_id}")
        log.info("%s: DEL_DEV", self.block_path)
        try:
            self.control.del_dev(self.dev_id)
        except UblkError as exc:
            if exc.errno != errno.ENODEV:
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- notes for list/recover ---------------------------------------------------------

    def _write_note(self) -> None:
        note = dict(self._note or {})
        note.update(dev_id=self.dev_id, pid=os.getpid(), size=self.size)
        try:
            os.makedirs(run_dir(), exist_ok=True)
            path = os.path.join(run_dir(), f"{self.dev_id}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(note, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.debug("cannot write the device note: %s", exc)

    def _remove_note(self) -> None:
        try:
            os.unlink(os.path.join(run_dir(), f"{self.dev_id}.json"))
        except OSError:
            pass


def _dev_info(control: Control, dev_id: int, op: str) -> uapi.DevInfo:
    """GET_DEV_INFO, with a missing device as one line naming ``op``."""
    try:
        return control.get_dev_info(dev_id)
    except UblkError as exc:
        if exc.errno == errno.ENODEV:
            raise UblkError(errno.ENODEV, op, "no such device") from None
        raise


def check_recoverable(dev_id: int, control: Control) -> uapi.DevInfo:
    """The device's info if USER_RECOVERY can reattach it, else a one-line UblkError saying why
    not (missing, created without recovery, stopped, or still served)."""
    op = f"recover ublk{dev_id}"
    info = _dev_info(control, dev_id, op)
    if not info.flags & uapi.UBLK_F_USER_RECOVERY:
        raise UblkError(errno.EINVAL, op, "the device was not created with user recovery (add -r)")
    if info.state == uapi.UBLK_S_DEV_DEAD:
        raise UblkError(errno.EINVAL, op, "the device is stopped, not quiesced: nothing to "
                        f"reattach (delete it: vdisk ublk del -n {dev_id})")
    if info.state == uapi.UBLK_S_DEV_LIVE and process_alive(info.ublksrv_pid):
        raise UblkError(errno.EBUSY, op, f"the device is live, served by pid {info.ublksrv_pid}")
    return info


def delete(dev_id: int, control: Control, timeout: float = 30.0) -> None:
    """Stop and delete device ``dev_id`` from outside its server (``vdisk ublk del``).

    A device whose server still runs is only stopped here (STOP_DEV): its queues see every tag
    aborted, the server closes /dev/ublkcN and sends the one DEL_DEV itself (see
    Device._del_dev for why there must be only one); we wait until the device is gone. A device
    without a running server (it died, or the device was never started) is deleted here. On
    success /dev/ublkbN and /dev/ublkcN no longer exist.
    """
    op = f"del ublk{dev_id}"
    info = _dev_info(control, dev_id, op)
    # Read before STOP_DEV, which forgets the pid.
    pid = info.ublksrv_pid
    char_path = f"/dev/ublkc{dev_id}"
    if pid == os.getpid() or fds_open_on(f"/dev/ublkb{dev_id}", char_path):
        # Our own DEL_DEV would wait for our own descriptors, unkillably.
        raise UblkError(errno.EBUSY, op, "this process serves or holds the device: close it "
                        "(Device.close()) instead")
    # A live server holds the char device; a recycled pid of a dead one does not.
    server = pid if process_alive(pid) and _holds(pid, char_path) else 0
    try:
        control.stop_dev(dev_id)
    except UblkError as exc:
        if exc.errno == errno.ENODEV:
            return
        raise
    deadline = time.monotonic() + timeout
    while (server and process_alive(server)) or not device_registered(dev_id):
        # Its server (or whoever began a DEL_DEV) is finishing: wait, do not send a second one.
        if not _device_exists(control, dev_id):
            return
        if time.monotonic() > deadline:
            who = f"its server (pid {server})" if server else "a DEL_DEV already under way"
            raise UblkError(errno.ETIMEDOUT, op, f"{who} did not delete it within {timeout:g} s")
        time.sleep(0.05)
    # No server (any more): ours to delete.
    log.info("ublk%d: DEL_DEV", dev_id)
    try:
        control.del_dev(dev_id, timeout=max(deadline - time.monotonic(), 1.0))
    except UblkError as exc:
        if exc.errno != errno.ENODEV:
            raise


def _holds(pid: int, path: str) -> bool:
    """Has process ``pid`` a descriptor open on ``path``? (Yes when we may not look.)"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return True
    except OSError:
        return False
    for name in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").removesuffix(" (deleted)") == path:
                return True
        except OSError:
            continue
    return False


def _device_exists(control: Control, dev_id: int) -> bool:
    try:
        control.get_dev_info(dev_id)
    except UblkError as exc:
        if exc.errno == errno.ENODEV:
            return False
        raise
    return True


def _as_ublk_error(exc: BaseException, operation: str) -> BaseException:
    """A queue's failure as a one-line UblkError (interrupts pass through unchanged)."""
    if isinstance(exc, UblkError) or not isinstance(exc, Exception):
        return exc
    code = getattr(exc, "errno", None) or errno.EIO
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return UblkError(code, operation, detail)


def _async_fd(backend: BlockDevice) -> int | None:
    """The file a backend offers (``FileBacked``), whose I/O the queues then run through
    io_uring (``file_target``)."""
    return backend.file_descriptor() if isinstance(backend, FileBacked) else None


def _wait_for_path(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise UblkError(errno.ENOENT, f"wait for {path}", "the device node did not appear")
        time.sleep(0.01)
