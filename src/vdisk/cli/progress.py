"""``-p`` progress for convert and compare.

In a pipe (or any non-terminal) the lines are qemu-img's own, byte for byte: ``    (P.PP/100%)\\r``
each time the copy has moved on by at least 1%, as qemu-img 7.2 prints them whether or not
stdout is a terminal. On a terminal a real bar (percent, rate, ETA) from tqdm, imported only then.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

import click


class Progress:
    """Called with (done, total) bytes; ``close()`` ends the line."""

    def __init__(self) -> None:
        self._shown = -1.0
        self._bar: Any = None
        self._done = 0
        self._tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            self._update_bar(done, total)
            return
        pct = 100.0 if total == 0 else done * 100.0 / total
        if pct - self._shown >= 1.0 or (pct == 100.0 and self._shown != 100.0):
            self._shown = pct
            click.echo(f"    ({pct:.2f}/100%)\r", nl=False)

    def _update_bar(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # A terminal that reports 0 columns would get an empty bar: fall back to 80.
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stdout,
                ncols=shutil.get_terminal_size().columns,
            )
        self._bar.update(done - self._done)
        self._done = done

    def close_bar(self) -> None:
        """End the terminal bar, if any, so that other lines can follow it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._done = 0

    def close(self) -> None:
        """End the progress output (qemu-img's final newline in a pipe)."""
        if self._tty:
            self.close_bar()
        else:
            click.echo("")
