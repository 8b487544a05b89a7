"""`vdisk ublk` commands (to be built)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
