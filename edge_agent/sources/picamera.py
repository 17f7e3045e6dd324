"""``picamera`` / ``picamera:N``: the Raspberry Pi camera through Picamera2 (libcamera), when importable.

Picamera2 comes from Raspberry Pi OS (``sudo apt install python3-picamera2``; create the
agent's venv with ``--system-site-packages`` so it sees it).  Without it, the same camera
is usually reachable as ``/dev/video0`` through libcamera's V4L2 layer (OpenCV source).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from core.errors import SourceError

from .base import Source, SourceLost

__all__ = ["PicameraSource", "picamera_available"]


def picamera_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("picamera2") is not None


class PicameraSource(Source):
    """Frames from Picamera2's video configuration, RGB888 at ``size`` (width, height)."""

    def __init__(self, uri: str, index: int = 0, *, size: tuple[int, int] = (640, 480)) -> None:
        self.uri = uri
        self.index = index
        self.size = size
        self._cam: Any = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise SourceError(f"cannot open source {self.uri}: Picamera2 is not installed",
                              hint="sudo apt install python3-picamera2 and a venv with --system-site-packages, "
                                   "or use camera:0") from None
        try:
            cam = Picamera2(self.index)
            cam.configure(cam.create_video_configuration(main={"format": "RGB888", "size": tuple(self.size)}))
            cam.start()
        except Exception as exc:  # libcamera raises RuntimeError/IndexError/... of its own
            raise SourceError(f"cannot open source {self.uri}: {exc}",
                              hint="check the ribbon cable and `rpicam-hello --list-cameras`") from None
        self._cam = cam

    def read(self, stop: threading.Event) -> np.ndarray | None:
        if self._cam is None:
            raise SourceLost(f"{self.uri} is not open")
        try:
            # libcamera's "RGB888" is B, G, R in memory (DRM fourcc naming): flip to RGB as a view
            return self._cam.capture_array("main")[:, :, 2::-1]
        except Exception as exc:
            raise SourceLost(f"{self.uri}: {exc}") from exc

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()
