"""Frames to the model's input size in the capture thread, in 8-bit, before they are queued.

A 320x240 or 640x480 frame resized in float on the inference thread (``core.preprocess``:
two dense weight matrices per axis) costs as much as a small model; the same resize in
C on 8-bit pixels (Pillow, OpenCV) takes a fraction of that and releases the GIL, so on a
device with two cores it overlaps inference instead of delaying it.  The shaped frame is
the model's own size, so the agent's :class:`~core.preprocess.Preprocessor` then takes its
one-pass path (cast, scale and normalise straight into the runtime's input buffer).

Each resize mode goes to the library call that ``core.preprocess`` reproduces, so values
agree to within a grey level (the 8-bit rounding, once per step: luminance then resize can
reach 1.05, an area resize that shrinks one axis and enlarges the other 1.15; the mean
difference is a quarter level; ``tests/agent/test_sources.py`` checks every mode against
``core.preprocess``):

===============  ============================================  ==========================
mode             shrinking                                      enlarging
===============  ============================================  ==========================
``bilinear``     Pillow ``BILINEAR`` (antialiased)              Pillow ``BILINEAR``
``area``         OpenCV ``INTER_AREA``                          OpenCV ``INTER_LINEAR``
``bilinear-cv``  OpenCV ``INTER_LINEAR``                        OpenCV ``INTER_LINEAR``
``nearest``      numpy indexing, ``floor((i + 0.5) * scale)``   the same
===============  ============================================  ==========================

Only where the answer does not depend on where pixels came from: a classification
model whose fit is ``stretch`` or ``center-crop`` with ``crop_fraction = 1`` (a shaped frame
must be one the agent's preprocessing leaves as it is; a detector's boxes are mapped back to
the frame through the preprocessing's geometry, so detectors get the whole frame).
Colour frames for a one-channel model become luminance (ITU-R 601, ``core.preprocess``'s
weights) before the resize.  A channel-reversed view (OpenCV's BGR frame flipped to RGB)
is resized as the BGR buffer it views and flipped back on the small image: no copy of
the full frame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from core.manifest import Preprocessing
from core.preprocess import plan_geometry

__all__ = ["Shaper", "frame_shaper", "SHAPED_TASKS"]

Shaper = Callable[[np.ndarray], np.ndarray]

#: task kinds whose answer does not depend on the frame's geometry
SHAPED_TASKS = frozenset({"classification"})

_FITS = ("stretch", "center-crop")
_LUMA_RGB = (0.299, 0.587, 0.114, 0.0)  # Pillow's convert("L", matrix): core.preprocess._LUMA's weights
_LUMA_BGR = (0.114, 0.587, 0.299, 0.0)


@functools.cache
def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


@functools.cache
def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    rows = np.minimum(np.floor((np.arange(size[0]) + 0.5) * (h / size[0])).astype(np.intp), h - 1)
    cols = np.minimum(np.floor((np.arange(size[1]) + 0.5) * (w / size[1])).astype(np.intp), w - 1)
    return img[rows[:, None], cols[None, :]]


def _resizer(mode: str) -> Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None:
    """``resize(img, (h, w))`` on a contiguous 8-bit (H, W[, 3]) image, or None where no library does ``mode``."""
    if mode == "nearest":
        return _nearest
    image, cv2 = _pillow(), _cv2()

    def pil(img: np.ndarray, size: tuple[int, int], flt: int) -> np.ndarray:
        return np.asarray(image.fromarray(img).resize((size[1], size[0]), flt))

    def linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def area(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = img.shape[:2]
        if (size[0] - h) * (size[1] - w) < 0:  # one axis shrinks, the other grows: each axis its own way
            return area(area(img, (h, size[1])), size)
        flag = cv2.INTER_AREA if size[0] <= h and size[1] <= w else cv2.INTER_LINEAR
        return cv2.resize(img, (size[1], size[0]), interpolation=flag)

    if mode in ("bilinear-cv", "area"):
        return None if cv2 is None else (linear if mode == "bilinear-cv" else area)
    if mode == "bilinear" and image is not None:
        return lambda img, size: pil(img, size, image.BILINEAR)
    return None


def _gray(img: np.ndarray, bgr: bool) -> np.ndarray:
    """An 8-bit colour image's luminance: what core.preprocess computes in float, rounded (OpenCV: a third of
    Pillow's time, same ITU-R 601 weights)."""
    cv2 = _cv2()
    if cv2 is not None:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    from PIL import Image

    return np.asarray(Image.fromarray(img, "RGB").convert("L", _LUMA_BGR if bgr else _LUMA_RGB))


def frame_shaper(spec: Preprocessing | None, task: str = "classification") -> Shaper | None:
    """A function taking an 8-bit (H, W[, C]) frame to ``spec.size``; None where it must stay whole.

    None for tensor models, tasks that map results back to the frame (detection), fits
    that pad (letterbox, height), and modes no installed library computes.  Frames the
    shaper cannot take (float pixels, odd shapes) pass through unchanged: the agent's own
    preprocessing handles (or rejects) them exactly as before.
    """
    if spec is None or task not in SHAPED_TASKS or spec.fit not in _FITS:
        return None
    if spec.fit == "center-crop" and spec.crop_fraction != 1.0:
        return None  # the agent would crop the shaped frame again: only a full-side crop is idempotent
    resize = _resizer(spec.resize)
    if resize is None or (spec.channels == 1 and _pillow() is None and _cv2() is None):
        return None
    out_h, out_w = (int(v) for v in spec.size)
    one = spec.channels == 1

    def shape(frame: np.ndarray) -> np.ndarray:
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
            return frame
        img, bgr = frame, False
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]  # alpha carries no appearance (as core.preprocess)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim == 3 and img.strides[2] < 0:  # an RGB view of a BGR buffer: work on the buffer
            img, bgr = img[:, :, ::-1], True
        img = np.ascontiguousarray(img)  # a no-op for a whole frame; an ROI is copied once
        if one and img.ndim == 3:
            img, bgr = _gray(img, bgr), False
        geo, (rh, rw) = plan_geometry(img.shape[0], img.shape[1], spec)
        if (rh, rw) != img.shape[:2]:
            img = resize(img, (rh, rw))
        top, left = -int(geo.offset[0]), -int(geo.offset[1])
        if (top, left) != (0, 0) or (rh, rw) != (out_h, out_w):  # center-crop: a view
            img = img[top:top + out_h, left:left + out_w]
        return img[:, :, ::-1] if bgr else img

    return shape
