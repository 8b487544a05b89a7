"""qemu-img-compatible image commands: create, info, ..."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
