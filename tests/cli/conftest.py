"""Fixtures for the CLI tests: vdisk in-process next to qemu-img, the oracle."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import VdiskRunner, make_vdisk_runner


@pytest.fixture
def vdisk_cli(capsys: pytest.CaptureFixture[str]) -> VdiskRunner:
    return make_vdisk_runner(capsys)


@pytest.fixture(autouse=True)
def _need_qemu_img() -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io are not installed (they are the oracle here)")
