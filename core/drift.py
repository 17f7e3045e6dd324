"""On-device drift detection: a baseline calibrated at export time, a monitor on the device.

Three answers per window of W inferences, kept apart (``shared/DRIFT.md``):

* **Did the input change?** (``input_shift``, reported) from the inputs the model saw,
  reduced per inference to a thumbnail (``core.drift_features``): per-cell KS on an 8x8
  average-pooled grid (``pixel_ks``, max D over cells) and the mean squared z of the cells'
  window means (``pixel_z``: many cells moving a little, as in a small rotation, add up),
  PSI of the intensity histogram (``pixel_psi``), and per-image summary features -- brightness, contrast, highlights (mean
  of the brightest 5 %), sharpness, gradient orientation -- tested by KS (``image_ks``) and
  by a z-test on their window means (``image_z``).  A non-image tensor model gets the same
  five tests on a fixed summary of its input tensor.
* **Is the model at risk?** (``risk``, drives the alarm) from what the model offers:
  a squared MMD of the embedding within each predicted class against that class's
  reference (``embedding_mmd``, ``drift_stats.within_class_mmd2``), the mean k-NN embedding distance normalised per
  predicted class (``embedding_knn``), a KS test of the confidence's rank within its
  predicted class's reference (``confidence_ks``), and for detection / tensor outputs KS
  and mean tests on the per-sample output summary (``output_ks``, ``output_z``).  All are
  class-conditional, so a change of the class mix alone (label shift: time of day, a
  different scene) does not raise the alarm; a model without an embedding uses its class
  probabilities in the embedding's place.  With no risk test at all (inputs only), the
  alarm follows the input score.
* **Did the class mix change?** (``class_shift``, reported, never an alarm): chi-square of
  the predicted-class counts against the class prior (small expected counts merged).

Calibration (``calibrate``, in ``drift_calibrate``) turns each test's statistic into an
empirical p-value against its bootstrapped null for that window size and combines a
group's p-values with the Cauchy combination (``-log10`` of the combined p: 2.0 = 1 %);
the thresholds are quantiles of the combined scores' own null from an independent
bootstrap, so the "input changed" flag is on in exactly ``input_budget`` (default 1 %) of
undrifted windows and the alarm, after its hysteresis, in ``alarm_rate`` (default 0.5 %).

Cost: ``update`` only copies each sample's thumbnail, probabilities, embedding and output
summary into preallocated window buffers, and ``append`` (the agent's per-inference call)
copies only the thumbnail and keeps references to the model's output rows, which the
window gathers when it closes; every statistic -- and, with ``scores_to_probs``, the
classifier's softmax -- is computed once per window, vectorised.  Memory is the window
buffers, one window's output rows and the fixed reference: nothing grows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import drift_stats as st
from .drift_baseline import (
    BASELINE_SCHEMA_VERSION,
    CLASS_TESTS,
    INPUT_TESTS,
    RISK_TESTS,
    TEST_NAMES,
    Baseline,
    _samples,
    _window_stats,
    combine,
    probs_embedding,
    tests_for,
)
from .drift_calibrate import DEFAULT_WINDOWS, calibrate, calibration_summary
from .drift_features import THUMB_SIDE, DriftFeatures, thumb_shape, thumbnail
from .drift_stats import Hysteresis, HysteresisState, flag_rate_for_alarm_rate
from .drift_threads import Stager, WindowWorker
from .errors import DataError, InputError

__all__ = ["BASELINE_SCHEMA_VERSION", "REPORT_SCHEMA_VERSION", "TEST_NAMES", "RISK_TESTS", "INPUT_TESTS",
           "CLASS_TESTS", "DEFAULT_WINDOWS", "Hysteresis", "Baseline", "DriftFeatures", "calibrate",
           "calibration_summary", "compute_baseline", "tests_for", "TestResult", "DriftReport", "DriftMonitor"]

REPORT_SCHEMA_VERSION = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestResult:
    """One statistic of one window: score, threshold at the input budget, flag, empirical p-value."""

    __test__ = False  # not a pytest class

    name: str
    score: float
    threshold: float
    flag: bool
    p_value: float | None = None


@dataclass(frozen=True)
class DriftReport:
    """The verdict on one full window of ``n`` samples.

    ``risk`` / ``input_score`` are the Cauchy-combined ``-log10 p`` of the risk and input
    tests; ``risk_flag`` when ``risk`` exceeds ``risk_threshold``; ``alarm`` is the
    hysteresis-filtered risk state.  ``input_shift`` answers "did the input change",
    ``class_shift`` "did the predicted class mix change"; neither drives the alarm.
    """

    window_index: int
    n: int
    tests: tuple[TestResult, ...]
    risk: float
    risk_threshold: float
    risk_flag: bool
    input_score: float
    input_threshold: float
    input_shift: bool
    class_shift: bool
    alarm: bool
    alarm_changed: bool
    mean_confidence: float
    mean_sample_score: float
    class_counts: tuple[int, ...] = ()
    schema_version: int = REPORT_SCHEMA_VERSION

    def test(self, name: str) -> TestResult:
        """The result of test ``name``; ``KeyError`` when this baseline does not run it."""
        for t in self.tests:
            if t.name == name:
                return t
        raise KeyError(f"{name} (this window ran {[t.name for t in self.tests]})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "tests"}
        d["class_counts"] = list(self.class_counts)
        d["tests"] = {t.name: {"score": t.score, "threshold": t.threshold, "flag": t.flag, "p_value": t.p_value}
                      for t in self.tests}
        return d


class DriftMonitor:
    """Consumes inference batches, emits a ``DriftReport`` per full window; fixed memory.

    ``window``: one of ``baseline.windows`` (None or 0: the baseline's default); any other
    size raises ``InputError`` naming the calibrated ones -- never silently another.
    ``input_budget`` / ``alarm_rate``: override the baseline's budgets (any rate the
    bootstrap resolves, >= 1 / n_boot).

    ``background`` (the agent): a full window goes to a worker thread (double buffers: the
    next one fills meanwhile), its report to ``on_report`` from there; windows close one at
    a time in order, so reports and alarm are the synchronous monitor's, only later.
    :meth:`flush` waits for them, :meth:`close` also ends the thread.

    ``scores_to_probs`` (a classifier's activation, ``Classification.probabilities``): the
    ``probs`` given to :meth:`update`, :meth:`append` and :meth:`sample_score` are the
    model's raw class scores (logits), turned into probabilities once per window (and for a
    scored sample) -- the same values a per-inference softmax gives, row for row.
    """

    def __init__(self, baseline: Baseline, *, window: int | None = None, hysteresis: Hysteresis | None = None,
                 input_budget: float | None = None, alarm_rate: float | None = None, background: bool = False,
                 on_report: Callable[[DriftReport], None] | None = None,
                 scores_to_probs: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        b = self.baseline = baseline
        self.scores_to_probs = scores_to_probs
        self.window = b.default_window if not window else int(window)
        wi = b.window_index(self.window)
        self.hysteresis = hysteresis or b.hysteresis
        self.input_budget = b.input_budget if input_budget is None else float(input_budget)
        self.alarm_rate = b.alarm_rate if alarm_rate is None else float(alarm_rate)
        for name, v in (("input_budget", self.input_budget), ("alarm_rate", self.alarm_rate)):
            if not 0.0 < v < 0.5:
                raise InputError(f"drift {name} {v} out of range", hint="use a rate in (0, 0.5), e.g. 0.01")
        self._tests = b.tests
        self._null, comb = b.null[wi], b.combined[wi]
        self._groups = None if b.class_groups is None else b.class_groups[wi]
        self._alarm_group = 1 if any(t in RISK_TESTS for t in self._tests) else 0
        p_flag = flag_rate_for_alarm_rate(self.alarm_rate, self.hysteresis)
        self.input_threshold = float(np.quantile(comb[0], 1.0 - self.input_budget))
        self.risk_threshold = float(np.quantile(comb[self._alarm_group], 1.0 - p_flag))
        self._test_thr = np.quantile(self._null, 1.0 - self.input_budget, axis=0)
        self._tails = st.null_tails(self._null)  # the p-values' tail extrapolation, per test: fixed
        n = self.window
        shapes: dict[str, tuple[int, ...]] = {}
        if b.grid_ref is not None:
            shapes["inputs"] = thumb_shape(b.input_shape)
        if b.conf_ref is not None:
            shapes["probs"] = (len(b.class_prior),)
        if "embedding" in b.kinds:
            shapes["embedding"] = (b.emb_ref.shape[1],)
        if b.out_ref is not None:
            shapes["outputs"] = (b.out_ref.shape[1],)
        self._buf = {k: np.zeros((n, *s), np.float32) for k, s in shapes.items()}
        self._want = {k: (b.input_shape if k == "inputs" else s) for k, s in shapes.items()}
        self._refs = self._new_refs()
        self._use_slots()
        self._thumb_identity = "inputs" in shapes and len(b.input_shape) == 3 and shapes["inputs"] == b.input_shape
        self._thumb_blocks = None if "inputs" not in shapes or len(b.input_shape) != 3 else tuple(
            max(1, -(-i // THUMB_SIDE)) for i in b.input_shape[1:])  # thumbnail()'s block sides
        self.on_report = on_report  # background: called with each window's report, on the worker thread
        self._worker = WindowWorker(self) if background else None
        self._stager = Stager(self._thumb_into) if background else None
        self._staged = -1  # the row whose input thumbnail stage_inputs() already wrote
        self._ref64 = None if b.emb_ref is None else np.ascontiguousarray(b.emb_ref, np.float64)
        self._ref_m2 = None if self._ref64 is None else -2.0 * self._ref64  # exact: sample_score's one GEMV
        self._score_k = 1 if self._ref64 is None else min(b.knn_k, len(self._ref64))
        self._score_embedding = "embedding" in self._buf  # else log-probabilities stand in for it
        self._fill = 0
        self._windows_done = 0
        self.last_sample_scores: np.ndarray | None = None  # not computed per inference; see score_samples()
        self._state = HysteresisState(self.hysteresis)

    def _new_refs(self) -> dict[str, list[np.ndarray | None]]:
        """A window's rows of the model's outputs, as ``append`` hands them over (None: in the buffer already)."""
        return {k: [None] * self.window for k in self._buf if k != "inputs"}

    def _use_slots(self) -> None:
        order = ("inputs", "probs", "embedding", "outputs")
        self._slots = [(order.index(k), k, tuple(self._want[k])) for k in self._buf]
        # append's: the input's buffer (its thumbnail is copied), the outputs' row lists (kept by reference)
        self._rows = [(order.index(k), self._buf[k] if k == "inputs" else self._refs[k], (1, *self._want[k]))
                      for k in self._buf]

    @property
    def alarm(self) -> bool:
        """The current alarm state."""
        return self._state.alarm

    @property
    def buffered(self) -> int:
        """Samples waiting for the current window to fill."""
        return self._fill

    @property
    def kinds(self) -> tuple[str, ...]:
        """The ``DriftFeatures`` fields this monitor needs per batch."""
        return tuple(self._buf)

    def buffer_nbytes(self) -> int:
        """Bytes held by the window buffers (constant for the monitor's lifetime)."""
        return sum(a.nbytes for a in self._buf.values())

    def score_samples(self, emb: np.ndarray) -> np.ndarray:
        """Per-sample drift score: k-NN embedding distance to the reference / its calibration median.

        ~1 for typical inputs; above ``baseline.sample_score_q99`` is rarer than 1 in 100
        undrifted images.  Stateless; ``SampleSelector`` uses it.  Zeros without an embedding.
        """
        b = self.baseline
        e = np.asarray(emb, np.float64)
        if self._ref64 is None or e.shape[-1] != self._ref64.shape[1]:
            return np.zeros(len(e))
        d2 = np.maximum(b.emb_ref_sq[None, :] - 2.0 * (e @ self._ref64.T) + np.einsum("ij,ij->i", e, e)[:, None], 0.0)
        return st.knn_distance(d2, b.knn_k) / b.sample_scale

    def update(self, features: DriftFeatures | np.ndarray, probs: np.ndarray | None = None,
               emb: np.ndarray | None = None, outputs: np.ndarray | None = None) -> list[DriftReport]:
        """Add a batch: a ``DriftFeatures``, or (inputs, probs, embedding, outputs) arrays.

        Fields the baseline was calibrated without are ignored; a missing one, or one of
        the wrong shape, raises ``InputError``.  Returns the reports of the windows this
        batch completed (usually none or one).
        """
        if isinstance(features, DriftFeatures):
            vals = (features.inputs, features.probs, features.embedding, features.outputs)
        else:
            vals = (features, probs, emb, outputs)
        arrays = []
        for slot, kind, shape in self._slots:
            a = vals[slot]
            if a is None or a.shape[1:] != shape:
                raise InputError(
                    f"drift monitor got {kind} {None if a is None else np.shape(a)}; expected (N, "
                    f"{', '.join(map(str, shape))}); this baseline needs {list(self._want)}",
                    hint="feed the same model outputs the baseline was calibrated with (core.drift_features)")
            arrays.append((kind, thumbnail(a) if slot == 0 and not self._thumb_identity else a))
        total = len(arrays[0][1])
        if any(len(a) != total for _, a in arrays):
            raise InputError(f"drift features have different batch sizes {[len(a) for _, a in arrays]}",
                             hint="pass aligned arrays")
        reports, start = [], 0
        while start < total:  # the buffers are looked up per window: a background monitor swaps them
            take = min(self.window - self._fill, total - start)
            end = self._fill + take
            for kind, a in arrays:
                self._buf[kind][self._fill:end] = a[start:start + take]  # copied: the caller may reuse ``a``
                refs = self._refs.get(kind)
                if refs is not None:
                    refs[self._fill:end] = [None] * take
            self._fill = end
            start += take
            if self._fill == self.window:
                reports.extend(self._window_full())
        return reports

    def append(self, inputs: np.ndarray | None, probs: np.ndarray | None = None, embedding: np.ndarray | None = None,
               outputs: np.ndarray | None = None) -> list[DriftReport]:
        """:meth:`update` for one sample (each array with a batch axis of 1), the per-inference call.

        Copies the sample's input thumbnail into the window's next row and keeps a reference
        to each of ``probs``, ``embedding`` and ``outputs`` -- nothing else happens per
        inference; the window gathers the rows when it closes.  So pass arrays nobody writes
        afterwards (the agent's are the runtime's fresh outputs).  Closes the window when it
        is full (returning its report, or handing it to the worker with ``background``).
        Raises ``InputError`` as :meth:`update` does for a missing or misshapen field.
        """
        vals = (inputs, probs, embedding, outputs)
        i = self._fill
        staged, self._staged = self._staged == i, -1
        if self._stager is not None:
            self._stager.wait()  # the staged thumbnail is written (at once, unless the model was quicker)
        for slot, dest, shape in self._rows:
            a = vals[slot]
            if staged and not slot:
                continue
            if a is None or a.shape != shape:
                return self.update(inputs, probs, embedding, outputs)  # the checks, the errors
            if slot:
                dest[i] = a
            else:
                self._thumb_into(a, dest[i])
        self._fill = i + 1
        return self._window_full() if self._fill == self.window else []

    def stage_inputs(self, inputs: np.ndarray) -> None:
        """The next sample's input thumbnail: the agent calls it between preprocessing and the runtime.

        A background monitor hands a large input (``STAGE_ASYNC_MIN`` values or more: a camera-size
        image, not a 32 x 32 digit) to its stager thread, which writes the thumbnail while the
        runtime runs the model without the GIL; a small one, or a synchronous monitor's, is
        written now, while the input is in the CPU cache.  ``inputs`` must not change until the
        next :meth:`append`, which waits for the thumbnail and keeps it; an input the baseline
        cannot take is left to :meth:`append`.
        """
        want = self._want.get("inputs")
        if want is not None and inputs is not None and inputs.shape == (1, *want):
            row = self._buf["inputs"][self._fill]
            if self._stager is not None and inputs.size >= STAGE_ASYNC_MIN:
                self._stager.post(inputs, row)
            else:
                self._thumb_into(inputs, row)
            self._staged = self._fill

    def _thumb_into(self, a: np.ndarray, row: np.ndarray) -> None:
        if self._thumb_identity:
            row[...] = a[0]
        elif self._thumb_blocks is not None:
            _block_mean(a[0], *self._thumb_blocks, out=row)
        else:
            row[...] = thumbnail(a)[0]

    def sample_score(self, probs: np.ndarray | None, embedding: np.ndarray | None) -> float | None:
        """One sample's drift score (:meth:`score_samples`) from what the window stores: its embedding,
        or for a baseline without one the log-probabilities that stand in for it; None without either."""
        if self._score_embedding:
            if embedding is None:
                return None
            e = embedding.reshape(-1).astype(np.float64)
        elif probs is None:
            return None
        else:
            if self.scores_to_probs is not None:
                probs = self.scores_to_probs(probs)
            e = probs_embedding(probs).reshape(-1)
        ref_m2 = self._ref_m2
        if ref_m2 is None or e.shape[0] != ref_m2.shape[1]:
            return 0.0
        k = self._score_k
        # ndarray.dot: the BLAS calls of ``@`` (the same bits) without matmul's dispatch, ~1 us each
        d2 = ref_m2.dot(e)
        d2 += self.baseline.emb_ref_sq  # (ref_sq - 2 ref.e) + e.e, score_samples' order; + e.e after the
        d2.partition(k - 1)  # selection: adding one number (rounded) keeps the order, so the k-th is the same
        return math.sqrt(max(float(d2[k - 1]) + float(e.dot(e)), 0.0)) / self.baseline.sample_scale

    def _window_full(self) -> list[DriftReport]:
        """The window is full: close it here (its report) or hand it to the worker (no report yet)."""
        self._fill = 0
        refs, self._refs = self._refs, self._new_refs()
        if self._worker is None:
            self._use_slots()
            return [self._close_window(self._buf, refs)]
        self._buf = self._worker.hand_over(self._buf, refs)
        self._use_slots()
        return []

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every full window has been closed and reported (background); False on timeout."""
        return True if self._worker is None else self._worker.wait_idle(timeout)

    def close(self) -> None:
        """Flush and end the background threads (a no-op for a synchronous monitor)."""
        if self._stager is not None:
            self._stager.stop()
        if self._worker is not None:
            self._worker.stop()

    @staticmethod
    def _gather(buf: dict[str, np.ndarray], refs: dict[str, list[np.ndarray | None]]) -> None:
        """Copy the output rows ``append`` kept by reference into the window's buffers."""
        for k, rows in refs.items():
            dest = buf[k]
            if all(r is not None for r in rows):
                np.concatenate(rows, axis=0, out=dest, casting="unsafe")  # type: ignore[arg-type]
            else:
                for i, r in enumerate(rows):
                    if r is not None:
                        dest[i] = r[0]

    def _close_window(self, buf: dict[str, np.ndarray], refs: dict[str, list[np.ndarray | None]] | None = None
                      ) -> DriftReport:
        b, w = self.baseline, self.window
        if refs:
            self._gather(buf, refs)
        probs = buf.get("probs")
        if probs is not None and self.scores_to_probs is not None:
            probs = self.scores_to_probs(probs)  # the window's class scores, as probabilities, row for row
        f = _samples(b, buf.get("inputs"), probs, buf.get("embedding"), buf.get("outputs"), w)
        stats = _window_stats(b, f, np.arange(w)[None, :], self._tests, self._groups)
        p = st.empirical_pvalues(stats, self._null, self._tails)
        comb = combine(self._null, stats, self._tests, p=p)[0]
        pvals = p[0]
        s = stats[0]
        tests = tuple(TestResult(name, float(s[i]), float(self._test_thr[i]), bool(s[i] > self._test_thr[i]),
                                 float(pvals[i])) for i, name in enumerate(self._tests))
        risk = float(comb[self._alarm_group])
        risk_flag = risk > self.risk_threshold
        before = self._state.alarm
        self._state.step(risk_flag)
        self._windows_done += 1
        chi = self._tests.index("class_chi2") if "class_chi2" in self._tests else None
        counts = () if probs is None else tuple(np.bincount(f.pred, minlength=probs.shape[1]).tolist())
        return DriftReport(
            window_index=self._windows_done - 1, n=w, tests=tests, risk=risk, risk_threshold=self.risk_threshold,
            risk_flag=risk_flag, input_score=float(comb[0]), input_threshold=self.input_threshold,
            input_shift=bool(comb[0] > self.input_threshold),
            class_shift=bool(chi is not None and s[chi] > self._test_thr[chi]), alarm=self._state.alarm,
            alarm_changed=self._state.alarm != before,
            mean_confidence=float(probs.max(axis=1).mean()) if probs is not None else 0.0,
            mean_sample_score=float(f.knn.mean()) if f.knn is not None else 0.0, class_counts=counts)


def _block_mean(x: np.ndarray, fh: int, fw: int, out: np.ndarray) -> None:
    """``thumbnail`` of one (C, H, W) image into ``out`` (C, h, w): block sums as fh + fw strided adds.

    The same block means as the 6-d ``mean`` in ``drift_features.thumbnail`` (to float32
    rounding: the sums are taken in another order) at a fraction of its cost: ~40 us
    instead of ~1.1 ms for a 224 x 224 RGB input.
    """
    c, th, tw = out.shape
    rows = x[:, :th * fh, :tw * fw].reshape(c, th, fh, tw * fw)
    acc = rows[:, :, 0].astype(np.float32)  # a copy: (C, h, W)
    for i in range(1, fh):
        acc += rows[:, :, i]
    cols = acc.reshape(c, th, tw, fw)
    np.copyto(out, cols[..., 0])
    for j in range(1, fw):
        out += cols[..., j]
    out /= np.float32(fh * fw)


#: inputs of at least this many values are thumbnailed on the stager thread while the model runs
STAGE_ASYNC_MIN = 1 << 15


def compute_baseline(x_ref: np.ndarray | None, probs_ref: np.ndarray | None, emb_ref: np.ndarray | None,
                     x_cal: np.ndarray | None, probs_cal: np.ndarray | None, emb_cal: np.ndarray | None, *,
                     window: int | Sequence[int] = DEFAULT_WINDOWS, **kw: Any) -> Baseline:
    """``calibrate`` from positional arrays (inputs, probs, embedding for reference and calibration)."""
    try:
        ref = DriftFeatures(inputs=x_ref, probs=probs_ref, embedding=emb_ref)
        cal = DriftFeatures(inputs=x_cal, probs=probs_cal, embedding=emb_cal)
    except InputError as exc:
        raise DataError(exc.message, hint=exc.hint) from exc
    return calibrate(ref, cal, windows=window, **kw)
