"""Classification: one score per class, from logits or from probabilities.

Options (``TaskSpec.options``, all optional):

``output``      name of the class-score output (default: the output whose ``meaning`` is
                ``logits`` / ``probabilities``, else ``logits``, else the first output)
``activation``  ``softmax`` (the output is logits), ``none`` (the output already holds
                probabilities: never softmax them again), ``sigmoid`` (independent scores).
                Default: from the output's ``meaning``; ``softmax`` for old bundles.
``embedding``   name of a penultimate-feature output for drift (default: ``embedding``
                when the model has one)

Quantized outputs are dequantized first (``core.runtime``), so an int8 softmax output
with scale 1/256 and zero point -128 gives probabilities in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BundleError
from .base import Prepared, Task, TaskResult

__all__ = ["Classification", "softmax", "ACTIVATIONS"]

ACTIVATIONS = ("softmax", "none", "sigmoid")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    if logits.ndim == 2 and len(logits) == 1 and logits.dtype == np.float32 and logits.flags.c_contiguous:
        # one row (the agent's batch of 1): whole-array reductions, the same values in the same order as
        # the row-wise ones below, without their keepdims bookkeeping (3 us of ~10 per call)
        e = logits - logits.max()
        np.exp(e, out=e)
        e /= e.sum()
        return e
    e = logits - logits.max(axis=-1, keepdims=True)
    if e.dtype.kind != "f":
        e = e.astype(np.float64)  # what np.exp gives integers
    np.exp(e, out=e)  # in place: the same values, two arrays fewer per call
    e /= e.sum(axis=-1, keepdims=True)
    return e if e.dtype == np.float32 else e.astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


class Classification(Task):
    kind = "classification"

    def __init__(self, manifest: Any, backend: Any) -> None:
        super().__init__(manifest, backend)
        names = [o.name for o in backend.outputs]
        declared = manifest.outputs.tensors
        meaning = {t.name: t.meaning for t in declared}
        out = self.options.get("output")
        if out is None:
            out = next((n for n in names if meaning.get(n) in ("logits", "probabilities")), None)
        if out is None:
            out = manifest.outputs.logits if manifest.outputs.logits in names else names[0]
        if out not in names:
            raise BundleError(f"{manifest.name}: the classifier output {out!r} is not among the model's outputs "
                              f"{names}", hint="rebuild the bundle with --output NAME")
        self.output = out
        act = self.options.get("activation")
        if act is None:
            act = "none" if meaning.get(out) == "probabilities" else "softmax"
        if act not in ACTIVATIONS:
            raise BundleError(f"{manifest.name}: unknown classifier activation {act!r}",
                              hint=f"use one of {', '.join(ACTIVATIONS)}")
        self.activation = act
        emb = self.options.get("embedding")
        if emb is None and not declared:  # old bundles: the second output is the embedding
            rest = [n for n in names if n != out]
            emb = "embedding" if "embedding" in names else (rest[0] if rest else None)
        elif emb is None:
            emb = next((t.name for t in declared if t.meaning == "embedding"), None)
        self.embedding = emb if emb in names else None

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        s = scores if scores.dtype == np.float32 and scores.ndim == 2 else \
            np.asarray(scores, np.float32).reshape(len(scores), -1)
        if self.activation == "softmax":
            return softmax(s)
        if self.activation == "sigmoid":
            return _sigmoid(s)
        return s

    def decode(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> TaskResult:
        rows = self.probabilities(outputs[self.output])
        probs = rows[0]
        if len(self.labels) and probs.shape[0] != len(self.labels):
            raise BundleError(f"{self.manifest.name}: the model gives {probs.shape[0]} class scores but the bundle has "
                              f"{len(self.labels)} labels", hint="rebuild the bundle with one label per class")
        idx = int(probs.argmax())
        label = self.labels[idx] if idx < len(self.labels) else str(idx)
        values = probs.tolist()  # 4.7x faster than float() per class (1000: 636 -> 135 us loaded); the same floats
        return TaskResult(self.kind, label=label, index=idx, confidence=values[idx], probs=tuple(values),
                          probs_array=rows if len(rows) == 1 else rows[:1])

    def drift_features(self, prepared: Prepared, outputs: dict[str, np.ndarray], result: TaskResult) -> Any:
        from ..drift_features import DriftFeatures

        return DriftFeatures(*self.drift_arrays(prepared, outputs, result)[:3])

    def drift_arrays(self, prepared: Prepared, outputs: dict[str, np.ndarray],
                     result: TaskResult) -> tuple[np.ndarray | None, ...]:
        emb = None
        if self.embedding is not None:
            emb = outputs[self.embedding]
            if emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != 1:
                emb = np.asarray(emb, np.float32).reshape(1, -1)
        probs = result.probs_array if result.probs_array is not None else np.asarray([result.probs], np.float32)
        return self.drift_input(prepared), probs, emb, None
