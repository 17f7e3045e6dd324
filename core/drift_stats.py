"""Vectorised two-sample statistics for drift detection, numpy only (no scipy on the device).

Every function here is pure: it takes arrays and returns numbers.  ``core.drift``
decides which statistics to compute per window and how to calibrate their thresholds;
the functions below are shared by the export-time calibration and the on-device monitor
so that the two can never disagree.

The analytic p-values (Kolmogorov, chi-square) are reported for information; alarm
thresholds are calibrated empirically per window size (see ``drift.compute_baseline``),
because stream windows are small and the asymptotic laws are loose there.

The alarm's hysteresis and its rates live in :mod:`core.drift_hysteresis` (re-exported here).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .drift_hysteresis import Hysteresis, HysteresisState, alarm_on_fraction, flag_rate_for_alarm_rate

__all__ = [
    "ks_statistic",
    "ks_statistic_columns",
    "EcdfIndex",
    "ks_from_codes",
    "kolmogorov_sf",
    "ks_pvalue",
    "chi2_sf",
    "chi2_statistic",
    "merge_small_classes",
    "psi",
    "histogram_counts",
    "pool_grid",
    "sq_distances",
    "median_heuristic_gamma",
    "mmd2_with_reference",
    "knn_distance",
    "Hysteresis",
    "HysteresisState",
    "alarm_on_fraction",
    "flag_rate_for_alarm_rate",
    "ks_uniform",
    "empirical_pvalues",
    "null_tails",
    "cauchy_combine",
    "class_mmd2",
    "within_class_mmd2",
]


# ---------------------------------------------------------------------------- KS


def ks_statistic(a: np.ndarray, ref_sorted: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov D between sample ``a`` and an already-sorted reference."""
    a = np.asarray(a, dtype=np.float64)[:, None]
    return float(ks_statistic_columns(a, np.asarray(ref_sorted, dtype=np.float64)[:, None])[0])


def ks_statistic_columns(a: np.ndarray, ref_sorted: np.ndarray) -> np.ndarray:
    """Column-wise two-sample KS D for ``a`` (n, F) against ``ref_sorted`` (m, F), sorted per column."""
    return ks_from_codes(EcdfIndex(ref_sorted).codes(a), ref_sorted.shape[0])


class EcdfIndex:
    """A per-column sorted reference that tells where new values sit in it (for KS).

    ``codes(values)`` gives ``left * (m + 1) + right`` per value and column (int64, (n, F)),
    ``left`` = #ref < v and ``right`` = #ref <= v.  The code is monotone in ``v`` and is all a
    KS statistic against this reference needs, so it is computed once per sample (on the
    device when the sample arrives; at calibration once per image, then reused by
    thousands of bootstrap windows).  One ``searchsorted`` serves all columns: values are
    clipped just outside the reference range (which changes no count) and each column is
    shifted into its own band of the real line.
    """

    def __init__(self, ref_sorted: np.ndarray) -> None:
        ref = np.asarray(ref_sorted, dtype=np.float64)
        if ref.ndim != 2:
            raise ValueError("ref_sorted must be (m, F)")
        self.m, self.f = ref.shape
        self._lo = float(ref[0].min()) - 1.0
        self._hi = float(ref[-1].max()) + 1.0
        self._offs = np.arange(self.f, dtype=np.float64) * (self._hi - self._lo + 1.0) - self._lo
        self._flat = (ref + self._offs).T.ravel()
        self._base = np.arange(self.f) * self.m

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Codes of ``values`` (n, F) in this reference."""
        v = np.clip(np.asarray(values, dtype=np.float64), self._lo, self._hi)
        if v.shape[-1] != self.f:
            raise ValueError(f"column mismatch: {v.shape[-1]} vs {self.f}")
        v = v + self._offs
        flat = self._flat
        left = np.searchsorted(flat, v, side="left")
        # #ref <= v is #ref < v unless v is a reference value: only those are searched again
        right = left.copy()
        tie = flat.take(np.minimum(left, len(flat) - 1)) == v
        if tie.any():
            right[tie] = np.searchsorted(flat, v[tie], side="right")
        return (left - self._base) * (self.m + 1) + (right - self._base)


def ks_from_codes(codes: np.ndarray, m: int) -> np.ndarray:
    """KS D of windows along axis -2 of ``codes`` (..., W, F) against a reference of size m -> (..., F).

    With the window sorted, the ECDF gap is largest just at or just before a window point:
    D = max_i max(i/W - R_i/m, L_i/m - (i-1)/W), R/L the reference counts <= / < the
    i-th smallest window value.  Ties inside the window are handled by the same formula.
    """
    c = np.sort(codes, axis=-2)
    w = c.shape[-2]
    left, right = np.divmod(c, m + 1)
    i = np.arange(1, w + 1, dtype=np.float64)[:, None]
    up = i / w - right / m
    down = left / m - (i - 1.0) / w
    return np.maximum(up.max(axis=-2), down.max(axis=-2))


def kolmogorov_sf(z: float | np.ndarray) -> np.ndarray:
    """Survival function of the Kolmogorov distribution, P(K > z) (scipy's ``kstwobign.sf``)."""
    z = np.atleast_1d(np.asarray(z, dtype=np.float64))
    out = np.ones_like(z)
    big = z >= 1.0
    # Two series, each fast where the other is slow: the alternating exp(-2 k^2 z^2) series
    # for large z, the theta-function form for small z.
    if big.any():
        zb = z[big][:, None]
        k = np.arange(1, 101, dtype=np.float64)[None, :]
        out[big] = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k * k * zb * zb), axis=1)
    small = (~big) & (z > 0.0)
    if small.any():
        zs = z[small][:, None]
        k = np.arange(1, 101, dtype=np.float64)[None, :]
        cdf = math.sqrt(2.0 * math.pi) / zs[:, 0] * np.sum(
            np.exp(-((2.0 * k - 1.0) ** 2) * math.pi**2 / (8.0 * zs * zs)), axis=1
        )
        out[small] = 1.0 - cdf
    return np.clip(out, 0.0, 1.0)


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic ``d`` (sizes n, m).

    Stephens' small-sample correction ``(sqrt(en) + 0.12 + 0.11/sqrt(en)) * d`` keeps it
    within ~0.01 of the exact law for en >= 20 or so.
    """
    en = math.sqrt(n * m / (n + m))
    return float(kolmogorov_sf((en + 0.12 + 0.11 / en) * d)[0])


def ks_uniform(u: np.ndarray) -> np.ndarray:
    """KS D of windows ``u`` (..., W) of values in [0, 1] against Uniform(0, 1) -> (...).

    Used on probability-integral-transformed values (a class-conditional confidence rank),
    which are uniform under no drift whatever the class mix.
    """
    s = np.sort(u, axis=-1)
    w = s.shape[-1]
    i = np.arange(1, w + 1, dtype=np.float64)
    return np.maximum((i / w - s).max(axis=-1), (s - (i - 1.0) / w).max(axis=-1))


def null_tails(null_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of sorted nulls (n, T): where :func:`empirical_pvalues` extrapolates the tail
    (``u``, the top ``m``-th draw) and the exponential's scale (``beta``) -> ((T,), (T,)).

    They depend on the null only: a drift monitor computes them once, not per window."""
    n, t = null_sorted.shape
    m = max(10, n // 20)
    u = np.empty(t)
    beta = np.empty(t)
    for j in range(t):
        col = null_sorted[:, j]
        u[j] = col[n - m]
        beta[j] = max(float(np.mean(col[n - m:] - u[j])), 1e-12)
    return u, beta


def empirical_pvalues(scores: np.ndarray, null_sorted: np.ndarray,
                      tails: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Right-tail p-values of ``scores`` (..., T) against per-column sorted nulls (n, T).

    ``p = (1 + #{null >= s}) / (n + 1)`` inside the null's range; in its top ``m`` (5 %, at
    least 10) the tail is extrapolated as exponential (peaks over threshold with the
    excesses' mean as scale), so a score far beyond every null draw gets a p-value far
    below 1 / (n + 1) instead of saturating there -- otherwise one decisive test could not
    carry a combination.  ``tails``: :func:`null_tails` of ``null_sorted``, when computed already.
    """
    n, t = null_sorted.shape
    s = np.asarray(scores, dtype=np.float64)
    m = max(10, n // 20)
    u, beta = null_tails(null_sorted) if tails is None else tails
    below = np.empty(s.shape)
    for j in range(t):  # one search per column; the rest elementwise over all columns at once
        below[..., j] = np.searchsorted(null_sorted[:, j], s[..., j], side="left")
    emp = (1.0 + n - below) / (n + 1.0)
    tail = (m / (n + 1.0)) * np.exp(-np.maximum(s - u, 0.0) / beta)  # only used above u
    return np.where(s > u, np.minimum(emp, tail), emp)


def cauchy_combine(p: np.ndarray) -> np.ndarray:
    """Cauchy combination of p-values along the last axis (Liu & Xie 2020), as ``-log10`` of the combined p.

    ``T = mean(tan((0.5 - p) * pi))`` is standard Cauchy under the null whatever the
    dependence between the tests (asymptotically in the tail), so a single very small p
    carries the combination (unlike Fisher's, which needs several) while moderate
    evidence from several tests adds up (unlike the minimum).  Thresholds are still
    calibrated empirically; the ``-log10 p`` scale just makes scores readable and
    averageable (2.0 = 1 %).
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-15, 1.0 - 1e-15)
    t = np.tan((0.5 - p) * np.pi).mean(axis=-1)
    pc = np.where(t > 1e3, 1.0 / (np.pi * np.maximum(t, 1e3)), 0.5 - np.arctan(t) / np.pi)
    return -np.log10(np.clip(pc, 1e-300, 1.0))


def class_mmd2(within_u: np.ndarray, kr_mean: np.ndarray, counts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Squared MMD of B windows against a reference re-weighted to each window's class mix -> (B,).

    ``within_u`` (B,): mean kernel over distinct window pairs; ``kr_mean`` (B, K): the
    window's mean kernel to each reference class; ``counts`` (B, K): predicted classes in the
    window; ``m`` (K, K): mean kernel between reference classes (distinct pairs).  The
    reference term is re-weighted so that the statistic's expectation is zero whenever
    each class looks like its reference, *whatever the class mix*: a change of class mix
    alone (label shift) is not seen; a change within classes is.  With one class it is
    the unbiased MMD^2.
    """
    counts = np.asarray(counts, dtype=np.float64)
    w = counts.sum(axis=1)
    pi = counts / w[:, None]
    cross = np.einsum("bk,bk->b", pi, kr_mean)
    pmp = np.einsum("bk,kl,bl->b", pi, m, pi)
    pair = (np.einsum("bk,kl,bl->b", counts, m, counts) - counts @ np.diag(m)) / (w * (w - 1.0))
    return within_u - 2.0 * cross + 2.0 * pmp - pair


def within_class_mmd2(same_sum: np.ndarray, same_pairs: np.ndarray, own_kr: np.ndarray, counts: np.ndarray,
                      m_diag: np.ndarray, class_pairs: np.ndarray | None = None) -> np.ndarray:
    """Squared MMD of B windows against the reference *within* each predicted class -> (B,).

    ``same_sum`` (B,): kernel summed over distinct same-class window pairs, ``same_pairs``
    (B,) their number; ``own_kr`` (B,): mean over the window of each sample's mean kernel
    to its own class's reference; ``counts`` (B, K) predicted classes; ``m_diag`` (K,) mean
    kernel within each reference class.  Only same-class comparisons enter, so neither the
    mean nor the spread of the statistic depends on the class mix (``class_mmd2`` keeps the
    between-class pairs and its spread grows when a window holds few classes); the
    reference terms are weighted so that the expectation is zero when every class looks
    like its reference.  ``class_pairs`` (B, K): the same-class pairs per class that entered
    ``same_sum`` when some were left out (the calibration drops pairs of one image drawn
    twice); without it, ``counts * (counts - 1)`` -- weighting the reference term by those
    would bias the statistic down whenever a window holds duplicates, and with it the null.
    """
    counts = np.asarray(counts, dtype=np.float64)
    w = counts.sum(axis=1)
    pairs = np.maximum(same_pairs, 1.0)
    within = np.where(same_pairs > 0, same_sum / pairs, 0.0)
    per_class = counts * (counts - 1.0) if class_pairs is None else np.asarray(class_pairs, dtype=np.float64)
    ref_pairs = np.where(same_pairs[:, None] > 0, per_class / pairs[:, None], 0.0) @ m_diag
    return within - 2.0 * own_kr + 2.0 * (counts / w[:, None]) @ m_diag - ref_pairs


# -------------------------------------------------------------------- chi-square


def _gammainc_lower_series(a: float, x: float) -> float:
    term = 1.0 / a
    total = term
    ap = a
    for _ in range(1000):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gammainc_upper_cf(a: float, x: float) -> float:
    # Modified Lentz continued fraction (Numerical Recipes 6.2).
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for a chi-square variable with ``dof`` degrees of freedom (scipy's ``chi2.sf``)."""
    if dof <= 0:
        raise ValueError("dof must be positive")
    if x <= 0.0:
        return 1.0
    a, h = dof / 2.0, x / 2.0
    if h < a + 1.0:
        return max(0.0, 1.0 - _gammainc_lower_series(a, h))
    return _gammainc_upper_cf(a, h)


def merge_small_classes(expected: np.ndarray, min_expected: float = 5.0) -> np.ndarray:
    """Group classes so that every group's expected count is at least ``min_expected``.

    Returns ``group_of_class`` (K,) int.  Classes are merged smallest-first, the usual
    remedy for the chi-square approximation breaking down on small expected counts
    (a 25-image window over 10 classes expects 2.5 per class).  At least two groups are
    always kept so the test stays defined.
    """
    expected = np.asarray(expected, dtype=np.float64)
    order = np.argsort(expected, kind="stable")
    groups: list[list[int]] = []
    current: list[int] = []
    acc = 0.0
    for k in order:
        current.append(int(k))
        acc += expected[k]
        if acc >= min_expected:
            groups.append(current)
            current, acc = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    if len(groups) < 2 and len(order) >= 2:
        # Too few expected counts overall: split into the largest class vs the rest.
        groups = [[int(k) for k in order[:-1]], [int(order[-1])]]
    group_of = np.empty(len(expected), dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    return group_of


def chi2_statistic(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square sum((O - E)^2 / E); ``expected`` must be positive."""
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.sum((observed - expected) ** 2 / expected))


# --------------------------------------------------------------------------- PSI


def histogram_counts(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Per-row counts of ``values`` (R, ...) in ``bins`` equal-width bins over [lo, hi] -> (R, bins).

    Values outside the range are counted in the outer bins rather than dropped, so a
    shifted input still shows up.  Equal widths make binning one multiply per pixel
    (a ``searchsorted`` over 100k pixels was most of a window's cost).
    """
    values = np.asarray(values, dtype=np.float32)
    r = values.shape[0]
    scale = np.float32(bins / (hi - lo)) if hi > lo else np.float32(0.0)
    idx = ((values.reshape(r, -1) - np.float32(lo)) * scale).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    idx += (np.arange(r) * bins)[:, None]
    return np.bincount(idx.ravel(), minlength=r * bins).reshape(r, bins)


def psi(counts: np.ndarray, ref_fraction: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Population stability index of histogram ``counts`` (..., B) against ``ref_fraction`` (..., B).

    Both distributions are floored at ``eps`` so empty bins do not give infinities.
    """
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    p = np.maximum(p, eps)
    q = np.maximum(np.asarray(ref_fraction, dtype=np.float64), eps)
    return np.sum((p - q) * np.log(p / q), axis=-1)


def pool_grid(x: np.ndarray, grid: int) -> np.ndarray:
    """Average-pool images (N, C, H, W) to (N, C * g * g) features, g = min(grid, H, W).

    A coarse spatial summary: per-cell mean intensity sees rotations and translations
    that a whole-image intensity histogram cannot.
    """
    n, c, h, w = x.shape
    rows, cols, area = _grid_cells(h, w, grid)
    x = np.asarray(x, dtype=np.float64)
    gh, gw = len(rows), len(cols)
    if h % gh or w % gw:
        s = np.add.reduceat(x, rows, axis=2)
        s = np.add.reduceat(s, cols, axis=3)
    else:  # equal cells (a 32x32 thumbnail, grid 8): reduceat's sums in its order, as a few strided adds
        fh, fw = h // gh, w // gw
        r = x.reshape(n, c, gh, fh, w)
        acc = r[:, :, :, 0].copy()
        for i in range(1, fh):
            acc += r[:, :, :, i]
        q = acc.reshape(n, c, gh, gw, fw)
        s = q[..., 0].copy()
        for j in range(1, fw):
            s += q[..., j]
    s /= area
    return s.reshape(n, c * len(rows) * len(cols))


@functools.lru_cache(maxsize=8)
def _grid_cells(h: int, w: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.linspace(0, h, min(grid, h) + 1).astype(np.int64)
    cols = np.linspace(0, w, min(grid, w) + 1).astype(np.int64)
    return rows[:-1], cols[:-1], np.diff(rows)[:, None] * np.diff(cols)[None, :]


# --------------------------------------------------------------------- embedding


def sq_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clipped at zero against rounding."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a_sq = np.einsum("ij,ij->i", a, a)
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b, b)
    d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def median_heuristic_gamma(ref: np.ndarray) -> float:
    """RBF ``gamma`` = 1 / median pairwise squared distance of ``ref`` (k = exp(-gamma d^2))."""
    d = sq_distances(ref, ref)
    iu = np.triu_indices(d.shape[0], k=1)
    med = float(np.median(d[iu]))
    return 1.0 / med if med > 0 else 1.0


def mmd2_with_reference(
    k_ww: np.ndarray, k_wr: np.ndarray, k_rr_mean: float, *, pair_mask: np.ndarray | None = None
) -> np.ndarray:
    """Squared MMD (V-statistic form, k(x, x) = 1) of windows against a fixed reference.

    ``k_ww`` (B, W, W) and ``k_wr`` (B, W, R) are kernel blocks for B windows;
    ``k_rr_mean`` is the reference's precomputed mean kernel.  The within-window term is
    ``1/W + (W-1)/W * mean_{i != j} k`` over the pairs in ``pair_mask`` (B, W, W): the
    calibration passes a mask that drops pairs drawn from the *same* calibration image,
    so bootstrap duplicates do not inflate the null (they would, by ~1/n_cal, which at
    W=200 is most of the null's mean).
    """
    b, w, _ = k_ww.shape
    off = ~np.eye(w, dtype=bool)[None, :, :]
    mask = off if pair_mask is None else (pair_mask & off)
    n_pairs = np.maximum(mask.sum(axis=(1, 2)), 1)
    within = (k_ww * mask).sum(axis=(1, 2)) / n_pairs
    within = 1.0 / w + (w - 1.0) / w * within
    cross = k_wr.mean(axis=(1, 2))
    return within + k_rr_mean - 2.0 * cross


def knn_distance(d2: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest reference point from a squared-distance matrix (N, R)."""
    k = min(k, d2.shape[1])
    part = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return np.sqrt(part)
