"""Pure statistics for latency samples (no I/O, no runtimes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LatencyStats", "summarize", "pareto_front", "ratio"]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call latencies in milliseconds for one batch size."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    batch: int = 1

    @property
    def throughput_per_s(self) -> float:
        """Items per second at the median latency (batch / p50)."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else math.inf


def summarize(samples_ms: Sequence[float], *, batch: int = 1) -> LatencyStats:
    """Percentiles by linear interpolation (numpy's default), like most profilers report."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(
        n=int(a.size), mean_ms=float(a.mean()), std_ms=float(a.std(ddof=1)) if a.size > 1 else 0.0,
        min_ms=float(a.min()), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
        max_ms=float(a.max()), batch=batch,
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when minimising x (latency) and maximising y (accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front)


def ratio(new: float | None, old: float | None) -> float | None:
    """``new / old`` or None when either side is missing or zero."""
    if new is None or old is None or old == 0:
        return None
    return new / old
