"""The drift monitor's two helper threads, apart from the statistics they serve.

:class:`WindowWorker` closes a background :class:`~core.drift.DriftMonitor`'s full windows
one at a time, in order, and reports them; :class:`Stager` writes a large input's drift
thumbnail while the runtime runs the model without the GIL.  Both are created and driven
by the monitor (``core/drift.py``); nothing here computes a statistic.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["WindowWorker", "Stager", "CLOSING_SWITCH_INTERVAL_S"]

log = logging.getLogger("core.drift")


class Stager:
    """The thread that writes a background monitor's large input thumbnails while the model runs.

    One job at a time: :meth:`post` waits for the last one to finish (``_busy`` is held while
    a job is queued or running), :meth:`wait` until it has.  Lock and ``SimpleQueue`` are the
    C-level primitives: a post and a wait that finds the job done cost about a microsecond.
    """

    def __init__(self, write: Callable[[np.ndarray, np.ndarray], None]) -> None:
        self._write = write
        self._jobs: queue.SimpleQueue[tuple[np.ndarray, np.ndarray] | None] = queue.SimpleQueue()
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def post(self, inputs: np.ndarray, row: np.ndarray) -> None:
        if self._stopped:  # a model closed while a request was still on it: written here, no new thread
            self._write(inputs, row)
            return
        self._busy.acquire()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drift-stage", daemon=True)
            self._thread.start()
        self._jobs.put((inputs, row))

    def wait(self) -> None:
        self._busy.acquire()
        self._busy.release()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(*job)
            except Exception:  # noqa: BLE001 - a failing thumbnail must not end the thread or the serving
                log.exception("drift input thumbnail could not be written")
            finally:
                self._busy.release()

    def stop(self) -> None:
        self._stopped = True
        if self._thread is not None:
            self.wait()
            self._jobs.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None


_turns_lock = threading.Lock()
_turns_users = 0
_turns_saved = 0.005
CLOSING_SWITCH_INTERVAL_S = 1e-4


@contextlib.contextmanager
def _short_gil_turns() -> Iterator[None]:
    """While a window closes on the worker, a thread waiting for the GIL gets it within 0.1 ms.

    The closing is thousands of small numpy calls that hold the GIL; with Python's default
    5 ms switch interval the serving thread, back from the runtime (which ran without the
    GIL), would wait up to 5 ms for its few microseconds of Python.  Restored afterwards.
    """
    global _turns_users, _turns_saved
    with _turns_lock:
        if _turns_users == 0:
            _turns_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_turns_saved, CLOSING_SWITCH_INTERVAL_S))
        _turns_users += 1
    try:
        yield
    finally:
        with _turns_lock:
            _turns_users -= 1
            if _turns_users == 0:
                sys.setswitchinterval(_turns_saved)


class WindowWorker:
    """The thread that closes a background monitor's full windows, one at a time, in order."""
    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self._cv = threading.Condition()
        self._job: dict[str, np.ndarray] | None = None
        self._job_refs: dict[str, list[np.ndarray | None]] | None = None
        self._spare: dict[str, np.ndarray] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def hand_over(self, full: dict[str, np.ndarray],
                  refs: dict[str, list[np.ndarray | None]] | None = None) -> dict[str, np.ndarray]:
        """Queue ``full`` (and the output rows ``refs`` it gathers) for closing; returns the buffers to
        fill next (waits while the last one is closing)."""
        with self._cv:
            if self._stop:  # closed: later windows are not reported (and never wait for a thread that is gone)
                return full
            while self._job is not None:
                self._cv.wait()
            spare = self._spare if self._spare is not None else {k: np.zeros_like(v) for k, v in full.items()}
            self._job, self._job_refs, self._spare = full, refs, None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="drift-window", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return spare

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._job is None:
                    return
                buf, refs = self._job, self._job_refs
            try:
                with _short_gil_turns():
                    rep = self.monitor._close_window(buf, refs)
                if self.monitor.on_report is not None:
                    self.monitor.on_report(rep)
            except Exception:  # noqa: BLE001 - a failing window must not end the thread or the serving
                log.exception("drift window could not be closed")
            with self._cv:
                self._job, self._job_refs, self._spare = None, None, buf
                self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._job is None, timeout)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
