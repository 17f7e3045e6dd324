"""The statistics of the canary judge (:mod:`fleet.canary`), numpy only.

* :func:`mann_whitney` — Mann-Whitney U on two binned distributions (latency histograms
  in the buckets of :func:`core.protocol.latency_bucket`, or any samples binned the same
  way): mid-ranks per bin, the normal approximation with the tie correction (every value
  of a bin is a tie) and a continuity correction; one-sided, "canary larger".
* :func:`shift_ratio_ci` — how many times larger one group's values are than the other's
  (the Hodges-Lehmann shift of their logs: per-interval latency medians) with a bootstrap
  interval (a fixed seed: the same data give the same verdict).
* :func:`two_proportions` — a one-sided two-proportion z test (pooled variance) with a
  Wilson-score (Newcombe) interval on the difference of the rates.
* :func:`mann_whitney_samples` — Mann-Whitney U on raw samples (per-interval confidences).

No scipy: the fleet extra does not depend on it, and the normal tail is ``math.erfc``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.protocol import LATENCY_BUCKETS, latency_bucket, latency_bucket_ms

__all__ = ["TestResult", "normal_sf", "hist_array", "hist_median_ms", "mann_whitney", "mann_whitney_samples",
           "shift_ratio_ci", "samples_hist", "two_proportions", "wilson"]


@dataclass(frozen=True)
class TestResult:
    """A one-sided test: ``p_value`` that the canary is no worse, ``statistic`` in words."""

    statistic: str
    p_value: float
    z: float


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def hist_array(hist: Mapping[str, int] | Mapping[int, int]) -> np.ndarray:
    """A sparse histogram ({bucket: count}) as a dense count vector of LATENCY_BUCKETS bins."""
    out = np.zeros(LATENCY_BUCKETS, dtype=np.int64)
    for k, v in hist.items():
        i = int(k)
        if 0 <= i < LATENCY_BUCKETS and v > 0:
            out[i] += int(v)
    return out


def samples_hist(values: Sequence[float]) -> np.ndarray:
    """Raw latencies (ms) binned like the agents' histograms."""
    out = np.zeros(LATENCY_BUCKETS, dtype=np.int64)
    for v in values:
        out[latency_bucket(float(v))] += 1
    return out


def hist_median_ms(counts: np.ndarray) -> float | None:
    """The median of a latency histogram, interpolated geometrically inside its bucket."""
    n = int(counts.sum())
    if n == 0:
        return None
    cum = np.cumsum(counts)
    half = n / 2.0
    k = int(np.searchsorted(cum, half, side="left"))
    below = cum[k - 1] if k > 0 else 0
    frac = (half - below) / counts[k] if counts[k] else 0.0
    return latency_bucket_ms(k + float(frac))


def mann_whitney(canary: np.ndarray, control: np.ndarray, *, event: str = "canary>control") -> TestResult:
    """One-sided Mann-Whitney U on binned counts: H1 = canary values tend to be larger.

    ``event`` names what U / (n1 n2) estimates the probability of, in the statistic's text."""
    a, b = canary.astype(np.float64), control.astype(np.float64)
    n1, n2 = a.sum(), b.sum()
    if n1 == 0 or n2 == 0:
        return TestResult("no data", 1.0, 0.0)
    t = a + b
    n = n1 + n2
    midrank = np.cumsum(t) - t + (t + 1.0) / 2.0
    u = float((a * midrank).sum() - n1 * (n1 + 1.0) / 2.0)
    mean = n1 * n2 / 2.0
    ties = float((t ** 3 - t).sum())
    var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0))) if n > 1 else 0.0
    if var <= 0:  # every value in one bucket: nothing tells the groups apart
        return TestResult(f"U={u:.0f}, all values tied", 1.0, 0.0)
    z = (u - mean - 0.5) / math.sqrt(var)
    return TestResult(f"U={u:.0f}, z={z:.2f}, P({event})={u / (n1 * n2):.2f}", normal_sf(z), float(z))


def mann_whitney_samples(canary: Sequence[float], control: Sequence[float], *, larger: bool = True,
                         event: str | None = None) -> TestResult:
    """One-sided Mann-Whitney U on raw samples; ``larger=False``: H1 = canary values tend to be smaller."""
    x = np.asarray(canary, dtype=np.float64)
    y = np.asarray(control, dtype=np.float64)
    if not larger:
        x, y = -x, -y
    if x.size == 0 or y.size == 0:
        return TestResult("no data", 1.0, 0.0)
    values, inverse = np.unique(np.concatenate([x, y]), return_inverse=True)
    a = np.bincount(inverse[: x.size], minlength=values.size)
    b = np.bincount(inverse[x.size:], minlength=values.size)
    return mann_whitney(a, b, event=event or ("canary>control" if larger else "canary<control"))


#: pairs (canary interval, control interval) a Hodges-Lehmann median is taken over, at most; more are sampled
HL_MAX_PAIRS = 10_000


def _hl(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    """The median of all differences x_i - y_j (a random HL_MAX_PAIRS of them when there are more)."""
    if x.size * y.size <= HL_MAX_PAIRS:
        return float(np.median(np.subtract.outer(x, y)))
    return float(np.median(x[rng.integers(0, x.size, HL_MAX_PAIRS)] - y[rng.integers(0, y.size, HL_MAX_PAIRS)]))


def shift_ratio_ci(canary: Sequence[float], control: Sequence[float], *, level: float = 0.95, resamples: int = 400,
                   seed: int = 20240611) -> tuple[float, float, float] | None:
    """``(ratio, low, high)``: how many times larger the canary's values are than the control's -- the
    Hodges-Lehmann estimate on the log scale, exp(median over all pairs of log c_i - log k_j), the shift
    that the Mann-Whitney test is about -- and its percentile-bootstrap interval, each group resampled
    with replacement (a fixed seed: the same data give the same verdict).  Values must be positive.

    Unlike the ratio of the two medians it does not jump when a few bursty intervals move a median
    from one load level to the next: every pair of intervals has its say.
    """
    x = np.log(np.asarray(canary, dtype=np.float64))
    y = np.log(np.asarray(control, dtype=np.float64))
    if not x.size or not y.size:
        return None
    rng = np.random.default_rng(seed)
    point = _hl(x, y, rng)
    if x.size * y.size <= 2_000:  # few intervals: all resamples at once, in chunks of about 200 k differences
        boot_parts = []
        chunk = max(1, 200_000 // (x.size * y.size))
        for start in range(0, resamples, chunk):
            r = min(chunk, resamples - start)
            xs = x[rng.integers(0, x.size, (r, x.size))]
            ys = y[rng.integers(0, y.size, (r, y.size))]
            boot_parts.append(np.median((xs[:, :, None] - ys[:, None, :]).reshape(r, -1), axis=1))
        boot = np.concatenate(boot_parts)
    else:
        boot = np.array([_hl(x[rng.integers(0, x.size, x.size)], y[rng.integers(0, y.size, y.size)], rng)
                         for _ in range(resamples)])
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return math.exp(point), math.exp(float(lo)), math.exp(float(hi))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a rate k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportions(k1: int, n1: int, k2: int, n2: int) -> tuple[TestResult, tuple[float, float]]:
    """One-sided test of H1 = rate 1 (canary) > rate 2 (control), and a 95 % interval of rate1 - rate2.

    The interval is Newcombe's hybrid score interval (from two Wilson intervals): sound
    with small counts and rates at 0 or 1, where the Wald interval collapses.
    """
    if n1 == 0 or n2 == 0:
        return TestResult("no data", 1.0, 0.0), (-1.0, 1.0)
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        z = 0.0
        p = 1.0
    else:
        z = (p1 - p2) / se
        p = normal_sf(z)
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return TestResult(f"z={z:.2f}", p, z), (lo, hi)
