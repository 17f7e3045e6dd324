"""The metrics ``edgeloop optimize`` gates variants on, one per task, in numpy.

* classification: top-1 accuracy against the class sub-folders of ``--eval``;
* detection: mAP@0.5 against a COCO-format annotation file (:func:`map50`);
* tensor: agreement with the FP32 model's outputs (:func:`tensor_agreement`: mean cosine
  similarity, the gated figure, and max |delta|) when there are no labels.

Each returns a fraction in [0, 1] so the accuracy gate's "percentage points below the
FP32 reference" means the same for every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.tasks import box_iou

__all__ = ["GroundTruth", "Predicted", "average_precision", "map50", "tensor_agreement", "top1"]


@dataclass(frozen=True)
class GroundTruth:
    """The annotated objects of one image: boxes ``x1, y1, x2, y2`` in image pixels and class indices."""

    boxes: np.ndarray  # (K, 4)
    classes: np.ndarray  # (K,) int


@dataclass(frozen=True)
class Predicted:
    """A detector's answer for one image: boxes in image pixels, class indices and scores."""

    boxes: np.ndarray  # (M, 4)
    classes: np.ndarray  # (M,) int
    scores: np.ndarray  # (M,)


def top1(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of ``predicted`` class indices equal to ``labels``."""
    p, y = np.asarray(predicted), np.asarray(labels)
    return float(np.mean(p == y)) if len(y) else 0.0


def average_precision(scores: np.ndarray, matched: np.ndarray, n_truth: int) -> float:
    """COCO's 101-point interpolated AP of one class.

    ``scores`` / ``matched`` (bool) are every detection of the class over all images;
    precision is made monotone (the envelope from the right) and sampled at recall
    0, 0.01, ..., 1 (``pycocotools`` ``COCOeval.accumulate``).
    """
    if n_truth == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tp = np.cumsum(np.asarray(matched, bool)[order])
    fp = np.cumsum(~np.asarray(matched, bool)[order])
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    sampled = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(np.mean(sampled))


def map50(predictions: Sequence[Predicted], truths: Sequence[GroundTruth], *, iou: float = 0.5) -> float:
    """mean AP at IoU ``iou`` over the classes that have ground truth (COCO's AP50).

    Per class, detections are taken best score first over all images; each one matches
    the unmatched ground-truth box of its image with the highest IoU >= ``iou`` (a
    ground-truth box matches once); AP is :func:`average_precision`.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    classes = sorted({int(c) for t in truths for c in np.asarray(t.classes).reshape(-1)})
    aps = []
    for c in classes:
        scores: list[float] = []
        matched: list[bool] = []
        n_truth = 0
        for p, t in zip(predictions, truths, strict=True):
            gt = np.asarray(t.boxes, np.float64).reshape(-1, 4)[np.asarray(t.classes).reshape(-1) == c]
            n_truth += len(gt)
            mine = np.asarray(p.classes).reshape(-1) == c
            boxes = np.asarray(p.boxes, np.float64).reshape(-1, 4)[mine]
            sc = np.asarray(p.scores, np.float64).reshape(-1)[mine]
            taken = np.zeros(len(gt), bool)
            ious = box_iou(boxes, gt) if len(gt) and len(boxes) else np.zeros((len(boxes), len(gt)))
            for i in np.argsort(-sc, kind="mergesort"):
                cand = np.where(taken, -1.0, ious[i]) if len(gt) else np.zeros(0)
                j = int(np.argmax(cand)) if len(cand) else -1
                hit = j >= 0 and cand[j] >= iou
                if hit:
                    taken[j] = True
                scores.append(float(sc[i]))
                matched.append(bool(hit))
        aps.append(average_precision(np.asarray(scores), np.asarray(matched, bool), n_truth))
    return float(np.mean(aps)) if aps else 0.0


def tensor_agreement(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """(mean cosine, min cosine, max |delta|) of per-sample outputs against the FP32 model's.

    Each sample's outputs are flattened (all named outputs concatenated); two all-zero
    vectors count as cosine 1.
    """
    cos, delta = [], 0.0
    for a, b in zip(outputs, reference, strict=True):
        x, y = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
        delta = max(delta, float(np.max(np.abs(x - y))) if x.size else 0.0)
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        cos.append(1.0 if nx == 0.0 and ny == 0.0 else float(np.dot(x, y) / max(nx * ny, 1e-300)))
    if not cos:
        return 0.0, 0.0, 0.0
    return float(np.mean(cos)), float(np.min(cos)), delta
