"""On-device drift detection: a baseline calibrated at export time, a monitor on the device.

Two questions, answered separately (``shared/DRIFT.md``):

* **Is the model at risk?** (``risk``, drives the alarm) from the penultimate embedding and
  the softmax: the mean normalised k-NN distance of the window's embeddings to a fixed
  reference sample (the same per-sample score the sampler uses); a squared MMD, RBF kernel
  with median-heuristic bandwidth, against that reference; and a two-sample KS test of
  max-softmax confidence.  Measured on digits (``benchmarks/drift_bench.py``): the k-NN
  statistic is by far the most sensitive of the three.  The median-heuristic bandwidth
  spans *between*-class distances, so the MMD mostly sees changes in class mix and misses
  within-class distortion (a 10 degree rotation flagged ~10% of 25-image windows against
  k-NN's 100%).  The MMD stays in the report and in the risk score: it is the test
  that sees a change in class mix.
* **Did the input change?** (``input_shift``, reported, no alarm): per-channel PSI of pixel
  intensities against the reference histogram, and per-cell KS on an 8x8 average-pooled
  grid (max D over cells), which sees rotations an intensity histogram cannot.

A chi-square test of predicted-class counts against the class prior (small expected
counts merged) is reported as ``class_shift``; a change in class mix alone is not a
failing model.

Calibration (``compute_baseline``, in ``drift_baseline``) never touches training data: the
held-out set is split into a *reference* sample (what windows are compared against,
shipped in the bundle) and a disjoint *calibration* sample from which undrifted windows
are bootstrapped per window size (two-level bootstrap, so the calibration set's own
sampling error is in the null).  Each test's threshold is its null 99th percentile; a group
score is the max of the tests' score/threshold ratios, and the alarm threshold comes from a
second, independent bootstrap, chosen (``drift_stats.flag_rate_for_alarm_rate``) so that
after the hysteresis the alarm is on in at most ``alarm_rate`` of undrifted windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import drift_stats as st
from .drift_baseline import (
    _CHI2,
    _IDX,
    _INPUT,
    _RISK,
    BASELINE_SCHEMA_VERSION,
    INPUT_TESTS,
    RISK_TESTS,
    TEST_NAMES,
    Baseline,
    _Features,
    _features,
    _normalised_max,
    _window_stats,
    compute_baseline,
)
from .drift_stats import Hysteresis, HysteresisState, flag_rate_for_alarm_rate
from .errors import InputError

__all__ = [
    "BASELINE_SCHEMA_VERSION",
    "REPORT_SCHEMA_VERSION",
    "TEST_NAMES",
    "RISK_TESTS",
    "INPUT_TESTS",
    "Hysteresis",
    "Baseline",
    "compute_baseline",
    "TestResult",
    "DriftReport",
    "DriftMonitor",
]

REPORT_SCHEMA_VERSION = 1


# ------------------------------------------------------------------------ monitor


@dataclass(frozen=True)
class TestResult:
    """One statistic of one window: score, calibrated threshold, flag, analytic p-value if any."""

    __test__ = False  # not a pytest class

    name: str
    score: float
    threshold: float
    flag: bool
    p_value: float | None = None


@dataclass(frozen=True)
class DriftReport:
    """The verdict on one full window of ``n`` samples.

    ``risk`` is the max over the risk tests of score/threshold (embedding MMD, embedding
    k-NN, confidence KS); ``risk_flag`` when it exceeds ``risk_threshold``; ``alarm`` is the
    hysteresis-filtered risk state.  ``input_shift`` answers "did the input change" from the
    pixel tests, ``class_shift`` "did the predicted class mix change"; neither drives the alarm.
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
    schema_version: int = REPORT_SCHEMA_VERSION

    def test(self, name: str) -> TestResult:
        """The result of test ``name`` (one of ``TEST_NAMES``)."""
        return self.tests[_IDX[name]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the wire form of a drift report)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "tests"}
        d["tests"] = {t.name: {"score": t.score, "threshold": t.threshold, "flag": t.flag, "p_value": t.p_value}
                      for t in self.tests}
        return d


class DriftMonitor:
    """Consumes inference batches, emits a ``DriftReport`` per full window; fixed memory.

    Keeps one window's worth of per-sample features in preallocated arrays and the
    hysteresis state (at most ``on_m`` flags); nothing grows with uptime.  The alarm
    threshold is derived from the baseline's bootstrap null so that, under ``hysteresis``,
    the alarm is on in at most ``baseline.alarm_rate`` of undrifted windows.
    """

    def __init__(self, baseline: Baseline, *, window: int | None = None, hysteresis: Hysteresis | None = None) -> None:
        self.baseline = baseline
        self.window = baseline.window if window is None else int(window)
        wi = baseline.window_index(self.window)
        self.hysteresis = hysteresis or baseline.hysteresis
        self._thr = baseline.thresholds[wi]
        self._groups = baseline.class_groups[wi]
        p_flag = flag_rate_for_alarm_rate(baseline.alarm_rate, self.hysteresis)
        self.risk_threshold = float(np.quantile(baseline.risk_null[wi], 1.0 - p_flag))
        self.input_threshold = float(np.quantile(baseline.input_null[wi], 1.0 - baseline.alarm_rate))
        c, h, w = baseline.input_shape
        d = baseline.emb_ref.shape[1]
        n = self.window
        nf = baseline.pix_ref_sorted.shape[1]
        self._buf = _Features(
            emb=np.zeros((n, d)), conf=np.zeros(n), pred=np.zeros(n, np.int64),
            conf_code=np.zeros((n, 1), np.int64), pix_code=np.zeros((n, nf), np.int64),
            hist=np.zeros((n, c, baseline.pix_ref_fraction.shape[1]), np.int64), knn=np.zeros(n), kr=np.zeros(n),
        )
        self._fill = 0
        self._windows_done = 0
        self.last_sample_scores: np.ndarray | None = None  # score_samples() of the last batch
        self._state = HysteresisState(self.hysteresis)

    @property
    def alarm(self) -> bool:
        """The current alarm state."""
        return self._state.alarm

    @property
    def buffered(self) -> int:
        """Samples waiting for the current window to fill."""
        return self._fill

    def buffer_nbytes(self) -> int:
        """Bytes held by the window buffers (constant for the monitor's lifetime)."""
        return sum(getattr(self._buf, k).nbytes for k in self._buf.__dataclass_fields__)

    def score_samples(self, emb: np.ndarray) -> np.ndarray:
        """Per-sample drift score: k-NN embedding distance to the reference / its calibration median.

        ~1 for typical inputs; above ``baseline.sample_score_q99`` is rarer than 1 in 100
        undrifted images.  Stateless; ``SampleSelector`` uses it.
        """
        b = self.baseline
        d2 = st.sq_distances(np.asarray(emb, np.float64), b.emb_ref, b_sq=b.emb_ref_sq)
        return st.knn_distance(d2, b.knn_k) / b.knn_scale

    def update(self, x: np.ndarray, probs: np.ndarray, emb: np.ndarray) -> list[DriftReport]:
        """Add a batch (preprocessed x (N,C,H,W), softmax probs (N,K), embeddings (N,D)).

        Returns the reports of the windows this batch completed (usually none or one).
        """
        x = np.asarray(x, dtype=np.float32)
        b = self.baseline
        if (x.ndim != 4 or x.shape[1:] != b.input_shape or np.ndim(probs) != 2 or np.ndim(emb) != 2
                or np.shape(probs)[1] != b.class_prior.shape[0] or np.shape(emb)[1] != b.emb_ref.shape[1]
                or not len(x) == len(probs) == len(emb)):
            raise InputError(
                f"drift monitor got x {x.shape}, probs {np.shape(probs)}, emb {np.shape(emb)}; expected "
                f"(N,{','.join(map(str, b.input_shape))}), (N,{b.class_prior.shape[0]}), (N,{b.emb_ref.shape[1]})",
                hint="feed the preprocessed batch with the same model's softmax and embedding outputs",
            )
        f = _features(b, x, probs, emb)
        # Kept so the caller can hand per-sample scores to the sampler without recomputing them.
        self.last_sample_scores = f.knn
        reports = []
        start = 0
        while start < len(x):
            take = min(self.window - self._fill, len(x) - start)
            for k in self._buf.__dataclass_fields__:
                getattr(self._buf, k)[self._fill:self._fill + take] = getattr(f, k)[start:start + take]
            self._fill += take
            start += take
            if self._fill == self.window:
                reports.append(self._close_window())
                self._fill = 0
        return reports

    def _close_window(self) -> DriftReport:
        b = self.baseline
        stats = _window_stats(b, self._buf, np.arange(self.window)[None, :], self._groups)
        risk = float(_normalised_max(stats, self._thr, _RISK)[0])
        inp = float(_normalised_max(stats, self._thr, _INPUT)[0])
        s = stats[0]
        pvals: dict[str, float] = {
            "confidence_ks": st.ks_pvalue(s[_IDX["confidence_ks"]], self.window, len(b.conf_ref_sorted)),
            "class_chi2": st.chi2_sf(s[_CHI2], int(self._groups.max())),
        }
        tests = tuple(
            TestResult(n, float(s[i]), float(self._thr[i]), bool(s[i] > self._thr[i]), pvals.get(n))
            for i, n in enumerate(TEST_NAMES)
        )
        risk_flag = risk > self.risk_threshold
        before = self._state.alarm
        self._state.step(risk_flag)
        self._windows_done += 1
        return DriftReport(
            window_index=self._windows_done - 1, n=self.window, tests=tests, risk=risk,
            risk_threshold=self.risk_threshold, risk_flag=risk_flag, input_score=inp,
            input_threshold=self.input_threshold, input_shift=inp > self.input_threshold,
            class_shift=bool(s[_CHI2] > self._thr[_CHI2]), alarm=self._state.alarm,
            alarm_changed=self._state.alarm != before, mean_confidence=float(self._buf.conf.mean()),
            mean_sample_score=float(self._buf.knn.mean()),
        )
