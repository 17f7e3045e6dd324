"""The per-inference path: preprocess -> backend -> softmax -> drift monitor -> sampler -> stats.

:class:`LoadedModel` is one installed slot opened for serving (manifest, runtime
backend, drift baseline); :class:`InferencePipeline` runs it per request and feeds the
drift monitor, the sample selector and the counters.  One lock serialises the
pipeline: the drift window and the sampler are stateful, a device serves batch 1, and
the HTTP server's threads must not interleave half-updated windows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.drift import Baseline, DriftMonitor, DriftReport
from core.errors import BundleError, EdgeloopError, InputError
from core.manifest import Manifest, Variant
from core.preprocess import preprocess
from core.runtime import Backend, open_model

from .sources.folder import FolderSource  # noqa: F401 - moved to edge_agent.sources; still importable here
from .telemetry import InferenceStats

__all__ = ["Prediction", "LoadedModel", "InferencePipeline", "FolderSource", "softmax", "read_reference", "SampleHook", "ReportHook"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One answer of the agent."""

    label: str
    index: int
    confidence: float
    probs: tuple[float, ...]
    latency_ms: float
    model_version: str
    variant: str
    drift_alarm: bool
    sample_score: float | None = None  # per-input drift score (~1 typical), None without a baseline

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "confidence": self.confidence, "probs": list(self.probs),
                "latency_ms": self.latency_ms, "model_version": self.model_version, "variant": self.variant,
                "drift_alarm": self.drift_alarm, "sample_score": self.sample_score}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def read_reference(slot_dir: Path, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """The bundle's health-check arrays (``reference.npz``), or None when the bundle has none."""
    if not manifest.health:
        return None
    p = slot_dir / manifest.health
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"corrupt health-check reference: {exc}", member=manifest.health, path=str(p)) from exc


class LoadedModel:
    """An installed slot opened for serving: manifest, one variant in its runtime, drift baseline."""

    def __init__(self, slot_dir: Path, variant_id: str, *, threads: int = 1, drift_window: int = 0,
                 drift: bool = True) -> None:
        self.slot_dir = Path(slot_dir)
        try:
            self.manifest = Manifest.from_dict(json.loads((self.slot_dir / "manifest.json").read_text()))
        except (OSError, ValueError) as exc:
            raise BundleError(f"slot {self.slot_dir.name} has no readable manifest: {exc}",
                              path=str(self.slot_dir)) from exc
        self.variant: Variant = self.manifest.variant(variant_id)
        self.backend: Backend = open_model(self.slot_dir / self.variant.file, self.variant, threads=threads)
        self.labels = self.manifest.labels
        self.spec = self.manifest.preprocessing
        self.baseline: Baseline | None = None
        self.monitor: DriftMonitor | None = None
        if drift and self.manifest.baseline and (self.slot_dir / self.manifest.baseline).is_file():
            self.baseline = Baseline.load(self.slot_dir / self.manifest.baseline)
            self.monitor = DriftMonitor(self.baseline, window=self._window(self.baseline, drift_window))

    @staticmethod
    def _window(baseline: Baseline, wanted: int) -> int:
        if wanted == 0 or wanted in baseline.windows:
            return wanted or baseline.window
        best = min(baseline.windows, key=lambda w: abs(w - wanted))
        log.warning("drift window %d is not calibrated in this bundle (%s); using %d", wanted,
                    list(baseline.windows), best)
        return best

    @property
    def version(self) -> str:
        return self.manifest.version

    def close(self) -> None:
        self.backend.close()


SampleHook = Callable[[np.ndarray, Prediction, dict[str, float]], None]
ReportHook = Callable[[DriftReport, "LoadedModel"], None]


class InferencePipeline:
    """Runs predictions on the current :class:`LoadedModel`; swappable while serving."""

    def __init__(self, model: LoadedModel | None, *, stats: InferenceStats, strict_size: bool = False,
                 on_report: ReportHook | None = None, on_sample: SampleHook | None = None) -> None:
        self._model = model
        self.stats = stats
        self.strict_size = strict_size
        self.on_report = on_report
        self.on_sample = on_sample
        self._lock = threading.Lock()
        self.last_report: DriftReport | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` from the next request on; returns the old one (the caller closes it)."""
        with self._lock:
            old, self._model = self._model, model
            self.last_report = None
        return old

    def _check(self, image: Any, spec_size: tuple[int, int]) -> np.ndarray:
        if isinstance(image, (bytes, str, Path)):
            raise InputError(f"predict() takes an image array, got {type(image).__name__}",
                             hint="load files with core.preprocess.load_image()")
        arr = np.asarray(image)
        if arr.dtype == object or arr.dtype.kind not in "uif":
            raise InputError(f"image has dtype {arr.dtype}; expected uint8 pixels (H, W) or (H, W, C)",
                             hint="convert the image to uint8")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or min(arr.shape[:2]) < 1:
            raise InputError(f"image has shape {tuple(arr.shape)}; expected (H, W) or (H, W, C) with C in 1, 3, 4",
                             hint="pass one image; use predict_many() for a batch")
        if self.strict_size and tuple(arr.shape[:2]) != tuple(spec_size):
            raise InputError(f"image is {arr.shape[0]}x{arr.shape[1]}; this model takes {spec_size[0]}x{spec_size[1]}",
                             hint="resize on the camera side or set [model].strict_size = false")
        return arr

    def predict(self, image: Any) -> Prediction:
        """One image -> :class:`Prediction`; :class:`InputError` leaves the pipeline serving."""
        model = self._model
        if model is None:
            raise EdgeloopError("no model is installed", hint="install a bundle with `edgeloop agent install BUNDLE`")
        try:
            arr = self._check(image, model.spec.size)
            t0 = time.perf_counter()
            x = preprocess([arr], model.spec)  # a list: one (H, W, C) image, never read as a batch
            with self._lock:
                model = self._model if self._model is not None else model
                out = model.backend.run(x)
                probs = softmax(out.logits)
                latency_ms = (time.perf_counter() - t0) * 1000.0
                reports: list[DriftReport] = []
                score: float | None = None
                if model.monitor is not None and out.embedding is not None:
                    reports = model.monitor.update(x, probs, out.embedding)
                    # update() computes the per-sample k-NN score anyway; reuse it where the monitor exposes it
                    last = getattr(model.monitor, "last_sample_scores", None)
                    score = float((last if last is not None else model.monitor.score_samples(out.embedding))[0])
                alarm = model.monitor.alarm if model.monitor is not None else False
                if reports:
                    self.last_report = reports[-1]
        except InputError:
            self.stats.record_error()
            raise
        idx = int(np.argmax(probs[0]))
        pred = Prediction(label=model.labels[idx], index=idx, confidence=float(probs[0, idx]),
                          probs=tuple(float(p) for p in probs[0]), latency_ms=round(latency_ms, 4),
                          model_version=model.version, variant=model.variant.id, drift_alarm=bool(alarm),
                          sample_score=score)
        self.stats.record(latency_ms, pred.confidence)
        for rep in reports:
            if self.on_report is not None:
                self._safe(self.on_report, rep, model)
        if self.on_sample is not None:
            self._safe(self.on_sample, arr, pred, {"sample_score": score if score is not None else 0.0})
        return pred

    def predict_many(self, images: Sequence[Any]) -> list[Prediction]:
        return [self.predict(img) for img in images]

    @staticmethod
    def _safe(fn: Callable[..., None], *args: Any) -> None:
        # A failing side channel (outbox full, sampler bug) must never fail a prediction.
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("inference hook %s failed", getattr(fn, "__name__", fn))
