"""Raw image -> model input tensor, exactly as :class:`~core.manifest.Preprocessing` says.

numpy only: the agent runs this per inference on a device without Pillow or torch, and
training calls the *same* function, so train and serve never differ.

The bilinear resize is PIL's ``Image.resize(..., BILINEAR)`` done in float: a
separable triangle filter sampled at half-pixel centres, widened by the scale factor
when shrinking so that a 640x480 frame reduced to 32x32 averages its pixels instead of
aliasing.  When enlarging it is identical to OpenCV ``INTER_LINEAR`` and to
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.  Each axis is
one small matrix product with a cached weight matrix, so a batch costs two matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import Preprocessing

__all__ = ["preprocess", "resize", "to_channels", "load_image", "IMAGE_SUFFIXES"]

ImageInput = np.ndarray | Sequence[np.ndarray]

# ITU-R BT.601 luma, the weights PIL's convert("L") and OpenCV's cvtColor use.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
IMAGE_SUFFIXES = (".npy", ".pgm", ".ppm", ".pnm", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_EXPECTED = "expected uint8 (or float in [0, 255]) of shape (H, W), (H, W, C) or (N, H, W[, C]) with C in 1, 3, 4"


def _check_values(arr: np.ndarray, what: str) -> np.ndarray:
    """Return ``arr`` as a numeric array whose values lie in [0, 255], or raise InputError."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{what} has dtype {arr.dtype}; {_EXPECTED}", hint="convert the image to uint8")
    if arr.size:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 255.0:
            raise InputError(
                f"{what} ({arr.dtype}) has values in [{lo:g}, {hi:g}]; expected raw pixel values in [0, 255]",
                hint="pass the raw image, not an already normalised tensor",
            )
    return arr


def _as_hwc(image: np.ndarray, what: str) -> np.ndarray:
    """One image as (H, W, C) with C in 1, 3, 4."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{what} has shape {tuple(image.shape)}; {_EXPECTED}", hint="pass an (H, W) or (H, W, C) image")
    return image


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """A single image or a batch as (N, H, W, C).

    A 3-d array is one (H, W, C) image when its last axis has 1, 3 or 4 entries and a
    batch of gray (N, H, W) images otherwise.
    """
    if images.ndim == 2:
        return images[None, :, :, None]
    if images.ndim == 3:
        if images.shape[2] in (1, 3, 4):
            return _as_hwc(images, "image")[None]
        return images[:, :, :, None]
    if images.ndim == 4 and images.shape[3] in (1, 3, 4) and min(images.shape[1:3], default=0) >= 1:
        return images
    raise InputError(f"input has shape {tuple(images.shape)} and dtype {images.dtype}; {_EXPECTED}",
                     hint="pass images channels-last, e.g. (H, W, 3)")


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) -> float32 (N, H, W, C_out): RGB -> luminance, gray -> replicated, alpha dropped."""
    x = images.astype(np.float32, copy=False)
    c = x.shape[3]
    if c == 4:  # RGBA: the alpha channel carries no appearance
        x, c = x[..., :3], 3
    if channels == 1:
        return x if c == 1 else (x @ _LUMA)[..., None]
    return np.repeat(x, 3, axis=3) if c == 1 else x


def _resize_to_nchw(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize float (N, H, W, C) and return (N, C, oh, ow), touching the big input only once.

    The height pass is one GEMM per image straight on the channels-last buffer (no
    transpose of the full frame); the transpose then happens on the already-shrunk rows.
    """
    n, h, w, c = x.shape
    oh, ow = int(size[0]), int(size[1])
    if oh != h:
        x = (_weights(h, oh, mode) @ x.reshape(n, h, w * c)).reshape(n, oh, w, c)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    if ow != w:
        x = (x.reshape(-1, w) @ _weights(w, ow, mode).T).reshape(n, c, oh, ow)
    return x


@functools.lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) float32 resampling matrix; rows sum to 1 (PIL's algorithm, in float)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), dtype=np.float64)
    centres = (np.arange(n_out) + 0.5) * scale
    if mode == "nearest":
        w[np.arange(n_out), np.minimum(np.floor(centres).astype(np.int64), n_in - 1)] = 1.0
        return w.astype(np.float32)
    support = max(scale, 1.0)  # widen the triangle when shrinking: antialiasing
    src = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def resize(x: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize float (N, C, H, W) to (N, C, size[0], size[1]); a no-op when sizes match."""
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    if (h, w) == (oh, ow):
        return x
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"unknown resize mode {mode!r}", hint="use 'bilinear' or 'nearest'")
    x = np.ascontiguousarray(x, dtype=np.float32)
    lead = x.shape[:-2]
    if ow != w:  # one 2-d GEMM over every row of every image and channel
        x = (x.reshape(-1, w) @ _weights(w, ow, mode).T).reshape(*lead, h, ow)
    if oh != h:
        x = _weights(h, oh, mode) @ x
    return np.ascontiguousarray(x)


def _convert(nhwc: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Channel conversion and resize: (N, H, W, C) raw -> float32 (N, C_out, oh, ow)."""
    x = nhwc.astype(np.float32, copy=False)
    if x.shape[3] == 4:
        x = x[..., :3]
    if spec.channels == 1 and x.shape[3] == 3:
        x = to_channels(x, 1)  # before resizing: a third of the work
    x = _resize_to_nchw(x, spec.size, spec.resize)
    if spec.channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)  # after resizing: replicate the small image only
    return x


def _finish(x: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Scale, normalise per channel and lay out a float32 (N, C, H, W) batch."""
    if spec.channels == 3 and spec.channel_order == "BGR":
        x = x[:, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32))[None, :, None, None]
    # (x * scale - mean) / std folded into one multiply-add.
    x = x * np.float32(spec.scale) * inv_std - mean * inv_std
    x = x.astype(np.float32, copy=False)
    if spec.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def preprocess(images: ImageInput, spec: Preprocessing) -> np.ndarray:
    """Turn raw images into the model's float32 input batch.

    ``images``: one uint8 image (H, W) / (H, W, C), a batch (N, H, W) / (N, H, W, C), or a
    list of single images of any sizes; float input is accepted when it holds raw pixel
    values in [0, 255].  Returns (N, C, H, W) float32, or (N, H, W, C) for an NHWC spec.
    Raises :class:`InputError` naming the offending shape or dtype.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given", hint="pass at least one image")
        parts = []
        for i, img in enumerate(images):
            arr = _check_values(np.asarray(img), f"image {i}")
            parts.append(_convert(_as_hwc(arr, f"image {i}")[None], spec))
        return _finish(np.concatenate(parts, axis=0), spec)
    arr = np.asarray(images)
    if arr.dtype == object:
        raise InputError(f"input has dtype {arr.dtype}; {_EXPECTED}", hint="pass a list of images of different sizes")
    arr = _check_values(_as_nhwc(arr), "input")
    if arr.shape[0] == 0:
        raise InputError("input batch is empty", hint="pass at least one image")
    return _finish(_convert(arr, spec), spec)


# ---------------------------------------------------------------------------- reading


def _read_pnm(data: bytes, path: Path) -> np.ndarray:
    """Binary PGM (P5) / PPM (P6), 8 or 16 bit, header comments allowed."""
    magic = data[:2]
    if magic not in (b"P5", b"P6"):
        raise InputError(f"{path}: not a binary PGM/PPM file (magic {magic!r})", hint="save as binary P5/P6", path=path)
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
            raise InputError(f"{path}: truncated PGM/PPM header", path=path)
        fields.append(data[start:pos])
    pos += 1  # exactly one whitespace byte before the raster
    try:
        width, height, maxval = (int(f) for f in fields)
    except ValueError:
        raise InputError(f"{path}: bad PGM/PPM header {fields!r}", path=path) from None
    if not (width > 0 and height > 0 and 0 < maxval < 65536):
        raise InputError(f"{path}: bad PGM/PPM header {width}x{height} maxval {maxval}", path=path)
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height * channels
    raster = np.frombuffer(data, dtype=dtype, count=count, offset=pos) if len(data) - pos >= count * dtype.itemsize else None
    if raster is None:
        raise InputError(f"{path}: truncated PGM/PPM raster", path=path)
    img = raster.reshape(height, width, channels) if channels == 3 else raster.reshape(height, width)
    if maxval != 255:
        img = np.round(img.astype(np.float32) * (255.0 / maxval)).astype(np.uint8)
    return np.array(img, dtype=np.uint8)


def _read_pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError(f"{path}: reading {path.suffix or 'this'} images needs Pillow",
                         hint="pip install pillow (or convert the image to .npy / .pgm / .ppm)", path=path) from None
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                gray = im.mode in ("1", "LA", "I", "I;16", "F") or im.mode.startswith("I;")
                im = im.convert("L" if gray else "RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})", hint="the file is corrupt or not an image", path=path) from exc


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 (H, W) or (H, W, 3).

    ``.npy`` and binary ``.pgm`` / ``.ppm`` are read natively; PNG, JPEG, BMP and the
    rest through Pillow when it is installed.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix in (".pgm", ".ppm", ".pnm"):
            arr = _read_pnm(p.read_bytes(), p)
        else:
            return _read_pillow(p)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file", path=p) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: cannot read image ({exc})", hint="the file is corrupt", path=p) from exc
    arr = _check_values(np.asarray(arr), str(p))
    arr = _as_hwc(arr, str(p))
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
    return out[..., 0] if out.shape[2] == 1 else np.ascontiguousarray(out)
