"""What a model offers the drift detector: the ``DriftFeatures`` interface, for every task.

The inference layer fills one :class:`DriftFeatures` per batch with whatever the model
gives, and hands it to ``DriftMonitor.update``; ``core.drift.calibrate`` builds the
baseline from the same kind of object on held-out data.  Every field is optional except
that at least one must be present; the baseline records which were there at calibration
and the monitor refuses a batch that lacks one of them (``InputError``), so a bundle can
never carry a baseline its agent will not use.

========== ============================================ =====================================
field      shape                                         fill it from
========== ============================================ =====================================
inputs     (N, C, H, W) float images as the model sees   the preprocessed batch (images), or
           them, or (N, ...) any-rank tensors            the model's input tensor (tensor task)
probs      (N, K) class probabilities                   classification (softmax of logits, or
                                                         the model's own probability output)
embedding  (N, D) penultimate features                  a model with an embedding output
outputs    (N, F) per-sample numeric summary of the     detection: :func:`detection_summary`;
           task's outputs                                tensor: :func:`tensor_summary`
========== ============================================ =====================================

Which tests run follows from the fields (``core.drift`` has the list): ``inputs`` give the
"did the input change" tests; ``embedding`` (or, without one, ``probs`` used as the
embedding), the ``probs`` confidence and the ``outputs`` give the "is the model at risk"
tests; ``probs`` also give the class-mix signal.  A model without an embedding still gets
drift detection from its inputs and outputs.

Per inference the monitor only copies a *thumbnail* of each input into its window
buffer (:func:`thumbnail`: an integer-factor block mean down to at most
``THUMB_SIDE`` pixels a side for images; a fixed-length summary for other tensors), so
the per-inference cost does not grow with the image size; everything else is computed
once per window, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["DriftFeatures", "THUMB_SIDE", "image_stats", "input_blocks", "IMAGE_STATS", "TANGENTS", "tangent_directions", "TENSOR_SUMMARY", "thumbnail", "thumb_shape", "detection_summary",
           "tensor_summary", "DETECTION_SUMMARY_COLUMNS"]

THUMB_SIDE = 32  # images larger than this are block-averaged down to at most this many pixels a side
TENSOR_SUMMARY = 20  # non-image inputs: mean, sd, min, max and 16 chunk means per sample
_CHUNKS = TENSOR_SUMMARY - 4


@dataclass(frozen=True, eq=False)
class DriftFeatures:
    """One batch of what the model offers the drift detector (see the module docstring).

    ``n`` is the batch size; every field given must have it as its first dimension.
    """

    inputs: np.ndarray | None = None
    probs: np.ndarray | None = None
    embedding: np.ndarray | None = None
    outputs: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self.fields().items()}
        if not sizes:
            raise InputError("drift features are empty",
                             hint="give at least one of inputs, probs, embedding, outputs")
        if len(set(sizes.values())) != 1:
            raise InputError(f"drift features have different batch sizes {sizes}", hint="pass aligned arrays")
        for k in ("probs", "embedding", "outputs"):
            v = getattr(self, k)
            if v is not None and np.ndim(v) != 2:
                raise InputError(f"drift features: {k} must be (N, F), got shape {np.shape(v)}",
                                 hint="flatten per-sample outputs to one row per sample")

    def fields(self) -> dict[str, np.ndarray]:
        """The fields that are present, by name."""
        return {k: v for k in ("inputs", "probs", "embedding", "outputs") if (v := getattr(self, k)) is not None}

    @property
    def n(self) -> int:
        return len(next(iter(self.fields().values())))

    @property
    def kinds(self) -> tuple[str, ...]:
        """Names of the fields present, in a fixed order (what a baseline records)."""
        return tuple(self.fields())


# ------------------------------------------------------------------------ inputs


def thumb_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape :func:`thumbnail` produces for inputs of ``input_shape`` (no batch axis)."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        fh, fw = max(1, -(-h // THUMB_SIDE)), max(1, -(-w // THUMB_SIDE))
        return (c, h // fh, w // fw)
    return (TENSOR_SUMMARY,)


def thumbnail(x: np.ndarray) -> np.ndarray:
    """Per-sample input summary kept in the window buffer: (N, C, h, w) images or (N, TENSOR_SUMMARY).

    Images (4-d, NCHW) larger than ``THUMB_SIDE`` are block-averaged by an integer factor
    (edge rows/columns that do not fill a block are dropped); others pass unchanged.
    Any other rank becomes :func:`tensor_summary` of the flattened sample.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        n, c, h, w = x.shape
        fh, fw = max(1, -(-h // THUMB_SIDE)), max(1, -(-w // THUMB_SIDE))
        if fh == fw == 1:
            return x
        th, tw = h // fh, w // fw
        return x[:, :, :th * fh, :tw * fw].reshape(n, c, th, fh, tw, fw).mean(axis=(3, 5))
    return tensor_summary(x.reshape(len(x), -1))


def tensor_summary(t: np.ndarray) -> np.ndarray:
    """Fixed-length summary of per-sample tensors (N, ...) -> (N, TENSOR_SUMMARY).

    Mean, standard deviation, min, max, then the means of 16 equal chunks of the
    flattened sample (a coarse shape of the signal; chunks repeat values when the sample
    has fewer than 16).  Use it for a tensor model's outputs too (``outputs=``).
    """
    t = np.asarray(t, dtype=np.float32).reshape(len(t), -1)
    n, f = t.shape
    if f == 0:
        return np.zeros((n, TENSOR_SUMMARY), np.float32)
    edges = (np.arange(_CHUNKS) * f) // _CHUNKS
    sums = np.add.reduceat(t, edges, axis=1)
    widths = np.diff(np.r_[edges, f])
    chunks = np.where(widths > 0, sums / np.maximum(widths, 1), t[:, np.minimum(edges, f - 1)])
    return np.concatenate([t.mean(1, keepdims=True), t.std(1, keepdims=True), t.min(1, keepdims=True),
                           t.max(1, keepdims=True), chunks], axis=1).astype(np.float32)


IMAGE_STATS = ("mean", "sd", "top5", "gradient")  # per channel, then "orientation_cos", "orientation_sin"


def image_stats(t: np.ndarray) -> np.ndarray:
    """Per-image summary features of thumbnails (N, C, h, w) -> (N, 4 C + 2).

    Per channel: mean (brightness), standard deviation (contrast), mean of the brightest
    5 % of pixels (highlights: a gain change moves them even where the scene's content
    makes the mean vary a lot), mean gradient magnitude (sharpness).  Then the dominant
    orientation of the channel-mean image's gradient structure tensor as
    ``((Jxx - Jyy), 2 Jxy) / (Jxx + Jyy)`` (a rotation turns this vector by twice its angle).
    """
    t = np.asarray(t, dtype=np.float32)
    n, c, h, w = t.shape
    flat = t.reshape(n, c, -1)
    k = max(1, flat.shape[-1] // 20)
    # the brightest k by a full sort, not np.partition: its introselect slows down 5-10x on the many equal
    # pixels of a dark background or a clipped highlight (a window of 32x32 digits: 0.9 ms against 0.15)
    top = np.sort(flat, axis=-1)[..., -k:].mean(axis=-1)
    out = [flat.mean(axis=-1), flat.std(axis=-1), top]
    if h > 1 and w > 1:
        gx = t[:, :, :-1, 1:] - t[:, :, :-1, :-1]
        gy = t[:, :, 1:, :-1] - t[:, :, :-1, :-1]
        out.append(np.sqrt(gx * gx + gy * gy).mean(axis=(2, 3)))
        mx, my = gx.mean(axis=1), gy.mean(axis=1)
        jxx, jyy, jxy = (mx * mx).mean(axis=(1, 2)), (my * my).mean(axis=(1, 2)), (mx * my).mean(axis=(1, 2))
        den = jxx + jyy + 1e-12
        orient = np.stack([(jxx - jyy) / den, 2.0 * jxy / den], axis=1)
    else:
        out.append(np.zeros((n, c), np.float32))
        orient = np.zeros((n, 2), np.float32)
    return np.concatenate([*out, orient], axis=1).astype(np.float64)


TANGENTS = ("rotation", "shift_x", "shift_y")


def tangent_directions(templates: np.ndarray) -> np.ndarray:
    """Tangents of class template thumbnails (K, C, h, w) under small camera motions -> (K, 3, C h w).

    The derivative of the template image with respect to a rotation about the image centre
    and a horizontal and a vertical shift, in the order of ``TANGENTS``.  Projecting an
    image's residual from its predicted class's template on them estimates by how much
    *this* image is rotated or shifted relative to its class: the class explains most of
    the variation that drowns a small tilt in class-blind statistics, so a 5 degree tilt,
    which moves a window's pixels by less than their spread, moves these estimates by about
    one standard deviation per image (digits at 32x32).  (Contrast and blur directions were
    tried too; they added nothing the image-statistics tests do not already see.)
    """
    t = np.asarray(templates, dtype=np.float64)
    k, c, h, w = t.shape
    if h < 3 or w < 3:
        return np.zeros((k, len(TANGENTS), c * h * w))
    gy, gx = np.gradient(t, axis=(2, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy - (h - 1) / 2.0, xx - (w - 1) / 2.0
    return np.stack([xx * gy - yy * gx, -gx, -gy], axis=1).reshape(k, len(TANGENTS), c * h * w)


def input_blocks(thumbs: np.ndarray, grid: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thumbnails -> (cells (N, G), stats (N, S), intensity values (N, C, P)) for the input tests.

    Images: average-pooled ``grid`` x ``grid`` cells per channel, :func:`image_stats`, the
    pixels.  Tensor summaries: the chunk means, the four moments, the chunk means as one
    channel.
    """
    from .drift_stats import pool_grid

    if thumbs.ndim == 4:
        n, c = thumbs.shape[:2]
        return pool_grid(thumbs, grid), image_stats(thumbs), thumbs.reshape(n, c, -1)
    t = np.asarray(thumbs, dtype=np.float64)
    return t[:, 4:], t[:, :4], t[:, None, 4:]


# ------------------------------------------------------------------------ outputs

DETECTION_SUMMARY_COLUMNS = ("boxes", "score_mean", "score_max", "score_min", "area_mean", "area_max", "aspect_mean")


def detection_summary(scores: list[np.ndarray] | tuple[np.ndarray, ...], boxes: list[np.ndarray] | None = None,
                      *, min_score: float = 0.0) -> np.ndarray:
    """Per-frame detection outputs -> (N, 7) rows for ``DriftFeatures.outputs``.

    ``scores[i]`` (n_i,) and ``boxes[i]`` (n_i, 4) as ``x1, y1, x2, y2`` normalised to the
    image size (or any consistent unit).  Columns (``DETECTION_SUMMARY_COLUMNS``): boxes per
    frame above ``min_score``, their mean / max / min score, mean and max box area, mean
    aspect ratio (w / h).  A frame without boxes gets zeros.
    """
    rows = np.zeros((len(scores), len(DETECTION_SUMMARY_COLUMNS)), np.float32)
    for i, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        keep = s >= min_score
        s = s[keep]
        if s.size == 0:
            continue
        rows[i, :4] = (s.size, s.mean(), s.max(), s.min())
        if boxes is not None:
            b = np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4)[keep]
            w, h = np.maximum(b[:, 2] - b[:, 0], 0.0), np.maximum(b[:, 3] - b[:, 1], 0.0)
            area = w * h
            rows[i, 4:] = (area.mean(), area.max(), float(np.mean(w / np.maximum(h, 1e-6))))
    return rows
