"""A tiny PNG encoder (numpy + zlib), so sample thumbnails need no Pillow.

Grayscale ``(H, W)``, gray+alpha ``(H, W, 2)``, RGB ``(H, W, 3)`` and RGBA ``(H, W, 4)``
uint8 images; 8 bits per channel, filter type 0 on every row (thumbnails are small:
compression ratio matters less than code that is obviously right).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_png", "upscale"]

_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (``(H, W)`` or ``(H, W, C)`` with C in 1..4)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"encode_png wants uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in _COLOR_TYPE or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"encode_png wants (H, W) or (H, W, 1..4), got {image.shape}")
    h, w, c = img.shape
    # Each scanline starts with its filter byte (0 = none).
    raw = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(img).reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)), _chunk(b"IEND", b"")])


def upscale(image: np.ndarray, min_side: int = 96, *, max_side: int = 512) -> np.ndarray:
    """A thumbnail: nearest-neighbour enlargement so tiny images (8×8 digits) stay crisp in the
    browser, and never more than ``max_side`` pixels a side.

    The enlargement factor is capped by the *long* side and a long side beyond ``max_side`` is
    subsampled first, so a sample of hostile proportions (1×50000) costs at most
    ``max_side``² pixels here, never the short side's factor times the long side.
    """
    img = np.asarray(image)
    if img.ndim < 2 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"upscale wants an (H, W[, C]) image, got shape {img.shape}")
    h, w = img.shape[0], img.shape[1]
    step = max(1, -(-max(h, w) // max_side))
    if step > 1:  # subsample (views, no copy) until the long side fits
        img = img[::step, ::step]
        h, w = img.shape[0], img.shape[1]
    k = max(1, -(-min_side // max(1, min(h, w))))
    k = max(1, min(k, max_side // max(h, w)))
    if k == 1:
        return img
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1)
