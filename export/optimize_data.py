"""Calibration and evaluation data for ``edgeloop optimize``, read through the bundle's own task.

Inputs are prepared once, exactly as the agent prepares them (``Task.prepare``: the
bundle's preprocessing for images, ``tensor_feed`` for arrays), so every variant is
calibrated and judged on what the device will feed it.

* :class:`ArrayCalibration`: calibration inputs of any rank for a model input of any
  name; ``reader()`` is an ONNX Runtime ``CalibrationDataReader`` (batch 1), which the
  static quantizer and the INT8 speed plan take.
* :class:`EvalSet`: evaluation inputs with what they should give; ``score(path)`` runs a
  variant file through the task and returns the task's metric as a fraction
  (``export.optimize_metrics``), which is what the accuracy gate (``export.gate``) calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from core.errors import ConfigError, DataError
from core.manifest import Manifest
from core.runtime import open_model
from core.tasks import Prepared, build_task

from .byom import IMAGE_SUFFIXES
from .optimize_metrics import GroundTruth, Predicted, map50, tensor_agreement, top1

__all__ = ["ArrayCalibration", "EvalSet", "input_files", "prepare_files", "classification_eval",
           "detection_eval", "agreement_eval", "EVAL_SCORE_THRESHOLD"]

#: Detections below this score are not counted in mAP (the bundle's own threshold is for serving).
EVAL_SCORE_THRESHOLD = 0.01


class _Reader(CalibrationDataReader):
    def __init__(self, arrays: np.ndarray, name: str) -> None:
        self.arrays, self.name = arrays, name
        self._it: Iterator[int] = iter(range(len(arrays)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        return None if i is None else {self.name: self.arrays[i:i + 1]}

    def rewind(self) -> None:
        self._it = iter(range(len(self.arrays)))


@dataclass(frozen=True)
class ArrayCalibration:
    """Calibration inputs (N, ...) in the model input's float dtype, for the input ``input_name``."""

    arrays: np.ndarray
    input_name: str

    def __len__(self) -> int:
        return len(self.arrays)

    def reader(self) -> CalibrationDataReader:
        return _Reader(self.arrays, self.input_name)


def input_files(folder: Path, what: str, flag: str) -> list[Path]:
    """Every image / ``.npy`` under ``folder`` (recursively, sorted)."""
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a directory", hint=f"point {flag} at a folder of {what}",
                        path=str(folder))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{flag} {folder}: no inputs ({', '.join(IMAGE_SUFFIXES)})",
                        hint=f"put {what} there", path=str(folder))
    return files


def prepare_files(task: Any, files: Sequence[Path]) -> list[Prepared]:
    """Each file loaded (``core.imageio.load_input``) and prepared as the agent would."""
    from core.imageio import load_input

    return [task.prepare(load_input(f)) for f in files]


def _results(path: Path, manifest: Manifest, items: Sequence[Prepared]) -> tuple[list[Any], list[dict[str, np.ndarray]]]:
    backend = open_model(path)
    try:
        task = build_task(manifest, backend)
        outs = [task.run(p) for p in items]
        return [task.decode(o, p) for o, p in zip(outs, items, strict=True)], outs
    finally:
        backend.close()


@dataclass
class EvalSet:
    """Evaluation inputs and what they should give; :meth:`score` is the gate's metric of a variant file.

    ``kind``: ``top1`` (``labels``: class indices), ``map50`` (``truths``) or
    ``agreement`` (cosine against ``reference`` outputs).  ``details`` keeps the
    secondary figures of the last scored file (min cosine, max |delta|).
    """

    kind: str
    manifest: Manifest
    items: list[Prepared]
    description: str
    labels: list[int] = field(default_factory=list)
    truths: list[GroundTruth] = field(default_factory=list)
    reference: list[np.ndarray] = field(default_factory=list)
    details: dict[str, dict[str, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def score(self, path: Path) -> float:
        results, outs = _results(Path(path), self.manifest, self.items)
        if self.kind == "top1":
            return top1([r.index for r in results], self.labels)
        if self.kind == "map50":
            return map50([_predicted(r) for r in results], self.truths)
        flat = [np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in o.values()]) for o in outs]
        mean_cos, min_cos, delta = tensor_agreement(flat, self.reference)
        self.details[str(path)] = {"mean_cosine": mean_cos, "min_cosine": min_cos, "max_abs_delta": delta}
        return mean_cos


def _predicted(result: Any) -> Predicted:
    d = result.detections
    return Predicted(np.asarray([x.box for x in d], np.float64).reshape(-1, 4),
                     np.asarray([x.index for x in d], np.int64), np.asarray([x.score for x in d], np.float64))


def _eval_manifest(manifest: Manifest) -> Manifest:
    """Detectors are evaluated down to :data:`EVAL_SCORE_THRESHOLD` (mAP needs the low-score tail)."""
    if manifest.task.kind != "detection":
        return manifest
    import dataclasses

    opts = {**manifest.task.options, "score_threshold": min(EVAL_SCORE_THRESHOLD,
                                                            float(manifest.task.options.get("score_threshold", 1)))}
    return dataclasses.replace(manifest, task=dataclasses.replace(manifest.task, options=opts))


def classification_eval(task: Any, manifest: Manifest, folder: Path) -> EvalSet:
    """Top-1 on ``folder/<label>/*``: each sub-folder is named by a label (or a class index)."""
    if not folder.is_dir():
        raise DataError(f"--eval {folder} is not a directory", hint="give a folder with one sub-folder per class")
    names = list(manifest.labels)
    items: list[Prepared] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name in names:
            k = names.index(sub.name)
        elif sub.name.isdigit() and int(sub.name) < len(names):
            k = int(sub.name)
        else:
            raise DataError(f"--eval {folder}: sub-folder {sub.name!r} is not a label of the model ({names[:10]}...)",
                            hint="name each sub-folder after its class label (or index)", path=str(sub))
        files = input_files(sub, "images of that class", "--eval")
        items += prepare_files(task, files)
        labels += [k] * len(files)
    if not items:
        raise DataError(f"--eval {folder} has no class sub-folders", hint="one sub-folder per class label")
    return EvalSet("top1", manifest, items, f"top-1 on {len(items)} labelled inputs in {folder}", labels=labels)


def detection_eval(task: Any, manifest: Manifest, folder: Path, annotations: Path) -> EvalSet:
    """mAP@0.5 on the images of a COCO annotation file (categories matched to labels by name)."""
    try:
        coco = json.loads(Path(annotations).read_text())
        images, anns, cats = coco["images"], coco.get("annotations", []), coco["categories"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--eval-annotations {annotations}: not a COCO annotation file ({exc})",
                        hint="give a JSON file with images, annotations and categories", path=str(annotations)) from exc
    names = list(manifest.labels)
    cat_index: dict[int, int] = {}
    for c in cats:
        if c["name"] not in names:
            raise DataError(f"--eval-annotations: category {c['name']!r} is not a label of the model",
                            hint="name the categories as in --labels", path=str(annotations))
        cat_index[int(c["id"])] = names.index(c["name"])
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        if not a.get("iscrowd", 0):  # crowd regions are ignored (not counted as objects to find)
            by_image.setdefault(int(a["image_id"]), []).append(a)
    files, truths = [], []
    for img in images:
        f = Path(folder) / img["file_name"]
        if not f.is_file():
            raise DataError(f"--eval {folder}: {img['file_name']} (in the annotations) is missing",
                            hint="point --eval at the annotated images", path=str(f))
        files.append(f)
        objs = by_image.get(int(img["id"]), [])
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in objs], np.float64).reshape(-1, 4)
        truths.append(GroundTruth(boxes, np.asarray([cat_index[int(a["category_id"])] for a in objs], np.int64)))
    if not files:
        raise DataError(f"--eval-annotations {annotations} lists no images", path=str(annotations))
    return EvalSet("map50", _eval_manifest(manifest), prepare_files(task, files),
                   f"mAP@0.5 on {len(files)} annotated images ({sum(len(t.classes) for t in truths)} objects)",
                   truths=truths)


def agreement_eval(manifest: Manifest, fp32: Path, items: list[Prepared], where: str) -> EvalSet:
    """No labels: agreement with the FP32 model's own answers on ``items``.

    Classification: top-1 against the FP32 classes; detection: mAP@0.5 against the FP32
    detections at the bundle's threshold (pseudo-labels); tensor: cosine of the outputs.
    """
    results, outs = _results(fp32, manifest, items)
    kind = manifest.task.kind
    if kind == "classification":
        return EvalSet("top1", manifest, items, f"top-1 agreement with FP32 on {len(items)} unlabelled inputs ({where})",
                       labels=[r.index for r in results])
    if kind == "detection":
        truths = [GroundTruth(p.boxes, p.classes) for p in map(_predicted, results)]
        return EvalSet("map50", _eval_manifest(manifest), items,
                       f"mAP@0.5 against the FP32 model's detections (pseudo-labels) on {len(items)} inputs ({where})",
                       truths=truths)
    ref = [np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in o.values()]) for o in outs]
    return EvalSet("agreement", manifest, items,
                   f"mean cosine vs FP32 outputs on {len(items)} inputs ({where}); max |delta| reported",
                   reference=ref)


def check_eval_kind(kind: str, args: Any) -> None:
    """Flags that do not fit the task fail before any work."""
    if getattr(args, "eval_annotations", None) is not None and kind != "detection":
        raise ConfigError(f"--eval-annotations is for detectors; this model is a {kind} model",
                          hint="drop --eval-annotations (classifiers: class sub-folders in --eval)")
