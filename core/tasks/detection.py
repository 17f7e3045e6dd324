"""Object detection: boxes in original-image pixels, with labels and scores.

The decoder (``options["decoder"]``) says what the model's outputs are; each one is a
function in :data:`DECODERS` returning candidate boxes ``x1, y1, x2, y2`` in model-input
pixels with class indices and scores, and the task then applies the score threshold,
non-maximum suppression (numpy) where the model has none, the image geometry (undoing
the resize / letterbox / crop, ``core.preprocess.Geometry``) and clips to the image.

=========== ======================================================= =======================
decoder     outputs                                                  post-processing
=========== ======================================================= =======================
``ssd``     TFLite ``TFLite_Detection_PostProcess``: boxes [1,N,4]    done in the model;
            ``ymin, xmin, ymax, xmax`` normalised to the input,      boxes scaled to pixels
            classes [1,N], scores [1,N], count [1]
``yolox``   raw YOLOX head [1, A, 5+C]: ``dx, dy, log w, log h, obj,  grid decode (strides
            C class scores`` per anchor point of the stride-8/16/32  8, 16, 32), score =
            grids (obj / class already sigmoid-ed)                   obj x class, NMS
``yolov5``  [1, N, 5+C]: ``cx, cy, w, h`` in input pixels, obj,      score = obj x class,
            class scores (YOLOv5 / v7 exports)                        NMS
``yolov8``  [1, 4+C, N]: ``cx, cy, w, h`` in input pixels, class     transpose, NMS
            scores, no objectness (YOLOv8 / v11 exports)
=========== ======================================================= =======================

Other options: ``score_threshold`` (default 0.25), ``iou_threshold`` (0.45),
``max_detections`` (100), ``class_agnostic`` NMS (default true, as the YOLOX sample),
``strides`` (YOLOX, default [8, 16, 32]), ``label_offset`` (added to a class index
before looking up its label), ``sigmoid`` (apply a sigmoid to raw obj / class logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import BundleError
from .base import Detection, Prepared, Task, TaskResult

__all__ = ["DetectionTask", "DECODERS", "nms", "box_iou"]

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (M, 4) xyxy input px, classes (M,), scores (M,)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``x1, y1, x2, y2`` boxes (M, 4) x (K, 4)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix1, iy1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    ix2, iy2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, *, classes: np.ndarray | None = None,
        max_out: int = 100) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first.

    With ``classes`` only boxes of the same class suppress each other (the usual
    offset trick: boxes of different classes are moved apart).
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, np.float64)
    if classes is not None:
        b = b + (np.asarray(classes, np.float64) * (b.max() + 1.0))[:, None]
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(b[i:i + 1], b[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, np.int64)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cxcywh(b: np.ndarray) -> np.ndarray:
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def _best_class(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cls = np.argmax(scores, axis=1)
    return cls, scores[np.arange(len(scores)), cls]


def _decode_ssd(task: DetectionTask, outs: dict[str, np.ndarray], size: tuple[int, int]) -> Candidates:
    names = task.ssd_outputs
    boxes = np.asarray(outs[names["boxes"]], np.float64).reshape(-1, 4)
    classes = np.asarray(outs[names["classes"]]).reshape(-1)
    scores = np.asarray(outs[names["scores"]], np.float64).reshape(-1)
    n = int(np.asarray(outs[names["count"]]).reshape(-1)[0]) if names.get("count") else len(scores)
    n = max(0, min(n, len(scores)))
    h, w = size
    yx = boxes[:n]
    xyxy = np.stack([yx[:, 1] * w, yx[:, 0] * h, yx[:, 3] * w, yx[:, 2] * h], 1)
    return xyxy, np.rint(classes[:n]).astype(np.int64), scores[:n]


def _decode_yolox(task: DetectionTask, outs: dict[str, np.ndarray], size: tuple[int, int]) -> Candidates:
    p = np.asarray(outs[task.raw_output], np.float64).reshape(-1, np.asarray(outs[task.raw_output]).shape[-1])
    h, w = size
    grids, strides = [], []
    for s in task.options.get("strides", (8, 16, 32)):
        gh, gw = h // int(s), w // int(s)
        gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([gx.ravel(), gy.ravel()], 1))
        strides.append(np.full(gh * gw, float(s)))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if len(grid) != len(p):
        raise BundleError(f"YOLOX output has {len(p)} anchor points, strides {task.options.get('strides', (8, 16, 32))} "
                          f"on a {h}x{w} input give {len(grid)}", hint="set the detector's strides in the bundle")
    cxcy = (p[:, :2] + grid) * stride[:, None]
    wh = np.exp(np.clip(p[:, 2:4], -50, 50)) * stride[:, None]
    obj, cls = p[:, 4], p[:, 5:]
    if task.options.get("sigmoid", False):
        obj, cls = _sig(obj), _sig(cls)
    c, s = _best_class(cls)
    return _cxcywh(np.concatenate([cxcy, wh], 1)), c, s * obj


def _decode_yolov5(task: DetectionTask, outs: dict[str, np.ndarray], size: tuple[int, int]) -> Candidates:
    p = np.asarray(outs[task.raw_output], np.float64)
    p = p.reshape(-1, p.shape[-1])
    obj, cls = p[:, 4], p[:, 5:]
    if task.options.get("sigmoid", False):
        obj, cls = _sig(obj), _sig(cls)
    c, s = _best_class(cls)
    return _cxcywh(p[:, :4]), c, s * obj


def _decode_yolov8(task: DetectionTask, outs: dict[str, np.ndarray], size: tuple[int, int]) -> Candidates:
    p = np.asarray(outs[task.raw_output], np.float64)
    p = p.reshape(p.shape[-2], p.shape[-1]).T  # [4 + C, N] -> [N, 4 + C]
    cls = p[:, 4:]
    if task.options.get("sigmoid", False):
        cls = _sig(cls)
    c, s = _best_class(cls)
    return _cxcywh(p[:, :4]), c, s


#: decoder name -> (function, whether the model already did NMS)
DECODERS: dict[str, tuple[Callable[[DetectionTask, dict[str, np.ndarray], tuple[int, int]], Candidates], bool]] = {
    "ssd": (_decode_ssd, True),
    "yolox": (_decode_yolox, False),
    "yolov5": (_decode_yolov5, False),
    "yolov8": (_decode_yolov8, False),
}


class DetectionTask(Task):
    kind = "detection"

    def __init__(self, manifest: Any, backend: Any) -> None:
        super().__init__(manifest, backend)
        if self.pre is None:
            raise BundleError(f"{manifest.name}: a detector needs image preprocessing", hint="give --size and the layout")
        decoder = self.options.get("decoder")
        if decoder not in DECODERS:
            raise BundleError(f"{manifest.name}: unknown detection decoder {decoder!r}",
                              hint=f"use one of {', '.join(DECODERS)}")
        self.decoder, self.has_nms = DECODERS[decoder]
        names = [o.name for o in backend.outputs]
        meaning = {t.name: t.meaning for t in manifest.outputs.tensors}
        self.ssd_outputs: dict[str, str] = {}
        self.raw_output = names[0]
        if decoder == "ssd":
            by_meaning = {m: n for n, m in meaning.items() if n in names and m}
            order = dict(zip(("boxes", "classes", "scores", "count"), names, strict=False))
            self.ssd_outputs = {k: by_meaning.get(k, order.get(k, "")) for k in ("boxes", "classes", "scores", "count")}
            if not all(self.ssd_outputs[k] for k in ("boxes", "classes", "scores")):
                raise BundleError(f"{manifest.name}: an SSD detector needs boxes, classes and scores outputs, the "
                                  f"model has {names}", hint="check the model or use --task tensor")
        else:
            self.raw_output = next((n for n in names if meaning.get(n) == "raw-detections"), names[0])
        self.score_threshold = float(self.options.get("score_threshold", 0.25))
        self.iou_threshold = float(self.options.get("iou_threshold", 0.45))
        self.max_detections = int(self.options.get("max_detections", 100))
        self.class_agnostic = bool(self.options.get("class_agnostic", True))
        self.label_offset = int(self.options.get("label_offset", 0))

    def _label(self, k: int) -> str:
        i = k + self.label_offset
        return self.labels[i] if 0 <= i < len(self.labels) else str(k)

    def decode(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> TaskResult:
        assert self.pre is not None and prepared.geometry is not None
        boxes, classes, scores = self.decoder(self, outputs, tuple(self.pre.size))
        keep = scores >= self.score_threshold
        boxes, classes, scores = boxes[keep], classes[keep], scores[keep]
        if not self.has_nms:
            idx = nms(boxes, scores, self.iou_threshold, classes=None if self.class_agnostic else classes,
                      max_out=self.max_detections)
        else:
            idx = np.argsort(-scores, kind="stable")[:self.max_detections]
        geo = prepared.geometry
        img = geo.to_image(boxes[idx]) if len(idx) else np.zeros((0, 4))
        h, w = geo.image_size
        img[:, 0::2] = np.clip(img[:, 0::2], 0, w)
        img[:, 1::2] = np.clip(img[:, 1::2], 0, h)
        dets = tuple(Detection(tuple(float(v) for v in b), int(c), self._label(int(c)), float(s))  # type: ignore[arg-type]
                     for b, c, s in zip(img, classes[idx], scores[idx], strict=True))
        best = dets[0] if dets else None
        return TaskResult(self.kind, label=best.label if best else "", index=best.index if best else -1,
                          confidence=best.score if best else 0.0, detections=dets)

    def drift_features(self, prepared: Prepared, outputs: dict[str, np.ndarray], result: TaskResult) -> Any:
        from ..drift_features import DriftFeatures, detection_summary

        assert prepared.geometry is not None
        h, w = prepared.geometry.image_size
        boxes = np.asarray([d.box for d in result.detections], np.float32).reshape(-1, 4) / np.float32([w, h, w, h])
        scores = np.asarray([d.score for d in result.detections], np.float32)
        return DriftFeatures(inputs=self.drift_input(prepared), outputs=detection_summary([scores], [boxes]))
