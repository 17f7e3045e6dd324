"""Progress for long steps (training epochs, export steps, calibration, benchmarks, demo phases).

Always on **stderr**, so stdout stays clean (``--json`` output pipes into ``jq``).  On a
terminal it is a rich progress bar when rich is installed; otherwise (a log file, CI,
``journalctl``) one plain line per step at most every ``every_s`` seconds, plus the
last one, so a long command is never silent.  ``edgeloop -q`` turns it off
(:func:`set_quiet`), ``edgeloop`` without ``-q`` shows it, with or without ``--json``.

    with progress("training", total=epochs) as bar:
        for epoch in ...:
            bar.advance(status=f"val_acc {acc:.3f}")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "progress", "set_quiet", "is_quiet", "say"]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence progress and :func:`say` for the rest of the process (``edgeloop -q``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def say(message: str, *, stream: TextIO | None = None) -> None:
    """One status line on stderr (unless quiet): what a long command is doing now."""
    if not _QUIET:
        print(message, file=stream or sys.stderr, flush=True)


class Progress:
    """A counter with a description; renders as a bar on a TTY, as throttled lines elsewhere."""

    def __init__(self, description: str, total: int | None, *, stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._every_s = every_s
        self._enabled = enabled and not _QUIET
        self._t0 = time.monotonic()
        self._last_line = -float("inf")
        self._status = ""
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self._enabled and self._stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as RichProgress
            except ImportError:  # a device without rich: plain lines
                return self
            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=True,
                                      console=Console(file=self._stream))
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, n: int = 1, *, status: str = "") -> None:
        self.done += n
        self._status = status or self._status
        if not self._enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=n, status=self._status)
            return
        now = time.monotonic()
        last = self.total is not None and self.done >= self.total
        if last or now - self._last_line >= self._every_s:
            self._last_line = now
            print(self._line(now), file=self._stream, flush=True)

    def _line(self, now: float) -> str:
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        status = f" {self._status}" if self._status else ""
        return f"{self.description}: {count}{status} ({now - self._t0:.0f} s)"

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(None, None, None)
            self._rich = None
            if self._enabled and exc[0] is None:  # the bar was transient: leave one line behind
                print(self._line(time.monotonic()), file=self._stream, flush=True)


@contextmanager
def progress(description: str, total: int | None = None, *, enabled: bool = True,
             every_s: float = 10.0) -> Iterator[Progress]:
    """A :class:`Progress` as a context manager (see the module docstring)."""
    with Progress(description, total, enabled=enabled, every_s=every_s) as bar:
        yield bar
