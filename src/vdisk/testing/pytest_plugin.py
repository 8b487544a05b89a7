"""pytest plugin: ``@pytest.mark.vm`` tests run inside the test VM.

On the host, each vm-marked test is swapped (after selection) for a proxy item. The first proxy
of a test module boots ONE VM that runs all the selected vm tests of that module with pytest
(``VDISK_IN_VM=1``), each test bounded by pytest-timeout, and writes one JSON line per test phase
into the results share; each proxy then reports its guest outcome (pass, fail with the guest's
traceback and captured output, skip, xfail). A test the guest never reported (boot failure, VM
timeout, crash) fails with the VM's account and console tail. Without a kernel or
qemu-system-x86_64 the vm tests skip, naming what is missing.

Inside the VM the plugin only records outcomes; the tests run as ordinary tests.

Further kernels: each ``LABEL=KERNEL[,INITRD]`` entry of ``VDISK_TEST_KERNELS`` (``;``-separated,
see `vm.extra_kernels`) runs every vm test once more on that kernel, as ``test_x[LABEL]`` (or
``test_x[param-LABEL]``), one VM per module and kernel; these items exist before ``-k``/``-m``
selection, so ``-k LABEL`` picks them. A ``LABEL=!REASON`` entry makes them skip with REASON.

Knobs: ``@pytest.mark.vm(timeout=SECS)`` or ``@pytest.mark.timeout(SECS)`` bound one test in the
guest (default ``VDISK_VM_TEST_TIMEOUT``, 300 s); the whole VM run is bounded by a boot allowance
plus the sum of its tests' timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from vdisk.testing import vm

_REPORT_ENV = "VDISK_VM_REPORT"
_REPORT_NAME = "pytest-report.jsonl"
_BOOT_ALLOWANCE = 120.0


def _default_test_timeout() -> float:
    return float(os.environ.get("VDISK_VM_TEST_TIMEOUT", "300"))


def _in_vm() -> bool:
    return os.environ.get(vm.IN_VM_ENV) == "1"


def _test_timeout(item: pytest.Item) -> float:
    mark = item.get_closest_marker("vm")
    if mark is not None and "timeout" in mark.kwargs:
        return float(mark.kwargs["timeout"])
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        return float(mark.args[0])
    if mark is not None and "timeout" in mark.kwargs:
        return float(mark.kwargs["timeout"])
    return _default_test_timeout()


# --------------------------------------------------------------------------------------------
# Guest side: record each phase's outcome as a JSON line, fsynced (partial results survive a
# VM that is killed mid-run).


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    name = os.environ.get(_REPORT_ENV)
    results = os.environ.get(vm.RESULTS_ENV)
    if not name or not results or not _in_vm():
        return
    path = os.path.join(results, name)
    line: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": report.duration,
        "longrepr": report.longreprtext if report.longrepr is not None else "",
        "sections": [[k, v] for k, v in report.sections],
    }
    if report.failed:
        line["sections"].append([f"Captured kernel log {report.when}", _dmesg_tail()])
    if report.skipped and isinstance(report.longrepr, tuple):
        line["skip_reason"] = str(report.longrepr[2])
    if hasattr(report, "wasxfail"):
        line["wasxfail"] = str(report.wasxfail)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _dmesg_tail(lines: int = 30) -> str:
    """The guest kernel's last messages: a failed ublk/io_uring test often explains itself there."""
    try:
        out = subprocess.run(
            ["dmesg"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(dmesg failed: {e})"
    return "\n".join(out.splitlines()[-lines:]) + "\n"


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """In the VM batch, exit hard once the report is written: a thread or child a test left
    behind (say, a ublk queue thread stuck in io_uring_enter) must not keep the VM up until its
    hard timeout. The guest is thrown away anyway."""
    if _in_vm() and os.environ.get(_REPORT_ENV) and _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        # Even os._exit can hang (Linux 6.12: a task whose io_uring still holds ublk commands
        # waits in the kernel for ever); this file lets the host end the VM soon anyway.
        results = os.environ.get(vm.RESULTS_ENV)
        if results:
            with open(os.path.join(results, vm.DONE_NAME), "w") as f:
                f.write(f"{_exit_status[-1]}\n")
                f.flush()
                os.fsync(f.fileno())
        os._exit(_exit_status[-1])


# --------------------------------------------------------------------------------------------
# Host side.


@dataclass
class _Batch:
    """All selected vm tests of one module, run in one VM."""

    items: list[VMItem] = field(default_factory=list)
    #: None: the default kernel (``VDISK_TEST_KERNEL``/``VDISK_TEST_INITRD``).
    kernel: vm.KernelSpec | None = None
    result: vm.VMResult | None = None
    error: str | None = None
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        return _BOOT_ALLOWANCE + sum(i.test_timeout for i in self.items)

    def run(self, config: pytest.Config) -> None:
        rootdir = str(config.rootpath)
        args = [
            sys.executable, "-m", "pytest",
            "-p", "no:cacheprovider",
            "-p", "vdisk.testing.pytest_plugin",
            "--rootdir", rootdir,
            "-q", "-rN",
            "-o", f"timeout={_default_test_timeout():g}",
        ]  # fmt: skip
        if config.inipath is not None:
            args += ["-c", str(config.inipath)]
        args += [i.guest_nodeid for i in self.items]
        spec = self.kernel
        try:
            self.result = vm.run(
                args,
                kernel=spec.kernel if spec is not None else None,
                initrd=spec.initrd if spec is not None else None,
                timeout=self.budget,
                cwd=rootdir,
                env={_REPORT_ENV: _REPORT_NAME},
                collect=[_REPORT_NAME],
            )
        except vm.VMError as e:
            self.error = str(e)
            return
        raw = self.result.files.get(_REPORT_NAME, b"").decode("utf-8", "replace")
        for text in raw.splitlines():
            try:
                line = json.loads(text)
            except ValueError:
                continue  # a line cut short by a VM killed mid-write
            self.reports.setdefault(line["nodeid"], []).append(line)


class VMTestFailure(Exception):
    """A vm test failed in the guest, or never reported; the message is the guest's account."""


class VMItem(pytest.Item):
    """Host-side stand-in for a vm test: reports the outcome the guest recorded."""

    batch: _Batch
    test_timeout: float
    #: The test's node id in the guest (differs from ours for a further kernel's copy).
    guest_nodeid: str
    #: None: the default kernel; else the further kernel this copy runs on.
    kernel: vm.KernelSpec | None = None
    _location_info: tuple[Any, int | None, str]

    def runtest(self) -> None:
        batch = self.batch
        if batch.result is None and batch.error is None:
            batch.run(self.config)
        if batch.error is not None:
            raise VMTestFailure(f"could not run the VM: {batch.error}")
        assert batch.result is not None
        lines = batch.reports.get(self.guest_nodeid, [])
        # Each guest phase's report carries the captures of the phases before it: keep the last
        # content under each name.
        sections: dict[str, str] = {}
        for rec in lines:
            sections.update((name, content) for name, content in rec["sections"])
        for name, content in sections.items():
            words = name.split()
            if len(words) >= 3 and words[0] == "Captured":
                what = " ".join(words[1:-1])
                self.add_report_section(words[-1], f"{what} (in the VM)", content)
        phases = {rec["when"]: rec for rec in lines}
        for when in ("setup", "call", "teardown"):
            line = phases.get(when)
            if line is None:
                continue
            if line["outcome"] == "failed":
                what = "" if when == "call" else f" (error in {when})"
                raise VMTestFailure(f"failed in the VM{what}:\n{line['longrepr']}")
            if line["outcome"] == "skipped":
                if "wasxfail" in line:
                    pytest.xfail(f"in the VM: {line['wasxfail']}")
                reason = line.get("skip_reason") or line["longrepr"]
                reason = reason.removeprefix("Skipped: ")
                raise pytest.skip.Exception(f"in the VM: {reason}", _use_item_location=True)
        if "call" not in phases:
            raise VMTestFailure("the test did not report from the VM.\n" + batch.result.describe())

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        if isinstance(excinfo.value, VMTestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self._location_info


def _proxy(item: pytest.Item, name: str) -> VMItem:
    """A stand-in for ``item`` named ``name``, with its markers and location."""
    assert item.parent is not None
    proxy = VMItem.from_parent(item.parent, name=name)
    fspath, lineno, domain = item.reportinfo()
    if domain.endswith(item.name):  # the report headline shows the copy's own name
        domain = domain[: len(domain) - len(item.name)] + name
    proxy._location_info = (fspath, lineno, domain)
    proxy.test_timeout = _test_timeout(item)
    proxy.guest_nodeid = item.nodeid
    for mark in item.own_markers:
        proxy.own_markers.append(mark)
        proxy.keywords[mark.name] = mark
    return proxy


def _labelled(name: str, label: str) -> str:
    """``test_x`` -> ``test_x[LABEL]``, ``test_x[p]`` -> ``test_x[p-LABEL]``."""
    if name.endswith("]") and "[" in name:
        return f"{name[:-1]}-{label}]"
    return f"{name}[{label}]"


def _batches(items: list[pytest.Item]) -> Iterator[tuple[pytest.Item, int]]:
    for index, item in enumerate(items):
        if item.get_closest_marker("vm") is not None:
            yield item, index


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Host side: a copy of each collected vm test per further kernel, right after it (so that
    pytest counts and selects the copies like any test)."""
    report: pytest.CollectReport = yield
    kernels = vm.extra_kernels()
    if _in_vm() or not kernels or not report.passed:
        return report
    out: list[pytest.Item | pytest.Collector] = []
    for node in report.result:
        out.append(node)
        if not isinstance(node, pytest.Item) or isinstance(node, VMItem):
            continue
        if node.get_closest_marker("vm") is None:
            continue
        for spec in kernels:
            proxy = _proxy(node, _labelled(node.name, spec.label))
            proxy.kernel = spec
            out.append(proxy)
    report.result = out
    return report


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """After selection (-k, -m): vm tests become proxies, batched per module and kernel."""
    _swap_in_proxies(items)


def _swap_in_proxies(items: list[pytest.Item]) -> None:
    if _in_vm():
        # pytest-timeout bounds each test in the guest; vm(timeout=...) feeds it.
        for item, _ in _batches(items):
            mark = item.get_closest_marker("vm")
            if mark is not None and "timeout" in mark.kwargs:
                item.add_marker(pytest.mark.timeout(mark.kwargs["timeout"]), append=False)
        return
    marked = list(_batches(items))
    if not marked:
        return
    qemu_missing = "qemu-system-x86_64 not found" if vm.find_qemu() is None else None
    default_reason = vm.unavailable_reason()
    batches: dict[tuple[str, str], _Batch] = {}
    for item, index in marked:
        spec = item.kernel if isinstance(item, VMItem) else None
        if spec is None:
            reason = default_reason
        else:
            reason = qemu_missing or spec.unavailable
            if reason is not None:
                reason = f"kernel {spec.label}: {reason}"
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"VM test: {reason}"))
            continue
        proxy = item if isinstance(item, VMItem) else _proxy(item, item.name)
        key = (proxy.guest_nodeid.split("::")[0], spec.label if spec is not None else "")
        batch = batches.setdefault(key, _Batch(kernel=spec))
        batch.items.append(proxy)
        proxy.batch = batch
        items[index] = proxy
    # The host-side timeout of a proxy must cover its whole module's VM run.
    for batch in batches.values():
        for proxy in batch.items:
            proxy.add_marker(pytest.mark.timeout(batch.budget + 60), append=False)
