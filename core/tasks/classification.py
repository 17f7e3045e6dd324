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

import math
from typing import Any

import numpy as np

from ..errors import BundleError
from .base import Prepared, Task, TaskResult
from .probs import Probs

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


def _scores(raw: np.ndarray) -> np.ndarray:
    """A class-score output as the (N, K) float32 rows the activation and the drift monitor take."""
    return raw if raw.dtype == np.float32 and raw.ndim == 2 else np.asarray(raw, np.float32).reshape(len(raw), -1)


#: up to this many classes a single prediction's softmax is computed in Python (``_py_softmax_top``)
_PY_SOFTMAX_MAX = 32


def _py_softmax_top(scores: list[float]) -> tuple[int, float, tuple[float, ...]] | None:
    """(top index, its probability, all probabilities) of one row of logits, in float64 Python; None when
    a value is not finite (the numpy path then gives what it gives for NaN / inf)."""
    top = max(scores)
    if not math.isfinite(top) or not math.isfinite(math.fsum(scores)):
        return None
    ex = [math.exp(v - top) for v in scores]
    total = math.fsum(ex)
    return scores.index(top), 1.0 / total, tuple(v / total for v in ex)


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
        s = _scores(scores)
        if self.activation == "softmax":
            return softmax(s)
        if self.activation == "sigmoid":
            return _sigmoid(s)
        return s

    def scores_to_probs(self, scores: np.ndarray) -> np.ndarray:  # type: ignore[override]
        """The drift monitor's conversion of a window's class scores (``drift_arrays``) to probabilities."""
        return self.probabilities(scores)

    def decode(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> TaskResult:
        s = _scores(outputs[self.output])
        if len(self.labels) and s.shape[1] != len(self.labels):
            raise BundleError(f"{self.manifest.name}: the model gives {s.shape[1]} class scores but the bundle has "
                              f"{len(self.labels)} labels", hint="rebuild the bundle with one label per class")
        if self.activation == "softmax" and len(s) == 1 and s.shape[1] <= _PY_SOFTMAX_MAX:
            got = _py_softmax_top(s[0].tolist())
            if got is not None:  # a few classes: in Python (float64), ~3x cheaper than 5 numpy calls
                idx, confidence, values = got
                label = self.labels[idx] if idx < len(self.labels) else str(idx)
                return TaskResult(self.kind, label=label, index=idx, confidence=confidence, probs=Probs(values),
                                  scores=s)
        if self.activation == "softmax" and len(s) == 1 and s.flags.c_contiguous:
            # softmax()'s one-row values, of which only the top class's is needed now: e[idx] is exp(0) = 1,
            # so its probability is 1 / e.sum() (the same float32 division); the rest only when read (Probs)
            idx = int(s.argmax())
            e = s - s[0, idx]
            np.exp(e, out=e)
            total = e.sum()
            confidence, probs = float(np.float32(1.0) / total), Probs(e[0], divisor=total)
        else:
            rows = self.probabilities(s)
            idx = int(rows[0].argmax())
            confidence, probs = float(rows[0][idx]), Probs(rows[0])
        label = self.labels[idx] if idx < len(self.labels) else str(idx)
        return TaskResult(self.kind, label=label, index=idx, confidence=confidence, probs=probs,
                          scores=s if len(s) == 1 else s[:1])

    def drift_features(self, prepared: Prepared, outputs: dict[str, np.ndarray], result: TaskResult) -> Any:
        from ..drift_features import DriftFeatures

        x, scores, emb, _ = self.drift_arrays(prepared, outputs, result)
        return DriftFeatures(x, None if scores is None else self.probabilities(scores), emb)

    def drift_arrays(self, prepared: Prepared, outputs: dict[str, np.ndarray],
                     result: TaskResult) -> tuple[np.ndarray | None, ...]:
        """The input, the raw (1, K) class scores (the monitor applies :meth:`scores_to_probs` per window),
        the embedding."""
        emb = None
        if self.embedding is not None:
            emb = outputs[self.embedding]
            if emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != 1:
                emb = np.asarray(emb, np.float32).reshape(1, -1)
        scores = result.scores if result.scores is not None else _scores(outputs[self.output])[:1]
        return self.drift_input(prepared), scores, emb, None
