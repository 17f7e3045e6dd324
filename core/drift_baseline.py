"""The drift baseline: per-sample features, window statistics and export-time calibration.

``compute_baseline`` runs on the cloud side (numpy only) and produces a ``Baseline`` that
ships in the bundle as ``baseline.npz``; ``core.drift.DriftMonitor`` consumes it.
The feature and window-statistic functions here are used by both sides, so calibration
and monitoring compute exactly the same numbers.  See ``core.drift`` for the design.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from . import drift_stats as st
from .drift_stats import Hysteresis
from .errors import BundleError, DataError, InputError

__all__ = [
    "BASELINE_SCHEMA_VERSION",
    "TEST_NAMES",
    "RISK_TESTS",
    "INPUT_TESTS",
    "Baseline",
    "compute_baseline",
]

BASELINE_SCHEMA_VERSION = 1
TEST_NAMES = ("embedding_mmd", "embedding_knn", "confidence_ks", "pixel_psi", "pixel_ks", "class_chi2")
RISK_TESTS = ("embedding_mmd", "embedding_knn", "confidence_ks")
INPUT_TESTS = ("pixel_psi", "pixel_ks")
_IDX = {n: i for i, n in enumerate(TEST_NAMES)}
_RISK = np.array([_IDX[n] for n in RISK_TESTS])
_INPUT = np.array([_IDX[n] for n in INPUT_TESTS])
_CHI2 = _IDX["class_chi2"]
_BASELINE_HINT = "recompute it with core.drift.compute_baseline (`edgeloop export` does)"


# ----------------------------------------------------------------------- features


class _RefLike(Protocol):
    """What the feature and window-statistic code reads from a baseline."""

    emb_ref: np.ndarray
    emb_ref_sq: np.ndarray
    pix_range: np.ndarray
    grid: int
    knn_k: int
    knn_scale: float
    gamma: float
    k_rr_mean: float
    conf_ref_sorted: np.ndarray
    pix_ref_sorted: np.ndarray
    pix_ref_fraction: np.ndarray
    class_prior: np.ndarray
    conf_index: st.EcdfIndex
    pix_index: st.EcdfIndex


@dataclass(frozen=True, eq=False)
class _Features:
    """Per-sample quantities every window statistic is built from (shared by both sides)."""

    emb: np.ndarray  # (n, D) float64
    conf: np.ndarray  # (n,) max softmax
    pred: np.ndarray  # (n,) int64 argmax
    conf_code: np.ndarray  # (n, 1) position of conf in the reference (drift_stats.ecdf_codes)
    pix_code: np.ndarray  # (n, F) position of each pooled-grid mean in the reference
    hist: np.ndarray  # (n, C, B) intensity histogram counts
    knn: np.ndarray  # (n,) normalised k-NN distance to the reference
    kr: np.ndarray  # (n,) mean RBF kernel to the reference


def _features(b: _RefLike, x: np.ndarray, probs: np.ndarray, emb: np.ndarray) -> _Features:
    emb = np.asarray(emb, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    d2 = st.sq_distances(emb, b.emb_ref, b_sq=b.emb_ref_sq)
    conf = probs.max(axis=1)
    hist = np.stack(
        [st.histogram_counts(x[:, c], *b.pix_range[c], b.pix_ref_fraction.shape[1]) for c in range(x.shape[1])],
        axis=1,
    )
    return _Features(
        emb=emb,
        conf=conf,
        pred=probs.argmax(axis=1),
        conf_code=b.conf_index.codes(conf[:, None]),
        pix_code=b.pix_index.codes(st.pool_grid(x, b.grid)),
        hist=hist,
        knn=st.knn_distance(d2, b.knn_k) / b.knn_scale,
        kr=np.exp(-b.gamma * d2).mean(axis=1),
    )


def _window_stats(
    b: _RefLike, f: _Features, idx: np.ndarray, group_of: np.ndarray, *,
    pair_mask: np.ndarray | None = None, kernel: np.ndarray | None = None,
) -> np.ndarray:
    """All test statistics for B windows given as index arrays ``idx`` (B, W) into ``f`` -> (B, T).

    ``kernel``: the RBF kernel among all of ``f``'s samples, when precomputed (calibration
    gathers from it instead of recomputing every bootstrap window's W x W block).
    """
    nb, w = idx.shape
    out = np.empty((nb, len(TEST_NAMES)))
    if kernel is None:
        e = f.emb[idx]  # (B, W, D)
        sq = np.einsum("bwd,bwd->bw", e, e)
        d2 = np.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * (e @ e.transpose(0, 2, 1)), 0.0)
        k_ww = np.exp(-b.gamma * d2)
    else:
        k_ww = kernel[idx[:, :, None], idx[:, None, :]]
    out[:, _IDX["embedding_mmd"]] = st.mmd2_with_reference(
        k_ww, f.kr[idx][:, :, None], b.k_rr_mean, pair_mask=pair_mask
    )
    out[:, _IDX["embedding_knn"]] = f.knn[idx].mean(axis=1)
    m = b.conf_ref_sorted.shape[0]
    out[:, _IDX["confidence_ks"]] = st.ks_from_codes(f.conf_code[idx], m)[:, 0]
    counts = f.hist[idx].sum(axis=1)  # (B, C, bins)
    out[:, _IDX["pixel_psi"]] = st.psi(counts, b.pix_ref_fraction[None]).max(axis=1)
    out[:, _IDX["pixel_ks"]] = st.ks_from_codes(f.pix_code[idx], b.pix_ref_sorted.shape[0]).max(axis=1)
    n_groups = int(group_of.max()) + 1
    expected = np.bincount(group_of, weights=b.class_prior, minlength=n_groups) * w
    g = group_of[f.pred[idx]] + (np.arange(nb) * n_groups)[:, None]  # (B, W), one band per window
    observed = np.bincount(g.ravel(), minlength=nb * n_groups).reshape(nb, n_groups)
    out[:, _CHI2] = np.sum((observed - expected) ** 2 / expected, axis=1)
    return out


def _normalised_max(stats: np.ndarray, thr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return (stats[:, cols] / np.maximum(thr[cols], 1e-12)).max(axis=1)


# ------------------------------------------------------------------------ baseline


@dataclass(frozen=True, eq=False)
class Baseline:
    """Everything the device needs to judge a window; saved as ``baseline.npz`` in the bundle.

    Per window size ``windows[i]``: ``thresholds[i]`` (one per ``TEST_NAMES``), and the sorted
    bootstrap null of the risk and input group scores (``risk_null[i]``, ``input_null[i]``),
    from which a monitor derives its alarm threshold for any hysteresis.
    """

    windows: tuple[int, ...]
    thresholds: np.ndarray  # (n_windows, n_tests)
    risk_null: np.ndarray  # (n_windows, n_boot) sorted
    input_null: np.ndarray  # (n_windows, n_boot) sorted
    class_groups: np.ndarray  # (n_windows, K) chi-square group of each class
    emb_ref: np.ndarray
    conf_ref_sorted: np.ndarray
    pix_ref_sorted: np.ndarray
    pix_range: np.ndarray  # (C, 2): histogram range per channel (reference min, max)
    pix_ref_fraction: np.ndarray  # (C, bins)
    class_prior: np.ndarray
    input_shape: tuple[int, int, int]
    gamma: float
    k_rr_mean: float
    knn_k: int
    knn_scale: float
    sample_score_q99: float
    grid: int
    alarm_rate: float
    test_quantile: float
    hysteresis: Hysteresis
    schema_version: int = BASELINE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        def bad(what: str) -> BundleError:
            return BundleError(f"invalid drift baseline: {what}", hint=_BASELINE_HINT, member="baseline.npz")

        if self.schema_version != BASELINE_SCHEMA_VERSION:
            raise bad(f"schema_version {self.schema_version} (this agent reads {BASELINE_SCHEMA_VERSION})")
        object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        nw = len(self.windows)
        if nw == 0 or any(w < 2 for w in self.windows):
            raise bad(f"windows {self.windows}")
        if self.thresholds.shape != (nw, len(TEST_NAMES)):
            raise bad(f"thresholds shape {self.thresholds.shape}")
        if self.risk_null.shape[0] != nw or self.input_null.shape[0] != nw:
            raise bad("null distributions do not match the window sizes")
        if self.class_groups.shape != (nw, self.class_prior.shape[0]):
            raise bad("class_groups shape")
        if not 0.0 < self.alarm_rate < 0.5 or not 0.5 < self.test_quantile < 1.0:
            raise bad("alarm_rate / test_quantile out of range")
        # Derived lookup structures, rebuilt on load rather than stored.
        object.__setattr__(self, "emb_ref_sq", np.einsum("ij,ij->i", self.emb_ref, self.emb_ref))
        object.__setattr__(self, "conf_index", st.EcdfIndex(self.conf_ref_sorted[:, None]))
        object.__setattr__(self, "pix_index", st.EcdfIndex(self.pix_ref_sorted))

    @property
    def window(self) -> int:
        """The default window size (the first one calibrated)."""
        return self.windows[0]

    def window_index(self, window: int) -> int:
        """Position of ``window`` in ``windows``; raises ``InputError`` if it was not calibrated."""
        if window not in self.windows:
            raise InputError(
                f"drift window {window} was not calibrated (baseline has {list(self.windows)})",
                hint="use one of the calibrated sizes or recompute the baseline with that window",
            )
        return self.windows.index(window)

    # --- persistence: npz, numpy only, never pickle.
    def to_bytes(self) -> bytes:
        """Serialise to npz bytes (what goes into the bundle as ``baseline.npz``)."""
        arrays: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, Hysteresis):
                v = np.array([v.on_k, v.on_m, v.off_j], dtype=np.int64)
            arrays[name] = np.asarray(v)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write ``baseline.npz`` to ``path`` and return it."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, source: str | Path | bytes) -> Baseline:
        """Read a baseline from a path or from npz bytes (``Bundle.read('baseline.npz')``)."""
        try:
            fh: Any = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        except OSError as e:
            raise BundleError(f"cannot read drift baseline: {e}", hint=_BASELINE_HINT, path=source) from e
        try:
            with fh, np.load(fh, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise BundleError(f"corrupt drift baseline: {e}", hint=_BASELINE_HINT, member="baseline.npz") from e
        missing = [n for n in cls.__dataclass_fields__ if n not in data]
        if missing:
            raise BundleError(f"drift baseline lacks {missing}", hint=_BASELINE_HINT, member="baseline.npz")
        kw: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            v = data[name]
            if name == "hysteresis":
                v = Hysteresis(*(int(i) for i in v))
            elif name in ("windows", "input_shape"):
                v = tuple(int(i) for i in v)
            elif name in ("knn_k", "grid", "schema_version"):
                v = int(v)
            elif v.ndim == 0:
                v = float(v)
            kw[name] = v
        return cls(**kw)


def _check_inputs(name: str, x: np.ndarray, probs: np.ndarray, emb: np.ndarray) -> None:
    if x.ndim != 4 or probs.ndim != 2 or emb.ndim != 2:
        raise DataError(
            f"{name}: expected x (N,C,H,W), probs (N,K), emb (N,D); got {x.shape}, {probs.shape}, {emb.shape}",
            hint="pass preprocessed NCHW inputs with the model's softmax and embedding outputs",
        )
    if not (x.shape[0] == probs.shape[0] == emb.shape[0]):
        raise DataError(f"{name}: x, probs and emb have different lengths", hint="pass aligned arrays")


def compute_baseline(
    x_ref: np.ndarray,
    probs_ref: np.ndarray,
    emb_ref: np.ndarray,
    x_cal: np.ndarray,
    probs_cal: np.ndarray,
    emb_cal: np.ndarray,
    *,
    window: int | Sequence[int] = 50,
    class_prior: np.ndarray | None = None,
    n_boot: int = 2000,
    test_quantile: float = 0.99,
    alarm_rate: float = 0.005,
    hysteresis: Hysteresis | None = None,
    bins: int = 16,
    grid: int = 8,
    knn_k: int = 5,
    seed: int = 0,
) -> Baseline:
    """Calibrate drift thresholds on held-out data (never the training set), numpy only.

    ``*_ref`` become the reference sample shipped to the device; ``*_cal`` (disjoint from
    the reference) supply the bootstrapped undrifted windows: ``n_boot`` windows per size,
    each drawn from a bootstrap resample of the calibration set (a two-level bootstrap, so
    the thresholds also cover the calibration set's own sampling error; duplicate images
    are masked out of the MMD's within-window term so they do not inflate its null).
    With ~540 held-out digits, an even split (~270 / ~270) keeps both the reference
    ECDF/kernel mean and the calibration bootstrap well populated.

    ``alarm_rate`` is the nominal fraction of undrifted windows with the alarm on.  The
    default 0.005 is half the 1% budget on purpose: measured on digits
    (``benchmarks/drift_bench.py``, 4 splits x 500 windows) a nominal 0.01 gave 1.2-1.8%,
    a nominal 0.005 gave 0.5-0.85%: ~270 calibration images cannot pin the far tail tighter.
    """
    hysteresis = hysteresis or Hysteresis()
    windows = (window,) if isinstance(window, int) else tuple(window)
    x_ref, x_cal = np.asarray(x_ref, np.float32), np.asarray(x_cal, np.float32)
    _check_inputs("reference", x_ref, probs_ref, emb_ref)
    _check_inputs("calibration", x_cal, probs_cal, emb_cal)
    if x_ref.shape[1:] != x_cal.shape[1:] or np.shape(probs_ref)[1] != np.shape(probs_cal)[1]:
        raise DataError("reference and calibration shapes differ", hint="pass arrays from the same model")
    if min(len(x_ref), len(x_cal)) < 10:
        raise DataError("need at least 10 reference and 10 calibration samples", hint="hold out more data")
    k = np.shape(probs_ref)[1]
    if class_prior is None:
        class_prior = np.bincount(np.argmax(probs_ref, axis=1), minlength=k).astype(np.float64)
    prior = np.maximum(np.asarray(class_prior, dtype=np.float64), 1e-6)
    prior /= prior.sum()
    emb_r = np.asarray(emb_ref, dtype=np.float64)
    c = x_ref.shape[1]
    lo = x_ref.reshape(len(x_ref), c, -1).min(axis=(0, 2))
    hi = x_ref.reshape(len(x_ref), c, -1).max(axis=(0, 2))
    pix_range = np.stack([lo, hi], axis=1).astype(np.float64)
    ref_counts = np.stack([st.histogram_counts(x_ref[:, i], lo[i], hi[i], bins).sum(axis=0) for i in range(c)])
    gamma = st.median_heuristic_gamma(emb_r)
    d2_rr = st.sq_distances(emb_r, emb_r)
    ref = SimpleNamespace(
        emb_ref=emb_r, emb_ref_sq=np.einsum("ij,ij->i", emb_r, emb_r), pix_range=pix_range, grid=grid,
        knn_k=knn_k, knn_scale=1.0, gamma=gamma, k_rr_mean=float(np.exp(-gamma * d2_rr).mean()),
        conf_ref_sorted=np.sort(np.max(probs_ref, axis=1)),
        pix_ref_sorted=np.sort(st.pool_grid(x_ref, grid), axis=0),
        pix_ref_fraction=ref_counts / ref_counts.sum(axis=1, keepdims=True), class_prior=prior,
    )
    ref.conf_index = st.EcdfIndex(ref.conf_ref_sorted[:, None])
    ref.pix_index = st.EcdfIndex(ref.pix_ref_sorted)
    f = _features(ref, x_cal, probs_cal, emb_cal)
    # Normalise k-NN distances by their median on calibration data: 1.0 = a typical image.
    ref.knn_scale = float(np.median(f.knn)) or 1.0
    f = dataclasses.replace(f, knn=f.knn / ref.knn_scale)
    k_cal = np.exp(-gamma * st.sq_distances(f.emb, f.emb))
    rng = np.random.default_rng(seed)
    n_cal = len(x_cal)
    thresholds, risk_null, input_null, groups = [], [], [], []
    for w in windows:
        group_of = st.merge_small_classes(prior * w)
        groups.append(group_of)

        def null(n: int, w: int = w, group_of: np.ndarray = group_of) -> np.ndarray:
            out = []
            for start in range(0, n, max(1, 20000 // w)):
                nb = min(n - start, max(1, 20000 // w))
                # Two-level bootstrap: resample the calibration set, then the window from that
                # resample.  The null then carries the calibration set's own sampling error
                # (its mean is off the population's by ~sd/sqrt(n_cal)), which a one-level
                # bootstrap ignores; with n_cal ~270 that error alone doubled false alarms
                # of mean-like statistics (measured: embedding k-NN 10% at a 1% threshold).
                pop = rng.integers(0, n_cal, size=(nb, n_cal))
                idx = np.take_along_axis(pop, rng.integers(0, n_cal, size=(nb, w)), axis=1)
                distinct = idx[:, :, None] != idx[:, None, :]
                out.append(_window_stats(ref, f, idx, group_of, pair_mask=distinct, kernel=k_cal))
            return np.concatenate(out)

        thr = np.quantile(null(n_boot), test_quantile, axis=0)
        second = null(n_boot)  # independent draws: group thresholds are not fitted in-sample
        thresholds.append(thr)
        risk_null.append(np.sort(_normalised_max(second, thr, _RISK)))
        input_null.append(np.sort(_normalised_max(second, thr, _INPUT)))
    return Baseline(
        windows=windows, thresholds=np.array(thresholds), risk_null=np.array(risk_null),
        input_null=np.array(input_null), class_groups=np.array(groups), emb_ref=emb_r.astype(np.float32),
        conf_ref_sorted=ref.conf_ref_sorted, pix_ref_sorted=ref.pix_ref_sorted, pix_range=pix_range,
        pix_ref_fraction=ref.pix_ref_fraction, class_prior=prior, input_shape=x_ref.shape[1:],
        gamma=gamma, k_rr_mean=ref.k_rr_mean, knn_k=knn_k, knn_scale=ref.knn_scale,
        sample_score_q99=float(np.quantile(f.knn, 0.99)), grid=grid, alarm_rate=alarm_rate,
        test_quantile=test_quantile, hysteresis=hysteresis,
    )
