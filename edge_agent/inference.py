"""The per-inference path: task.prepare -> backend -> task.decode -> drift monitor -> sampler -> stats.

:class:`LoadedModel` is one installed slot opened for serving (manifest, runtime
backend, the bundle's task from ``core.tasks``, drift baseline); :class:`InferencePipeline`
runs it per request and feeds the drift monitor, the sample selector and the counters.
One lock serialises the pipeline: the drift window and the sampler are stateful, a device
serves batch 1, and the HTTP server's threads must not interleave half-updated windows.

The serving path does per inference only what the answer needs (docs/agent.md,
"Performance"): ``Task.prepare_serving`` preprocesses into a buffer allocated once and
hands the runtime feeds it does not check again; the drift monitor copies the sample's
thumbnail and features into its window buffers (``DriftMonitor.append``) and closes full
windows on its own thread, reporting through ``on_report`` from there.

What a prediction is depends on the bundle's task: a classifier's top class and
probabilities, a detector's boxes (original-image pixels) with labels and scores, a
tensor model's named outputs.  :class:`Prediction` carries all three shapes;
``Prediction.to_dict()`` is what ``agent predict --json``, HTTP ``/predict`` and the
MQTT results send.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.drift import Baseline, DriftMonitor, DriftReport
from core.drift_domains import DomainDriftMonitor, drift_monitor, load_domain_baselines, serving_baseline
from core.errors import BundleError, EdgeloopError, InputError
from core.manifest import Manifest, Variant
from core.runtime import Backend
from core.tasks import Detection, Task, TaskResult, build_task, softmax

from .accel import open_accelerated
from .sources.folder import FolderSource  # noqa: F401 - moved to edge_agent.sources; still importable here
from .telemetry import InferenceStats

__all__ = ["Prediction", "LoadedModel", "InferencePipeline", "FolderSource", "softmax", "read_reference", "SampleHook",
           "ReportHook"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One answer of the agent.

    ``label`` / ``index`` / ``confidence``: the top class (classification), the best
    detection (detection; "" / -1 / 0.0 without one), or empty with ``score`` in
    ``confidence`` (tensor).  ``detections`` and ``outputs`` hold the rest.
    """

    label: str
    index: int
    confidence: float
    probs: Sequence[float]  # a classifier's: core.tasks.probs.Probs, floats made when read
    latency_ms: float
    model_version: str
    variant: str
    drift_alarm: bool
    sample_score: float | None = None  # per-input drift score (~1 typical); None without a baseline or unscored
    task: str = "classification"
    detections: tuple[Detection, ...] = ()
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    score: float | None = None

    @classmethod
    def from_result(cls, r: TaskResult, *, latency_ms: float, model_version: str, variant: str, drift_alarm: bool,
                    sample_score: float | None) -> Prediction:
        return cls(label=r.label, index=r.index, confidence=r.confidence, probs=r.probs, latency_ms=latency_ms,
                   model_version=model_version, variant=variant, drift_alarm=drift_alarm, sample_score=sample_score,
                   task=r.kind, detections=r.detections, outputs=r.outputs, score=r.score)

    def to_dict(self, *, probs: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; ``probs=False`` leaves the per-class list out (result streams: size)."""
        d: dict[str, Any] = {"task": self.task, "label": self.label, "index": self.index,
                             "confidence": self.confidence,
                             "latency_ms": self.latency_ms, "model_version": self.model_version,
                             "variant": self.variant, "drift_alarm": self.drift_alarm,
                             "sample_score": self.sample_score}
        if probs:
            d["probs"] = list(self.probs)
        if self.task == "detection":
            d["detections"] = [det.to_dict() for det in self.detections]
        if self.task == "tensor":
            d["outputs"] = {k: {"shape": list(v.shape), "data": np.asarray(v).tolist()} for k, v in self.outputs.items()}
            d["score"] = self.score
        return d


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
    """An installed slot opened for serving: manifest, one variant in its runtime, its task, drift baseline."""

    def __init__(self, slot_dir: Path, variant_id: str, *, threads: int = 1, drift_window: int = 0,
                 drift: bool = True, accelerator: str = "cpu", drift_budgets: tuple[float, float] = (0.0, 0.0)) -> None:
        """``drift_window`` and ``drift_budgets`` (input, alarm) are agent.toml's ``[drift]``
        ``window``, ``input_budget`` and ``alarm_budget``; 0 keeps what the bundle calibrated."""
        self.slot_dir = Path(slot_dir)
        try:
            self.manifest = Manifest.from_dict(json.loads((self.slot_dir / "manifest.json").read_text()))
        except (OSError, ValueError) as exc:
            raise BundleError(f"slot {self.slot_dir.name} has no readable manifest: {exc}",
                              path=str(self.slot_dir)) from exc
        self.variant: Variant = self.manifest.variant(variant_id)
        self.accelerator = accelerator  # edge_agent.accel id; "cpu" is the runtime's default
        self.backend: Backend = open_accelerated(self.slot_dir / self.variant.file, self.variant, accelerator,
                                                 threads=threads)
        try:
            self.task: Task = build_task(self.manifest, self.backend)
        except EdgeloopError:
            self.backend.close()
            raise
        self.labels = self.manifest.labels
        self.spec = self.manifest.preprocessing
        self.baseline: Baseline | None = None
        self.monitor: DriftMonitor | DomainDriftMonitor | None = None
        if drift and self.manifest.baseline and (self.slot_dir / self.manifest.baseline).is_file():
            try:
                self.baseline = serving_baseline(Baseline.load(self.slot_dir / self.manifest.baseline))
            except BundleError as exc:  # e.g. an older bundle's baseline schema: serve it, without drift
                log.warning("%s %s: drift detection off: %s", self.manifest.name, self.manifest.version, exc)
            else:
                # The configured window or a clear error naming the calibrated ones, never silently another.
                # Full windows are closed on the monitor's own thread; InferencePipeline takes the reports.
                # Several drift domains (manifest.drift_domains): one verdict, alarm when no domain matches.
                input_budget, alarm_budget = drift_budgets
                self.monitor = drift_monitor(load_domain_baselines(self.slot_dir, self.manifest, self.baseline),
                                             window=drift_window or None, input_budget=input_budget or None,
                                             alarm_rate=alarm_budget or None, background=True,
                                             on_report=self._window_closed,
                                             scores_to_probs=self.task.scores_to_probs)
        self.on_report: Callable[[DriftReport], None] | None = None  # set by the pipeline serving it

    @property
    def version(self) -> str:
        return self.manifest.version

    def predict_result(self, item: Any) -> TaskResult:
        """The task's answer for one input, without drift, sampling or counters (tests, tools)."""
        return self.task.predict(item)

    def _window_closed(self, report: DriftReport) -> None:
        if self.on_report is not None:
            self.on_report(report)

    def flush_drift(self, timeout: float | None = None) -> bool:
        """Wait until the drift windows filled so far have been closed and reported."""
        return True if self.monitor is None else self.monitor.flush(timeout)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()  # the last full window is still reported
        self.backend.close()


SampleHook = Callable[[np.ndarray, Prediction, dict[str, float]], None]
ReportHook = Callable[[DriftReport, "LoadedModel"], None]


class InferencePipeline:
    """Runs predictions on the current :class:`LoadedModel`; swappable while serving."""

    def __init__(self, model: LoadedModel | None, *, stats: InferenceStats, strict_size: bool = False,
                 on_report: ReportHook | None = None, on_sample: SampleHook | None = None,
                 score_interval_s: float = 0.0) -> None:
        """``score_interval_s``: give an input its drift score (``Prediction.sample_score``, what the
        sampler's drift captures read) at most once per this many seconds; 0 scores every input.
        agent.toml's ``[sampling] score_rate`` sets it; the drift windows score every input anyway."""
        self._model = model
        self.score_interval_s = float(score_interval_s)
        self._next_score = 0.0
        self.stats = stats
        self.strict_size = strict_size
        self.on_report = on_report
        self.on_sample = on_sample
        self._lock = threading.Lock()
        self.last_report: DriftReport | None = None
        self.shadow: Any = None  # edge_agent.shadow.ShadowRunner while a candidate is shadowed
        self._attach(model)

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` from the next request on; returns the old one (the caller closes it)."""
        with self._lock:
            old, self._model = self._model, model
            self.last_report = None
            self._attach(model)
        return old

    def _attach(self, model: LoadedModel | None) -> None:
        """Route the model's drift reports (closed on the monitor's thread) to ``last_report`` and ``on_report``."""
        if model is not None:
            model.on_report = lambda rep, m=model: self._reported(rep, m)

    def _reported(self, rep: DriftReport, model: LoadedModel) -> None:
        if self._model is model:
            self.last_report = rep
        if self.on_report is not None:
            self._safe(self.on_report, rep, model)

    def _check_size(self, image: Any, model: LoadedModel) -> None:
        spec = model.spec
        if self.strict_size and spec is not None and model.task.takes_images:
            arr = np.asarray(image)
            if arr.ndim >= 2 and tuple(arr.shape[:2]) != tuple(spec.size):
                raise InputError(f"image is {arr.shape[0]}x{arr.shape[1]}; this model takes {spec.size[0]}x{spec.size[1]}",
                                 hint="resize on the camera side or set [model].strict_size = false")

    def predict(self, image: Any) -> Prediction:
        """One input (an image, or an array for a tensor model) -> :class:`Prediction`.

        :class:`InputError` leaves the pipeline serving.
        """
        model = self._model
        if model is None:
            raise EdgeloopError("no model is installed", hint="install a bundle with `edgeloop agent install BUNDLE`")
        try:
            if self.strict_size:
                self._check_size(image, model)
            with self._lock:  # prepare_serving's buffer is the task's: one input at a time
                model = self._model if self._model is not None else model
                t0 = time.perf_counter()
                task = model.task
                prepared = task.prepare_serving(image)
                monitor = model.monitor
                if monitor is not None:  # the input's drift thumbnail while the input is in the cache
                    t1 = time.perf_counter()
                    monitor.stage_inputs(task.drift_input(prepared))
                    t0 += time.perf_counter() - t1  # not the model path's time
                outputs = task.run(prepared)
                result = task.decode(outputs, prepared)
                latency_ms = (time.perf_counter() - t0) * 1000.0
                reports: list[DriftReport] = []
                score: float | None = None
                if monitor is not None:
                    reports, score = self._drift(model, task.drift_arrays(prepared, outputs, result), self._score_due())
                    alarm = monitor.alarm
                else:
                    alarm = False
                if reports:
                    self.last_report = reports[-1]
        except InputError:
            self.stats.record_error()
            raise
        pred = Prediction(result.label, result.index, result.confidence, result.probs, round(latency_ms, 4),
                          model.version, model.variant.id, bool(alarm), score, result.kind, result.detections,
                          result.outputs, result.score)
        self.stats.record(latency_ms, pred.confidence)
        if self.shadow is not None:  # the candidate sees the same input; its answer is never served
            self._safe(self.shadow.offer, image, pred)
        for rep in reports:  # a synchronous monitor's; a background one reports through _reported
            if self.on_report is not None:
                self._safe(self.on_report, rep, model)
        if self.on_sample is not None and prepared.image is not None and pred.index >= 0:
            self._safe(self.on_sample, prepared.image, pred, {"sample_score": score if score is not None else 0.0})
        return pred

    def _score_due(self) -> bool:
        """Whether this input gets its drift score: every input, or one per ``score_interval_s``."""
        if self.score_interval_s <= 0.0:
            return True
        now = time.monotonic()
        if now < self._next_score:
            return False
        self._next_score = now + self.score_interval_s
        return True

    @staticmethod
    def _drift(model: LoadedModel, arrays: tuple[Any, ...], score: bool = True) -> tuple[list[DriftReport], float | None]:
        """Feed the monitor one sample (and score it when ``score``); a baseline this model cannot feed
        turns drift off, never fails a prediction."""
        monitor = model.monitor
        assert monitor is not None
        inputs, probs, emb, outs = arrays  # probs: a classifier's raw scores (the monitor converts them)
        if emb is None and probs is not None and "embedding" in monitor.kinds:  # old baselines: softmax as embedding
            emb = model.task.scores_to_probs(probs) if model.task.scores_to_probs is not None else probs
        try:
            reports = monitor.append(inputs, probs, emb, outs)
        except InputError as exc:
            log.error("drift detection off for %s %s: %s", model.manifest.name, model.version, exc)
            model.monitor = None
            monitor.close()
            return [], None
        return reports, monitor.sample_score(probs, emb) if score else None

    def predict_many(self, images: Sequence[Any]) -> list[Prediction]:
        return [self.predict(img) for img in images]

    @staticmethod
    def _safe(fn: Callable[..., None], *args: Any) -> None:
        # A failing side channel (outbox full, sampler bug) must never fail a prediction.
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("inference hook %s failed", getattr(fn, "__name__", fn))
