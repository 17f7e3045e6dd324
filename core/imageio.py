"""Reading images and tensors from files and request bodies, with a pixel budget.

* ``.npy``: read natively (``allow_pickle=False``); :func:`load_image` wants pixel
  values, :func:`load_input` returns the array as stored (tensor models: int8
  features, float sensor windows).
* Binary PGM / PPM (P5 / P6, 8 or 16 bit): read natively, no dependency.
* PNG, JPEG, BMP, GIF, TIFF, WebP: through Pillow (in the ``[agent]`` extra).  Pillow
  only *warns* between 89 M and 179 M pixels (a 493 KB PNG decodes to 3.2 GB), so the
  declared size is checked against ``max_pixels`` *before* the pixels are decoded and
  an over-budget image raises :class:`~core.errors.ImageTooLargeError` (HTTP 413).
* EXIF orientation is **not** applied (as ``PIL.Image.open``; OpenCV's ``imread``
  applies it): models are fed the stored pixels unless ``exif_transpose=True``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import ImageTooLargeError, InputError

__all__ = ["IMAGE_SUFFIXES", "DEFAULT_MAX_PIXELS", "load_image", "load_input", "decode_image_bytes", "image_size",
           "check_pixels", "as_uint8_image"]

IMAGE_SUFFIXES = (".npy", ".pgm", ".ppm", ".pnm", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: 40 M pixels: a 12 MP phone photo passes, a decompression bomb does not (120 MB as RGB uint8).
DEFAULT_MAX_PIXELS = 40_000_000
_EXPECTED = "expected uint8 (or float in [0, 255]) of shape (H, W) or (H, W, C) with C in 1, 3, 4"


def check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    """Raise :class:`ImageTooLargeError` when ``width * height`` is over ``max_pixels``."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{what} is {width}x{height} = {width * height:,} pixels, over the budget of "
                                 f"{max_pixels:,}", hint="send a smaller image (resize on the camera side)",
                                 width=width, height=height, max_pixels=max_pixels)


def as_uint8_image(arr: np.ndarray, what: str) -> np.ndarray:
    """An array of pixel values -> uint8 (H, W) or (H, W, 3) (alpha dropped), or :class:`InputError`."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{what} has dtype {arr.dtype}; {_EXPECTED}", hint="convert the image to uint8")
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 255.0:
                raise InputError(f"{what} ({arr.dtype}) has values in [{lo:g}, {hi:g}]; expected pixel values in "
                                 "[0, 255]", hint="pass the raw image, not an already normalised tensor")
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise InputError(f"{what} has shape {tuple(arr.shape)}; {_EXPECTED}", hint="pass an (H, W) or (H, W, C) image")
    if arr.shape[2] == 1:
        return arr[..., 0]
    return np.ascontiguousarray(arr[..., :3])


# ---------------------------------------------------------------------------- PGM / PPM


def _read_pnm(data: bytes, what: str, max_pixels: int | None) -> np.ndarray:
    """Binary PGM (P5) / PPM (P6), 8 or 16 bit, header comments allowed."""
    magic = data[:2]
    if magic not in (b"P5", b"P6"):
        raise InputError(f"{what}: not a binary PGM/PPM file (magic {magic!r})", hint="save as binary P5/P6")
    fields: list[bytes] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":  # comment to end of line
            while pos < len(data) and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise InputError(f"{what}: truncated PGM/PPM header")
        fields.append(data[start:pos])
    pos += 1  # exactly one whitespace byte before the raster
    try:
        width, height, maxval = (int(f) for f in fields)
    except ValueError:
        raise InputError(f"{what}: bad PGM/PPM header {fields!r}") from None
    if not (width > 0 and height > 0 and 0 < maxval < 65536):
        raise InputError(f"{what}: bad PGM/PPM header {width}x{height} maxval {maxval}")
    check_pixels(width, height, max_pixels, what)
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height * channels
    if len(data) - pos < count * dtype.itemsize:
        raise InputError(f"{what}: truncated PGM/PPM raster")
    raster = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
    img = raster.reshape(height, width, channels) if channels == 3 else raster.reshape(height, width)
    if maxval != 255:
        img = np.round(img.astype(np.float32) * (255.0 / maxval)).astype(np.uint8)
    return np.array(img, dtype=np.uint8)


# ---------------------------------------------------------------------------- Pillow


def _pillow(what: str):  # type: ignore[no-untyped-def]
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"{what}: reading PNG/JPEG images needs Pillow",
                         hint="pip install 'edgeloop[agent]' (or send .npy / .pgm / .ppm)") from None
    return Image


def _decode_pillow(source: io.BytesIO | Path, what: str, max_pixels: int | None, exif_transpose: bool) -> np.ndarray:
    image_mod = _pillow(what)
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with image_mod.open(source) as im:
            check_pixels(im.size[0], im.size[1], max_pixels, what)  # header only: nothing decoded yet
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            if im.mode not in ("L", "RGB"):
                gray = im.mode in ("1", "LA", "I", "I;16", "F") or im.mode.startswith("I;")
                im = im.convert("L" if gray else "RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except image_mod.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}", hint="send a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{what}: cannot read image ({exc})", hint="the file is corrupt or not an image") from None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by an image's header, without decoding it; None when unknown."""
    if data[:2] in (b"P5", b"P6"):
        try:
            parts = data[2:200].split()
            return int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            return None
    try:
        image_mod = _pillow("image")
        with image_mod.open(io.BytesIO(data)) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - unknown format or no Pillow: no size
        return None


# ---------------------------------------------------------------------------- entry points


def decode_image_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image",
                       exif_transpose: bool = False) -> np.ndarray:
    """Image file bytes (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM) -> uint8 (H, W) or (H, W, 3).

    Raises :class:`ImageTooLargeError` over ``max_pixels`` (checked before decoding)
    and :class:`InputError` for anything unreadable; never writes a temporary file.
    """
    if not data:
        raise InputError(f"{what} is empty", hint="send the image bytes")
    if data[:2] in (b"P5", b"P6"):
        return _read_pnm(data, what, max_pixels)
    return _decode_pillow(io.BytesIO(data), what, max_pixels, exif_transpose)


def load_input(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = False) -> np.ndarray:
    """A file as the model's input: ``.npy`` as stored (any dtype, any shape), images as uint8 pixels."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.dtype == object:
                raise InputError(f"{p}: .npy holds Python objects", hint="save a numeric array")
            return np.asarray(arr)
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file", path=p) from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{p}: cannot read ({exc})", hint="the file is corrupt", path=p) from None
    if p.suffix.lower() in (".pgm", ".ppm", ".pnm"):
        return _read_pnm(data, str(p), max_pixels)
    return _decode_pillow(io.BytesIO(data), str(p), max_pixels, exif_transpose)


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = False) -> np.ndarray:
    """Read an image file as uint8 (H, W) or (H, W, 3); a ``.npy`` must hold pixel values."""
    p = Path(path)
    arr = load_input(p, max_pixels=max_pixels, exif_transpose=exif_transpose)
    if p.suffix.lower() == ".npy":
        return as_uint8_image(arr, str(p))
    return arr
