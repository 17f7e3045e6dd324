"""Classification metrics from logits, so every exported variant is judged by the same code.

:func:`evaluate_logits` takes plain numpy arrays (PyTorch, ONNX Runtime or LiteRT
outputs alike) and returns a frozen :class:`EvalReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DataError

__all__ = ["ClassMetrics", "EvalReport", "evaluate_logits", "softmax", "save_confusion_png"]


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, one-vs-rest ROC-AUC.

    ``confusion[i][j]`` counts samples of true class ``i`` predicted as ``j``.
    ``roc_auc`` is ``None`` when it is undefined (a class absent from ``y``).
    """

    accuracy: float
    macro_f1: float
    roc_auc: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]
    n: int
    loss: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_class"] = {c.label: {k: v for k, v in asdict(c).items() if k != "label"} for c in self.per_class}
        d["confusion"] = [list(r) for r in self.confusion]
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        per = tuple(ClassMetrics(label, **m) for label, m in d["per_class"].items())
        return cls(d["accuracy"], d["macro_f1"], d["roc_auc"], per, tuple(tuple(r) for r in d["confusion"]),
                   tuple(d["labels"]), d["n"], d["loss"])

    def summary(self) -> str:
        auc = f"{self.roc_auc:.4f}" if self.roc_auc is not None else "n/a"
        return f"accuracy {self.accuracy:.4f}  macro-F1 {self.macro_f1:.4f}  ROC-AUC {auc}  (n={self.n})"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate_logits(logits: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> EvalReport:
    """Score ``logits`` (N, K) against integer targets ``y`` (N,) for classes ``labels`` (K)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    k = len(labels)
    if logits.ndim != 2 or logits.shape[1] != k or len(y) != len(logits) or len(y) == 0:
        raise DataError(f"cannot evaluate logits of shape {logits.shape} against {y.shape} targets and {k} labels",
                        hint="logits must be (N, number of labels)")
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"targets outside 0..{k - 1}")
    classes = np.arange(k)
    pred = logits.argmax(axis=1)
    probs = softmax(logits)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    present = np.unique(y)
    try:
        auc: float | None = float(roc_auc_score(y, probs, multi_class="ovr", labels=classes)) \
            if len(present) == k else None
    except ValueError:  # degenerate inputs (e.g. a constant score) leave AUC undefined
        auc = None
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    cm = confusion_matrix(y, pred, labels=classes)
    per = tuple(ClassMetrics(str(lab), float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i, lab in enumerate(labels))
    # macro-F1 over the classes that occur, so a small test set without some class is not punished for it.
    macro = float(np.mean(f[present]))
    return EvalReport(float(np.mean(pred == y)), macro, auc, per, tuple(tuple(int(v) for v in row) for row in cm),
                      tuple(str(x) for x in labels), int(len(y)), loss)


def save_confusion_png(report: EvalReport, path: Path, title: str = "") -> Path:
    """Draw the confusion matrix as a PNG (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cm = np.asarray(report.confusion)
    k = len(report.labels)
    size = min(12.0, 2.5 + 0.45 * k)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), report.labels, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {report.accuracy:.3f} (n={report.n})")
    if k <= 20:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
