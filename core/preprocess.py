"""Raw image -> model input tensor, exactly as :class:`~core.manifest.Preprocessing` says.

numpy only: the agent runs this per inference on a device without Pillow or torch, and
training calls the *same* function, so train and serve never differ.

Resize modes (``Preprocessing.resize``), each one separable weight matrix per axis
(cached), so a batch costs two matmuls; all are computed in float, so they agree with
the integer implementations they reproduce to within one grey level
(``tests/core/test_preprocess.py`` checks each against the library itself):

``bilinear``     PIL ``Image.resize(..., Image.BILINEAR)``: triangle filter at half-pixel
                 centres, *widened by the scale factor when shrinking* (antialiased), so a
                 640x480 frame reduced to 32x32 averages its pixels.  When enlarging it is
                 OpenCV ``INTER_LINEAR`` and ``torch ... interpolate(mode="bilinear",
                 align_corners=False)``.
``area``         PIL ``Image.BOX`` / OpenCV ``INTER_AREA`` when shrinking: each output pixel is
                 the mean of the input area it covers (fractional coverage at the edges);
                 when enlarging, ``bilinear-cv``.
``bilinear-cv``  OpenCV ``cv2.resize(..., INTER_LINEAR)`` and TFLite
                 ``resize_bilinear(half_pixel_centers=True)``: two taps at half-pixel centres,
                 *no antialiasing* (what most TFLite / OpenCV training pipelines did).
``nearest``      input pixel ``floor((i + 0.5) * scale)``, PIL ``Image.NEAREST``'s rule; PIL computes the
                 positions in fixed point, so up to ~10 % of samples take the neighbouring pixel.

Fit modes (``Preprocessing.fit``) decide where the image goes in the ``size`` canvas;
:class:`Geometry` maps model-input pixel coordinates back to the original image (for
detection boxes):

``stretch``      resize to ``size``; aspect ratio not kept.
``center-crop``  resize so the shorter side is ``size / crop_fraction`` (torchvision
                 ``Resize(256)`` + ``CenterCrop(224)`` is ``crop_fraction = 0.875``), take the
                 centre ``size``.
``letterbox``    scale by ``r = min(H / h, W / w)`` to ``floor(h r) x floor(w r)`` and pad
                 with ``pad_value`` (raw pixel value) around it, centred or at the top-left
                 (``anchor``): YOLOX ``preproc`` is ``anchor="top-left", pad_value=114``.
``height``       PaddleOCR ``resize_norm_img``: height to ``H``, width ``ceil(H w / h)``
                 capped at ``W``, padded on the right.

Then: channel order (``BGR`` flips RGB), ``x * scale``, ``(x - mean) / std`` per channel
(in the model's channel order), layout (``NCHW``, ``NHWC``, ``NHW`` for a model without a
channel axis), and the model input's dtype (:func:`to_model_dtype`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .imageio import IMAGE_SUFFIXES, load_image
from .manifest import RESIZE_MODES, InputSpec, Preprocessing, TensorSpec

__all__ = ["preprocess", "resize", "to_channels", "load_image", "IMAGE_SUFFIXES", "Geometry", "plan_geometry",
           "prepare_images", "to_model_dtype", "is_raw_range", "Preprocessor"]

ImageInput = np.ndarray | Sequence[np.ndarray]

# ITU-R BT.601 luma, the weights PIL's convert("L") and OpenCV's cvtColor use.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
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
    """(n_out, n_in) float32 resampling matrix for one axis; rows sum to 1 (see the module docstring)."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.zeros((n_out, n_in), dtype=np.float64)
    if mode == "area" and scale <= 1.0:
        mode = "bilinear-cv"  # OpenCV INTER_AREA enlarges bilinearly
    if mode == "nearest":
        w[np.arange(n_out), np.minimum(np.floor(centres).astype(np.int64), n_in - 1)] = 1.0
    elif mode == "bilinear-cv":
        src = np.clip(centres - 0.5, 0.0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        frac = src - lo
        hi = np.minimum(lo + 1, n_in - 1)
        rows = np.arange(n_out)
        np.add.at(w, (rows, lo), 1.0 - frac)
        np.add.at(w, (rows, hi), frac)
    elif mode == "area":  # coverage of [i * scale, (i + 1) * scale) by each input pixel
        start, end = np.arange(n_out) * scale, (np.arange(n_out) + 1) * scale
        left, right = np.arange(n_in), np.arange(n_in) + 1.0
        w = np.clip(np.minimum(end[:, None], right[None, :]) - np.maximum(start[:, None], left[None, :]), 0.0, None)
    else:  # bilinear: PIL's triangle filter, widened when shrinking (antialiasing)
        support = max(scale, 1.0)
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
    if mode not in RESIZE_MODES:
        raise InputError(f"unknown resize mode {mode!r}", hint=f"use one of {', '.join(RESIZE_MODES)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    lead = x.shape[:-2]
    if ow != w:  # one 2-d GEMM over every row of every image and channel
        x = (x.reshape(-1, w) @ _weights(w, ow, mode).T).reshape(*lead, h, ow)
    if oh != h:
        x = _weights(h, oh, mode) @ x
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class Geometry:
    """Where an image landed in the model input: ``model = image * scale + offset`` per axis.

    :meth:`to_image` maps model-input pixel coordinates (e.g. detection boxes) back to
    the original image's pixels.
    """

    image_size: tuple[int, int]  # (h, w) of the original image
    input_size: tuple[int, int]  # (H, W) of the model input
    scale: tuple[float, float]  # (sy, sx)
    offset: tuple[float, float] = (0.0, 0.0)  # (oy, ox)

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) ``x1, y1, x2, y2`` in model-input pixels -> original-image pixels."""
        b = np.asarray(boxes, dtype=np.float64).copy()
        (sy, sx), (oy, ox) = self.scale, self.offset
        b[..., 0::2] = (b[..., 0::2] - ox) / sx
        b[..., 1::2] = (b[..., 1::2] - oy) / sy
        return b


def plan_geometry(h: int, w: int, spec: Preprocessing) -> tuple[Geometry, tuple[int, int]]:
    """The geometry of one ``h x w`` image under ``spec`` and the size it is resized to."""
    H, W = spec.size  # noqa: N806 - the model's height and width
    if spec.fit == "center-crop":
        s = max(H / h, W / w) / spec.crop_fraction
        rh, rw = max(H, int(round(h * s))), max(W, int(round(w * s)))
        top, left = int(round((rh - H) / 2.0)), int(round((rw - W) / 2.0))
        return Geometry((h, w), (H, W), (rh / h, rw / w), (-float(top), -float(left))), (rh, rw)
    if spec.fit == "letterbox":
        r = min(H / h, W / w)
        nh, nw = max(1, min(H, int(math.floor(h * r + 1e-6)))), max(1, min(W, int(math.floor(w * r + 1e-6))))
        top, left = (0, 0) if spec.anchor == "top-left" else ((H - nh) // 2, (W - nw) // 2)
        return Geometry((h, w), (H, W), (r, r), (float(top), float(left))), (nh, nw)
    if spec.fit == "height":
        nw = max(1, min(W, int(math.ceil(H * w / h))))
        return Geometry((h, w), (H, W), (H / h, nw / w)), (H, nw)
    return Geometry((h, w), (H, W), (H / h, W / w)), (H, W)


def _place(x: np.ndarray, geo: Geometry, spec: Preprocessing) -> np.ndarray:
    """A resized (N, C, rh, rw) batch into the (N, C, H, W) canvas the geometry describes."""
    H, W = spec.size  # noqa: N806
    n, c, rh, rw = x.shape
    oy, ox = int(geo.offset[0]), int(geo.offset[1])
    if (rh, rw) == (H, W) and (oy, ox) == (0, 0):
        return x
    if oy <= 0 and ox <= 0 and rh + oy >= H and rw + ox >= W:  # a crop
        return np.ascontiguousarray(x[:, :, -oy:-oy + H, -ox:-ox + W])
    canvas = np.full((n, c, H, W), np.float32(spec.pad_value), np.float32)
    canvas[:, :, oy:oy + rh, ox:ox + rw] = x
    return canvas


def _convert(nhwc: np.ndarray, spec: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Channel conversion, resize and fit: (N, H, W, C) raw -> float32 (N, C_out, H, W) and its geometry."""
    x = nhwc.astype(np.float32, copy=False)
    if x.shape[3] == 4:
        x = x[..., :3]
    if spec.channels == 1 and x.shape[3] == 3:
        x = to_channels(x, 1)  # before resizing: a third of the work
    geo, resized = plan_geometry(x.shape[1], x.shape[2], spec)
    x = _place(_resize_to_nchw(x, resized, spec.resize), geo, spec)
    if spec.channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)  # after resizing: replicate the small image only
    return x, geo


def _finish(x: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Channel order, scale, normalise per channel and lay out a float32 (N, C, H, W) batch."""
    if spec.channels == 3 and spec.channel_order == "BGR":
        x = x[:, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32))[None, :, None, None]
    # (x * scale - mean) / std folded into one multiply-add.
    x = x * np.float32(spec.scale) * inv_std - mean * inv_std
    x = x.astype(np.float32, copy=False)
    if spec.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    elif spec.layout == "NHW":
        x = x[:, 0]
    return np.ascontiguousarray(x)


def prepare_images(images: ImageInput, spec: Preprocessing) -> tuple[np.ndarray, list[Geometry]]:
    """:func:`preprocess` that also returns each image's :class:`Geometry`."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given", hint="pass at least one image")
        parts, geos = [], []
        for i, img in enumerate(images):
            arr = _check_values(np.asarray(img), f"image {i}")
            x, geo = _convert(_as_hwc(arr, f"image {i}")[None], spec)
            parts.append(x)
            geos.append(geo)
        return _finish(np.concatenate(parts, axis=0), spec), geos
    arr = np.asarray(images)
    if arr.dtype == object:
        raise InputError(f"input has dtype {arr.dtype}; {_EXPECTED}", hint="pass a list of images of different sizes")
    arr = _check_values(_as_nhwc(arr), "input")
    if arr.shape[0] == 0:
        raise InputError("input batch is empty", hint="pass at least one image")
    x, geo = _convert(arr, spec)
    return _finish(x, spec), [geo] * len(arr)


def preprocess(images: ImageInput, spec: Preprocessing) -> np.ndarray:
    """Turn raw images into the model's float32 input batch.

    ``images``: one uint8 image (H, W) / (H, W, C), a batch (N, H, W) / (N, H, W, C), or a
    list of single images of any sizes; float input is accepted when it holds raw pixel
    values in [0, 255].  Returns (N, C, H, W) float32, (N, H, W, C) for an NHWC spec,
    (N, H, W) for NHW.  Raises :class:`InputError` naming the offending shape or dtype.
    :func:`to_model_dtype` then casts / quantizes it for the model's input.
    """
    return prepare_images(images, spec)[0]


class Preprocessor:
    """:func:`prepare_images` for one image at a time, the agent's per-inference path.

    An 8-bit image that is already the model's size (a camera set to it, the benchmark's
    inputs) goes in one pass into a buffer allocated once: the channel view (alpha
    dropped, BGR flipped, gray replicated, the layout's transpose) is cast straight into
    the buffer and scaled / normalised in place, with the same float32 operations in the
    same order as :func:`prepare_images`, so the values are identical bit for bit.  Any
    other image (a resize, a crop, a letterbox, a colour-to-luminance conversion, float
    pixels) takes :func:`prepare_images` itself.  Geometries are cached per image size.

    The returned array is this object's buffer on the one-pass path, overwritten by the
    next call: use it (or copy it) before calling again; one thread at a time.

    ``model_input``: the input of a model that takes integers (a quantized TFLite model);
    :meth:`feed` then gives that input for a one-pass image straight from a table of the 256
    pixel values per channel, made by the very operations of the float path and
    :func:`to_model_dtype` (which work value by value), so the feed is identical to
    ``to_model_dtype(self(image)[0], model_input, spec)`` without its float64 passes.
    """

    def __init__(self, spec: Preprocessing, *, model_input: TensorSpec | None = None) -> None:
        self.spec = spec
        (h, w), c = spec.size, spec.channels
        shape = {"NCHW": (1, c, h, w), "NHWC": (1, h, w, c), "NHW": (1, h, w)}[spec.layout]
        self._buf = np.empty(shape, np.float32)
        inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)  # as _finish computes them
        sub = np.asarray(spec.mean, dtype=np.float32) * inv_std
        per_channel = (-1, 1, 1) if spec.layout == "NCHW" else (-1,)
        scale = np.float32(spec.scale)
        self._scale: np.ndarray | np.float32 | None = None if spec.scale == 1.0 else scale
        self._mul = None if np.all(inv_std == 1.0) else inv_std.reshape(per_channel)
        self._sub = None if np.all(sub == 0.0) else sub.reshape(per_channel)
        if self._scale is not None and self._mul is not None:
            # (x * scale) * inv_std in one multiply where that is exact for every 8-bit value (digits'
            # std 0.5: always; ImageNet's: no); checked here, once, on all 256 of them
            v = np.arange(256, dtype=np.float32)[:, None]
            both = scale * inv_std
            if np.array_equal((v * scale) * inv_std, v * both):
                self._scale, self._mul = both.reshape(per_channel), None
        self._scalar_scale = np.ndim(self._scale) == 0
        self._plans: dict[tuple[int, int], tuple[Geometry, bool]] = {}
        self._per_plane = spec.layout == "NCHW" and c > 1 and h * w >= 4096
        self._plane: np.ndarray | None = np.empty((h, w), np.uint8) if self._per_plane else None  # one channel
        self._table: np.ndarray | None = None
        self._feed: np.ndarray | None = None
        if model_input is not None and np.dtype(model_input.dtype).kind in "iu":
            values = np.arange(256, dtype=np.uint8)
            real = np.empty((c, 256), np.float32)
            for i in range(c):  # (1, 256): broadcasts against the per-channel constants of any layout
                self._normalise(values[None], real[i][None], i)
            self._table = to_model_dtype(real, model_input, spec)  # (C, 256): value by value
            self._feed = np.empty(shape, self._table.dtype)

    def feed(self, image: np.ndarray) -> np.ndarray | None:
        """The integer model input for ``image`` from the table (the model's dtype, this object's buffer,
        overwritten by the next call), or None without a table or off the one-pass path."""
        table = self._table
        if table is None or image.dtype != np.uint8:
            return None
        if not self._plan(image.shape[0], image.shape[1])[1]:
            return None
        view = self._view(image)
        if view is None:
            return None
        out = self._feed[0]  # type: ignore[index]
        if self.spec.layout == "NCHW":
            for i in range(out.shape[0]):
                np.take(table[i], view[i if len(view) > 1 else 0], out=out[i], mode="clip")
        elif self.spec.layout == "NHWC":
            for i in range(out.shape[-1]):
                np.take(table[i], view[..., i if view.shape[-1] > 1 else 0], out=out[..., i], mode="clip")
        else:
            np.take(table[0], view, out=out, mode="clip")
        return self._feed

    def _plan(self, h: int, w: int) -> tuple[Geometry, bool]:
        """The geometry of an ``h x w`` image and whether it needs no resize, crop or padding."""
        got = self._plans.get((h, w))
        if got is None:
            geo, resized = plan_geometry(h, w, self.spec)
            got = (geo, resized == (h, w) == tuple(self.spec.size) and geo.offset == (0.0, 0.0))
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[(h, w)] = got
        return got

    def _view(self, image: np.ndarray) -> np.ndarray | None:
        """The uint8 image as the buffer's element layout (a view, broadcastable), or None when it needs more."""
        spec = self.spec
        gray = image.ndim == 2 or image.shape[2] == 1
        if spec.channels == 1:
            if not gray:
                return None  # luminance: prepare_images
            img = image if image.ndim == 2 else image[:, :, 0]
            return img if spec.layout == "NHW" else (img[None] if spec.layout == "NCHW" else img[:, :, None])
        if gray:
            img = image if image.ndim == 2 else image[:, :, 0]
            return img[None] if spec.layout == "NCHW" else img[:, :, None]
        img = image[:, :, :3]
        if spec.channel_order == "BGR":
            img = img[:, :, ::-1]
        return img.transpose(2, 0, 1) if spec.layout == "NCHW" else img

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """One (H, W) or (H, W, C) image, already checked for shape -> (float32 batch of 1, its geometry)."""
        geo, direct = self._plan(image.shape[0], image.shape[1])
        view = self._view(image) if direct and image.dtype == np.uint8 else None
        if view is None:
            x, geos = prepare_images([image], self.spec)
            return x, geos[0]
        out = self._buf[0]
        if self._per_plane:  # NCHW: a plane at a time, so its three passes stay in the cache
            plane = self._plane
            for c in range(out.shape[0]):
                src = view[c if len(view) > 1 else 0]
                if plane is not None and not src.flags.c_contiguous:  # an (H, W, C) frame's channel: gathered
                    np.copyto(plane, src)  # in 8 bits first, then cast from contiguous memory (~1/3 less)
                    src = plane
                self._normalise(src, out[c], c)
        else:
            self._normalise(view, out, slice(None))
        return self._buf, geo

    def _normalise(self, view: np.ndarray, out: np.ndarray, c: int | slice) -> None:
        """``out = view * scale * inv_std - mean * inv_std`` (prepare_images' float32 operations, in place)."""
        scale = self._scale
        if scale is None:
            np.copyto(out, view)
        else:
            np.multiply(view, scale if self._scalar_scale else scale[c], out=out)  # type: ignore[index]
        if self._mul is not None:
            np.multiply(out, self._mul[c], out=out)
        if self._sub is not None:
            np.subtract(out, self._sub[c], out=out)


def is_raw_range(spec: Preprocessing) -> bool:
    """True when the spec hands the model raw pixel values 0..255 (scale 1, mean 0, std 1)."""
    return spec.scale == 1.0 and all(m == 0.0 for m in spec.mean) and all(s == 1.0 for s in spec.std)


def to_model_dtype(x: np.ndarray, spec: InputSpec | TensorSpec, pre: Preprocessing | None = None) -> np.ndarray:
    """A float32 preprocessed batch -> the model input's own dtype.

    * float32 as is; float16 / float64 cast.
    * uint8 input and a raw 0..255 range: the pixel values, rounded (what the TFLite Task
      Library feeds a quantized image model: the quantization parameters are the
      model's business, e.g. SSD MobileNet's scale 1/128, zero point 128).
    * any other integer input with quantization parameters: ``round(x / scale) + zero_point``
      (half away from zero, as TFLite's reference quantizer), clipped to the dtype.
    * an integer input without them: rounded and clipped.
    """
    dt = np.dtype(spec.dtype)
    if dt == x.dtype:
        return x
    if dt.kind == "f":
        return x.astype(dt)
    if dt.kind not in "iu":
        raise InputError(f"model input {spec.name!r} has dtype {spec.dtype}, which images cannot be fed as",
                         hint="bundle it as a tensor model (--task tensor)")
    info = np.iinfo(dt)
    if spec.scale is not None and not (dt == np.uint8 and pre is not None and is_raw_range(pre)):
        r = x.astype(np.float64) / spec.scale
        q = np.sign(r) * np.floor(np.abs(r) + 0.5) + (spec.zero_point or 0)
    else:
        q = np.rint(x)
    return np.clip(q, info.min, info.max).astype(dt)
