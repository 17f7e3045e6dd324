"""What every frame source is: one small interface, a frame type and the capture-side controls.

A :class:`Source` opens once (raising :class:`~core.errors.SourceError` with one line when
it cannot), then :meth:`Source.read` returns the next item as a numpy array, ``None`` when
a finite source has ended, or raises :class:`SourceLost` when a live stream dropped (the
capture loop in :mod:`edge_agent.pipeline` then reopens it with back-off).  Plug-ins differ
only in how they get pixels; frame-rate control and the region of interest are applied
after :meth:`read`, the same for all (:class:`FrameGate`, :func:`crop`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from core.errors import SourceError

__all__ = ["Frame", "Source", "SourceLost", "FrameGate", "crop"]


@dataclass(slots=True)
class Frame:
    """One captured item on its way to the model.

    ``t_capture`` is ``time.monotonic()`` when the source returned it (the start of the
    end-to-end latency); ``seq`` counts the frames this source produced, dropped ones included.
    """

    data: np.ndarray
    t_capture: float
    seq: int
    source: str
    ref: str = ""  # what the item is, where the source knows (a file name)


class SourceLost(Exception):  # noqa: N818 - a signal inside the capture loop, never shown to a user
    """A live source stopped delivering (camera unplugged, stream dropped): reopen it."""


class Source:
    """A frame source.  Subclasses set ``live`` and implement :meth:`open`, :meth:`read`, :meth:`close`.

    ``live`` sources (cameras, network streams) run at their own pace: when inference falls
    behind, the oldest queued frame is dropped.  Finite ones (files, folders, tensor
    streams) wait for the model instead, so every item is predicted.
    """

    live: bool = True
    uri: str = ""
    _grabbed: np.ndarray | None = None

    def open(self) -> None:
        """Open the device / stream / file; raise :class:`SourceError` with one line when it cannot."""

    def read(self, stop: threading.Event) -> np.ndarray | None:
        """The next item; ``None`` at the end of a finite source; :class:`SourceLost` when a stream dropped."""
        raise NotImplementedError

    def grab(self, stop: threading.Event) -> bool:
        """Take the next item without decoding it where the source can (a video frame's packet): False at the
        end of a finite source, :class:`SourceLost` as :meth:`read`.  The capture loop grabs, asks the frame
        gate, and only then :meth:`retrieve` s, so frames the rate control skips are never decoded.  This
        default reads (sources whose items cost nothing more to decode)."""
        self._grabbed = self.read(stop)
        return self._grabbed is not None

    def retrieve(self) -> np.ndarray:
        """The item the last :meth:`grab` took, decoded."""
        data, self._grabbed = self._grabbed, None
        if data is None:
            raise SourceLost(f"{self.uri}: nothing grabbed")
        return data

    def close(self) -> None:
        """Release the device (idempotent)."""

    @property
    def ref(self) -> str:
        """What the last item read was (a file name), where it has a name."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class FrameGate:
    """Frame-rate control: keep every ``every``-th frame and at most ``fps`` frames per second.

    Applied in the capture thread, before a frame is queued, so skipped frames cost no
    preprocessing and are not counted as dropped.  ``fps`` keeps a schedule (the next
    frame is due one period after the previous one was due) rather than "one period after
    the last kept", so 30 fps in, 10 fps out keeps exactly every third frame.
    """

    def __init__(self, *, fps: float = 0.0, every: int = 1) -> None:
        if fps < 0 or every < 1:
            raise ValueError("fps must be >= 0 and every >= 1")
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.every = every
        self._n = 0
        self._due = 0.0

    def keep(self, t: float) -> bool:
        """Whether the frame read at monotonic time ``t`` goes on to the model."""
        self._n += 1
        if (self._n - 1) % self.every:
            return False
        if self.period:
            if t < self._due:
                return False
            # a source slower than the rate must not build up credit for a burst later
            self._due = max(self._due + self.period, t - self.period / 2)
        return True


def crop(data: np.ndarray, roi: tuple[int, int, int, int] | tuple[()]) -> np.ndarray:
    """The region of interest ``(x, y, width, height)`` of an image, as a view (no copy).

    A region reaching past the frame is clipped to it; one entirely outside is an error,
    since it would hand the model an empty image on every frame.
    """
    if not roi:
        return data
    x, y, w, h = roi
    view = data[y:y + h, x:x + w]
    if view.shape[0] < 1 or view.shape[1] < 1:
        raise SourceError(f"region of interest {list(roi)} (x, y, width, height) lies outside the "
                          f"{data.shape[1]}x{data.shape[0]} frame", hint="fix [[source]].roi")
    return view
