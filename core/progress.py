"""Progress for long steps (training epochs, export steps, calibration, benchmarks, demo phases).

Always on **stderr**, so stdout stays clean (``--json`` output pipes into ``jq``).  On a
terminal it is a rich progress bar when rich is installed; otherwise (a log file, CI,
``journalctl``) plain lines, so a long command is never silent.  ``edgeloop -q`` turns it
off (:func:`set_quiet`), ``edgeloop`` without ``-q`` shows it, with or without ``--json``.

Counted work advances a bar (at most one plain line every ``every_s`` seconds, plus the last)::

    with progress("training", total=epochs) as bar:
        for epoch in ...:
            bar.advance(status=f"val_acc {acc:.3f}")

Named steps announce each step as it begins (:meth:`Progress.step`, a ``Callable[[str], None]``
for the ``progress=`` callbacks of ``export_run``, ``run_matrix``, ``plan_int8``): with a
``total`` (benchmark cells, gate attempts, export variants) a bar with a count, ``desc [k/N]:
step`` lines elsewhere; without one, a ``desc: step`` line per step::

    with progress("bench", total=len(cells)) as bar:
        run_matrix(entries, config, progress=bar.step)

One rich live display at a time: a bar opened inside another (a gate's attempts inside
``optimize``) becomes a second row of the outer one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "progress", "set_quiet", "is_quiet", "say", "in_progress"]

_QUIET = False
_LIVE: list[Any] = []  # the rich Progress on screen, if any: nested bars add their row to it
_OPEN = [0]  # Progress contexts open (enabled ones): in_progress()


def set_quiet(quiet: bool) -> None:
    """Silence progress and :func:`say` for the rest of the process (``edgeloop -q``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def in_progress() -> bool:
    """Whether a command's progress is showing now: a library function called inside it may add a
    bar of its own (``enabled=in_progress()``) and stays silent when called on its own."""
    return _OPEN[0] > 0


def say(message: str, *, stream: TextIO | None = None) -> None:
    """One status line on stderr (unless quiet): what a long command is doing now."""
    if not _QUIET:
        print(message, file=stream or sys.stderr, flush=True)


class Progress:
    """A counter with a description; renders as a bar on a TTY, as plain lines elsewhere.

    ``bar=False``: plain lines even on a terminal (the demo's phases, around which other
    commands draw their own bars)."""

    def __init__(self, description: str, total: int | None, *, stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True, bar: bool = True) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._every_s = every_s
        self._enabled = enabled and not _QUIET
        self._bar = bar
        self._t0 = time.monotonic()
        self._last_line = -float("inf")
        self._status = ""
        self._started = 0  # steps begun (step()); the one in flight counts as done when the next begins
        self._rich: Any = None
        self._owner = False  # this bar opened the live display (else it is a row of an outer one)
        self._task: Any = None
        self._open = False

    def __enter__(self) -> Progress:
        self._open = self._enabled
        _OPEN[0] += self._open
        if not (self._enabled and self._bar and self._stream.isatty()):
            return self
        if _LIVE:
            self._rich = _LIVE[-1]
        else:
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
            self._owner = True
            _LIVE.append(self._rich)
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

    def step(self, status: str) -> None:
        """A named step begins (the previous one, if any, is done); see the module docstring."""
        if self._started > self.done:
            self.done += 1
        self._started += 1
        if self.total is not None and self._started > self.total:  # more steps than foreseen: never past 100 %
            self.total = self._started
            if self._rich is not None:
                self._rich.update(self._task, total=self.total)
        self._status = status
        if not self._enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, status=status)
            if self.total is None:  # an uncounted step keeps its line above the bar
                self._rich.console.print(f"{self.description}: {status}", highlight=False)
            return
        count = f" [{self._started}/{self.total}]" if self.total is not None else ""
        print(f"{self.description}{count}: {status}", file=self._stream, flush=True)

    def _line(self, now: float) -> str:
        count = (f"{self.done}/{self.total}" if self.total is not None
                 else f"{self.done} steps" if self._started else str(self.done))
        status = f" {self._status}" if self._status else ""
        return f"{self.description}: {count}{status} ({now - self._t0:.0f} s)"

    def __exit__(self, *exc: object) -> None:
        _OPEN[0] -= self._open
        ok = exc[0] is None
        if ok and self._started > self.done:  # the last step ran to its end
            self.done += 1
            self._status = "done"
            if self._rich is not None:
                self._rich.update(self._task, completed=self.done, status="done")
            elif self._enabled and self.total is not None:
                print(self._line(time.monotonic()), file=self._stream, flush=True)
        if self._rich is None:
            return
        rich, self._rich = self._rich, None
        if self._owner:
            rich.__exit__(None, None, None)
            _LIVE.remove(rich)
            if self._enabled and ok:  # the bar was transient: leave one line behind
                print(self._line(time.monotonic()), file=self._stream, flush=True)
        else:
            rich.remove_task(self._task)
            if self._enabled and ok:
                rich.console.print(self._line(time.monotonic()), highlight=False)


@contextmanager
def progress(description: str, total: int | None = None, *, enabled: bool = True,
             every_s: float = 10.0, bar: bool = True) -> Iterator[Progress]:
    """A :class:`Progress` as a context manager (see the module docstring)."""
    with Progress(description, total, enabled=enabled, every_s=every_s, bar=bar) as p:
        yield p
