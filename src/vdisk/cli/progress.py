"""``-p`` progress for convert, compare, commit, rebase and amend.

In a pipe (or any non-terminal) the lines are qemu-img's own, byte for byte: ``    (P.PP/100%)\r``
whenever the work has moved on by more than ``min_step`` percent (2 for compare, 1 elsewhere), and at 0 and 100, as qemu-img 7.2 prints them whether or not
stdout is a terminal. qemu-img keeps the percentage in a C float, and compare and rebase add
up per-step increments: both are followed here, so that the same steps print the same lines.
On a terminal a real bar (percent, rate, ETA) from tqdm, imported only then.
"""

from __future__ import annotations

import shutil
import struct
import sys
from typing import Any

import click

_FLOAT = struct.Struct("f")


def _f32(x: float) -> float:
    """``x`` rounded to a C float, as qemu-img's progress arithmetic rounds it."""
    return float(_FLOAT.unpack(_FLOAT.pack(x))[0])


class Progress:
    """Called with (done, total) bytes; ``close()`` ends the line. ``stepwise``: qemu-img
    adds each step's share to a float (compare, rebase) rather than dividing done by total."""

    def __init__(self, min_step: float = 1.0, stepwise: bool = False) -> None:
        self._min_step = min_step
        self._stepwise = stepwise
        self._current = 0.0
        self._shown = 0.0
        self._started = False
        self._bar: Any = None
        self._done = 0
        self._tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            self._update_bar(done, total)
            return
        if not self._started:
            current = 0.0
        elif self._stepwise:
            if done == self._done:
                return
            share = _f32(_f32(_f32(done - self._done) / _f32(total)) * 100)
            current = _f32(self._current + _f32(_f32(share / 100) * 100))
        else:
            current = _f32(100.0 * done / total if total else 100.0)
            if current == self._current:
                return
        self._started = True
        self._done = done
        self._current = current = min(current, 100.0)
        shown, step = self._shown, self._min_step
        if current > _f32(shown + step) or current < _f32(shown - step) or current in (0.0, 100.0):
            self._shown = current
            click.echo(f"    ({current:.2f}/100%)\r", nl=False)

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
