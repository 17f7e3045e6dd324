"""Frame sources for ``edgeloop agent run --source URI`` and ``[[source]]`` in agent.toml.

One interface (:class:`Source`), one plug-in per kind of input, chosen by the URI through a
table (:data:`SCHEMES`, first match wins):

========================================  ==========================================  ========
URI                                       plug-in                                     pace
========================================  ==========================================  ========
``camera:0``, ``/dev/video0``             OpenCV ``VideoCapture`` (V4L2)              live
``picamera``, ``picamera:1``              Picamera2 (Raspberry Pi camera)             live
``rtsp://...``, ``http(s)://...``         OpenCV + FFmpeg (RTSP, MJPEG over HTTP)     live
``clip.mp4`` / ``.avi`` / ``.mkv``...     OpenCV + FFmpeg (video file)                finite
``dir:PATH`` or an existing folder        folder watch (each new image once)          finite
``npy:PATH``                              rows of a ``.npy`` file (tensor models)     finite
``stdin``                                 ``.npy`` arrays streamed on standard input  finite
========================================  ==========================================  ========

Live sources drop the oldest queued frame when the model falls behind; finite ones wait.
Heavy imports (OpenCV, Picamera2) happen only when such a source is opened.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from core.errors import SourceError

from .base import Frame, FrameGate, Source, SourceLost, crop

__all__ = ["Frame", "FrameGate", "Source", "SourceLost", "crop", "make_source", "SCHEMES"]


def _camera(uri: str) -> Source | None:
    from .opencv import OpenCVSource

    m = re.fullmatch(r"camera:(\d+)", uri)
    if m:
        return OpenCVSource(uri, int(m.group(1)), kind="camera")
    if re.fullmatch(r"/dev/video\d+", uri):
        return OpenCVSource(uri, uri, kind="camera")
    return None


def _picamera(uri: str) -> Source | None:
    m = re.fullmatch(r"picamera(?::(\d+))?", uri)
    if not m:
        return None
    from .picamera import PicameraSource

    return PicameraSource(uri, int(m.group(1) or 0))


def _stream(uri: str) -> Source | None:
    if not re.match(r"(rtsps?|https?|rtmp|udp|tcp)://", uri, re.IGNORECASE):
        return None
    from .opencv import OpenCVSource

    return OpenCVSource(uri, uri, kind="stream")


def _video(uri: str, *, loop: bool = False, realtime: bool = False) -> Source | None:
    from .opencv import VIDEO_SUFFIXES, OpenCVSource

    path = uri[5:] if uri.startswith("file:") else uri
    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        return None
    return OpenCVSource(uri, path, kind="file", loop=loop, realtime=realtime)


def _folder(uri: str) -> Source | None:
    from .folder import DirSource

    if uri.startswith("dir:"):
        return DirSource(uri, Path(uri[4:]))
    if Path(uri).is_dir():  # `agent run --source DIR`, as before sources had URIs
        return DirSource(uri, Path(uri))
    return None


def _tensor(uri: str) -> Source | None:
    from .tensor import NpySource, StdinSource

    if uri in ("stdin", "-"):
        return StdinSource(uri)
    if uri.startswith("npy:"):
        return NpySource(uri, Path(uri[4:]))
    return None


#: URI -> plug-in, tried in order; each returns None when the URI is not its kind.
SCHEMES: tuple[tuple[str, Callable[..., Source | None]], ...] = (
    ("camera", _camera), ("picamera", _picamera), ("stream", _stream), ("video", _video),
    ("dir", _folder), ("tensor", _tensor),
)


def make_source(uri: str, *, loop: bool = False, realtime: bool = False) -> Source:
    """The plug-in for ``uri`` (not opened yet); a one-line :class:`SourceError` for an unknown kind."""
    uri = uri.strip()
    for name, factory in SCHEMES:
        src = factory(uri, loop=loop, realtime=realtime) if name == "video" else factory(uri)
        if src is not None:
            return src
    if Path(uri).suffix.lower() == ".npy":
        raise SourceError(f"cannot open source {uri}: a .npy file is a tensor stream", hint=f"use npy:{uri}")
    raise SourceError(f"cannot open source {uri}: not a camera, stream, video file, folder or tensor stream",
                      hint="use camera:0, /dev/video0, picamera, rtsp://..., http://..., a .mp4/.avi file, "
                           "dir:PATH, npy:PATH or stdin")
