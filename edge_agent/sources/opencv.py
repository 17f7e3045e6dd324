"""Cameras, network streams and video files through OpenCV ``VideoCapture`` (``pip install 'edgeloop[camera]'``).

* ``camera:N`` / ``/dev/videoN``: a V4L2 camera (USB webcam; the Pi camera through libcamera's
  V4L2 compatibility layer when Picamera2 is not installed);
* ``rtsp://...``, ``http(s)://...`` (MJPEG over HTTP): network streams through FFmpeg, with
  open and read time-outs so a dead camera never hangs the capture thread;
* ``*.mp4``, ``*.avi``, ``*.mkv``, ``*.mov``, ``*.webm``: video files, read as fast as the model
  takes them (frames the rate control skips are grabbed, never decoded) (``loop = true`` starts again at the end), or at their own frame rate
  (``realtime = true``: a camera stand-in, live, dropping frames when the model is slower).

Frames come out RGB (OpenCV decodes BGR; the channel flip is a view, not a copy).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import SourceError

from .base import Source, SourceLost

__all__ = ["OpenCVSource", "VIDEO_SUFFIXES", "cv2_module"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpg", ".mjpeg")


def cv2_module() -> Any:
    """``cv2``, or a one-line :class:`SourceError` naming the extra to install."""
    try:
        import cv2
    except ImportError as exc:
        raise SourceError(f"OpenCV is not installed ({exc})",
                          hint="pip install 'edgeloop[camera]' (opencv-python-headless)") from None
    return cv2


class OpenCVSource(Source):
    """One ``cv2.VideoCapture``: a camera index, a device path, a stream URL or a video file."""

    def __init__(self, uri: str, target: int | str, *, kind: str, loop: bool = False, realtime: bool = False,
                 timeout_s: float = 10.0) -> None:
        if kind not in ("camera", "stream", "file"):
            raise ValueError(f"unknown kind {kind!r}")
        self.uri = uri
        self.target = target
        self.kind = kind
        self.live = kind != "file" or realtime
        self.loop = loop
        self.realtime = realtime and kind == "file"
        self._period = 0.0
        self._due = 0.0
        self.timeout_ms = int(timeout_s * 1000)
        self._cap: Any = None
        self._frames = 0

    def open(self) -> None:
        cv2 = cv2_module()
        if self.kind == "file" and not Path(str(self.target)).is_file():
            raise SourceError(f"cannot open source {self.uri}: no such file", hint="check the path")
        params: list[int] = []
        if self.kind == "stream":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
        api = cv2.CAP_FFMPEG if self.kind != "camera" else cv2.CAP_ANY
        cap = cv2.VideoCapture(self.target, api, params)
        if not cap.isOpened():
            cap.release()
            hint = {"camera": "check the device exists (ls /dev/video*) and this user is in the video group",
                    "stream": "check the URL, that the camera is up and the network reaches it",
                    "file": "the file may be damaged or in a codec this OpenCV build cannot decode"}[self.kind]
            raise SourceError(f"cannot open source {self.uri}: OpenCV could not open it", hint=hint)
        self._cap = cap
        self._frames = 0
        if self.realtime:
            fps = cap.get(cv2.CAP_PROP_FPS)
            self._period = 1.0 / fps if fps and fps > 0 else 1.0 / 30.0
            self._due = time.monotonic()

    def read(self, stop: threading.Event) -> np.ndarray | None:
        return self.retrieve() if self.grab(stop) else None

    def grab(self, stop: threading.Event) -> bool:
        """The next frame's packet, not decoded yet (``VideoCapture.grab``); False at the end of a file."""
        if self._cap is None:
            raise SourceLost(f"{self.uri} is not open")
        if not self._cap.grab():
            if self.kind == "file":
                if self.loop and self._frames:
                    self._cap.set(1, 0)  # CAP_PROP_POS_FRAMES: back to the first frame
                    self._frames = 0
                    return self.grab(stop)
                return False
            raise SourceLost(f"{self.uri} stopped delivering frames")
        self._frames += 1
        if self.realtime:  # pace like a camera: one frame per period, never a burst to catch up
            self._due = max(self._due + self._period, time.monotonic() - self._period)
            stop.wait(max(0.0, self._due - time.monotonic()))
        return True

    def retrieve(self) -> np.ndarray:
        """The grabbed frame, decoded (``VideoCapture.retrieve``), as RGB."""
        if self._cap is None:
            raise SourceLost(f"{self.uri} is not open")
        ok, frame = self._cap.retrieve()
        if not ok or frame is None:
            raise SourceLost(f"{self.uri}: a frame could not be decoded")
        if frame.ndim == 3 and frame.shape[2] == 3:
            return frame[:, :, ::-1]  # BGR -> RGB as a view; preprocess makes the one float copy
        return frame

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
