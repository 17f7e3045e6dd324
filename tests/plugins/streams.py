"""Camera-like inputs without a camera: a video file written with OpenCV, an MJPEG stream over HTTP.

``mjpeg_server`` serves ``multipart/x-mixed-replace`` JPEG frames (what IP cameras and
``mjpg-streamer`` send) from a real socket on a free loopback port.  ``stop()`` kills it
(open connections included: the stream "dies"), ``start()`` brings it back on the same
port, so the reconnect path is tested against a real disconnect.  ``frames_sent`` lets a
test wait for progress instead of sleeping.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

__all__ = ["MjpegServer", "write_video", "frame_image"]



def _cv2():  # noqa: ANN202 - the module, imported when a test needs it (the plugin loads without OpenCV)
    return pytest.importorskip("cv2", reason="opencv-python-headless is not installed (pip install 'edgeloop[camera]')")


def frame_image(i: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Frame ``i``: a gray level plus a moving bar, RGB uint8 of (height, width)."""
    h, w = size
    img = np.full((h, w, 3), (i * 7) % 256, np.uint8)
    img[:, (i * 3) % w] = 255
    return img


def write_video(path: Path, n: int, *, size: tuple[int, int] = (48, 64), fps: float = 30.0) -> Path:
    """An ``n``-frame video (``.mp4``: mp4v, ``.avi``: MJPG) written with OpenCV."""
    cv2 = _cv2()
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    w = cv2.VideoWriter(str(path), fourcc, fps, (size[1], size[0]))
    assert w.isOpened(), f"OpenCV cannot write {path.suffix}"
    for i in range(n):
        w.write(frame_image(i, size)[:, :, ::-1].copy())
    w.release()
    return path


class MjpegServer:
    """An MJPEG-over-HTTP camera at ``url``; endless frames, as fast as the client reads them."""

    def __init__(self, *, size: tuple[int, int] = (48, 64), port: int = 0) -> None:
        self.size = size
        self.port = port or _free_port()
        self.frames_sent = 0
        self.connections = 0
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._alive = threading.Event()
        cv2 = _cv2()
        self._jpegs = [cv2.imencode(".jpg", frame_image(i, size)[:, :, ::-1].copy())[1].tobytes() for i in range(16)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> MjpegServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/stream.mjpg":
                    self.send_error(404)
                    return
                with outer._cond:
                    outer.connections += 1
                    outer._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                i = 0
                try:
                    while outer._alive.is_set():
                        jpg = outer._jpegs[i % len(outer._jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
                        i += 1
                        with outer._cond:
                            outer.frames_sent += 1
                            outer._cond.notify_all()
                except OSError:
                    pass
                finally:
                    try:  # a hard close: the client sees the stream die, not a clean end
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        self._alive.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mjpeg-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Kill the camera: stop accepting and end the open streams."""
        self._alive.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_frames(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until ``n`` frames in total have been sent."""
        with self._cond:
            return self._cond.wait_for(lambda: self.frames_sent >= n, timeout)

    def wait_connections(self, n: int, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.connections >= n, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mjpeg_server() -> Iterator[MjpegServer]:
    """A running MJPEG camera on a free loopback port (stopped after the test)."""
    srv = MjpegServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    """A 60-frame 64x48 ``.mp4`` written with OpenCV."""
    return write_video(tmp_path / "clip.mp4", 60)
