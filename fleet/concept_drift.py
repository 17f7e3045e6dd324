"""Concept drift from feedback labels: accuracy per slice and a calibrated sequential change detector.

Input drift watches what the model sees; concept drift is the relation between input and
label changing while the inputs look the same (a class renamed on some sites, a product
line whose look now means something else).  Only labels show it.  Per *slice* -- the
whole fleet, each device, each device group, each true class -- this module keeps the
accuracy and runs a Bernoulli CUSUM on the error stream (Page 1954; the log-likelihood
ratio of "error rate ``p1``" against "error rate ``p0``"), with ``p0`` a 95 % upper bound of
the slice's error rate over its first ``warmup`` labels (or the model's reference error,
when given) and
``p1 = max(p0 * ratio, p0 + min_increase)``.

The threshold is calibrated, not guessed: :func:`cusum_threshold` simulates error
streams at ``p0`` and takes the ``1 - budget`` quantile of the CUSUM's maximum over
``horizon`` labels, so a slice whose error rate has not changed raises a false alarm with
probability ``budget`` per ``horizon`` labels.  Thresholds are cached per (p0, p1).

Pure Python + numpy; the fleet feeds it (device, group, true label, predicted label)
from feedback messages and shows :meth:`ConceptDriftTracker.snapshot` on the dashboard.
Not yet wired: the ingest hook, the dashboard card and the retraining trigger (see the
issue 14 closing note).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from core.errors import ConfigError

__all__ = ["ConceptDriftConfig", "cusum_threshold", "ErrorCusum", "ConceptDriftTracker", "SliceState"]


@dataclass(frozen=True)
class ConceptDriftConfig:
    """How sensitive the concept-drift detector is, and its false-alarm budget."""

    budget: float = 0.01  # false-alarm probability per `horizon` labels of an unchanged slice
    horizon: int = 1000
    ratio: float = 2.0  # detect the error rate doubling ...
    min_increase: float = 0.05  # ... or rising by 5 points, whichever is larger
    warmup: int = 300  # fleet labels before slices are judged (their p0 when no reference error is given)
    reference_error: float | None = None  # the model's error on held-out data, if known

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 0.5 or self.horizon < 10 or self.ratio <= 1.0 or self.warmup < 10:
            raise ConfigError(f"invalid concept-drift config {self}",
                              hint="need 0 < budget < 0.5, horizon >= 10, ratio > 1, warmup >= 10")


def _upper(errors: int, n: int) -> float:
    """A one-sided 95 % upper bound of the warm-up error rate (Agresti-Coull): a slice that happened
    to start with few errors must not make its ordinary error rate look like drift."""
    p = (errors + 2.0) / (n + 4.0)
    return p + 1.645 * math.sqrt(p * (1.0 - p) / (n + 4.0))


def _rates(p0: float, cfg: ConceptDriftConfig) -> tuple[float, float]:
    p0 = min(max(p0, 0.005), 0.5)
    return p0, min(max(p0 * cfg.ratio, p0 + cfg.min_increase), 0.95)


@functools.lru_cache(maxsize=256)
def cusum_threshold(p0: float, p1: float, horizon: int, budget: float, n_sim: int = 4000, seed: int = 0) -> float:
    """CUSUM threshold with P(false alarm within ``horizon`` labels at error rate ``p0``) = ``budget``."""
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    rng = np.random.default_rng(seed)
    maxima = np.empty(n_sim)
    for start in range(0, n_sim, 500):
        nb = min(500, n_sim - start)
        llr = np.where(rng.random((nb, horizon)) < p0, up, down)
        x = np.cumsum(llr, axis=1)
        s = x - np.minimum.accumulate(np.minimum(x, 0.0), axis=1)  # S_t = max(0, S_{t-1} + llr_t)
        maxima[start:start + nb] = s.max(axis=1)
    return float(np.quantile(maxima, 1.0 - budget))


@dataclass
class ErrorCusum:
    """One slice's error stream: counts, the CUSUM statistic and the alarm (sticky until reset)."""

    cfg: ConceptDriftConfig
    n: int = 0
    errors: int = 0
    s: float = 0.0
    alarm: bool = False
    alarm_at: int | None = None
    p0: float | None = None
    threshold: float | None = None
    _llr: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    def update(self, error: bool, p0: float | None = None) -> bool:
        """Add one labelled prediction; returns True when this label turned the alarm on.

        ``p0``: the error rate to judge against, once known (the tracker passes the fleet's);
        without it the slice uses the reference error, else its own warm-up.
        """
        self.n += 1
        self.errors += int(error)
        if self.p0 is None:
            ref = p0 if p0 is not None else self.cfg.reference_error
            if ref is None and self.n < self.cfg.warmup:
                return False
            self._start(ref if ref is not None else _upper(self.errors, self.n))
            if ref is None:
                return False
        self.s = max(0.0, self.s + self._llr[0 if error else 1])
        if not self.alarm and self.s > self.threshold:
            self.alarm, self.alarm_at = True, self.n
            return True
        return False

    def count(self, error: bool) -> bool:
        """Count a label before the slice's reference error rate is known (never fires)."""
        self.n += 1
        self.errors += int(error)
        return False

    def _start(self, p0: float) -> None:
        p0, p1 = _rates(p0, self.cfg)
        self.p0 = p0
        self.threshold = cusum_threshold(round(p0, 3), round(p1, 3), self.cfg.horizon, self.cfg.budget)
        self._llr = (math.log(p1 / p0), math.log((1 - p1) / (1 - p0)))

    @property
    def accuracy(self) -> float | None:
        return None if self.n == 0 else 1.0 - self.errors / self.n


@dataclass(frozen=True)
class SliceState:
    """What the dashboard shows per slice."""

    slice: str
    n: int
    accuracy: float | None
    baseline_error: float | None
    cusum: float
    threshold: float | None
    alarm: bool


class ConceptDriftTracker:
    """Per-slice accuracy and CUSUMs over feedback labels: ``fleet``, ``device:<id>``, ``group:<g>``, ``class:<y>``.

    Every slice is judged against one error rate: the model's reference error when the
    config gives it, else the 95 % upper bound of the fleet's error over its first
    ``warmup`` labels (a slice's own warm-up is too short to estimate a few-percent error
    rate); a slice that fails while the average holds is then visible.
    """

    def __init__(self, cfg: ConceptDriftConfig | None = None) -> None:
        self.cfg = cfg or ConceptDriftConfig()
        self._slices: dict[str, ErrorCusum] = {}

    def update(self, device: str, true_label: str, predicted: str, *, group: str | None = None) -> list[str]:
        """One feedback label; returns the slices whose alarm this label turned on."""
        error = str(true_label) != str(predicted)
        keys = ["fleet", f"device:{device}", f"class:{true_label}"] + ([f"group:{group}"] if group else [])
        fleet = self._slices.get("fleet")
        p0 = self.cfg.reference_error if self.cfg.reference_error is not None else (fleet.p0 if fleet else None)
        fired = []
        for k in keys:
            c = self._slices.get(k)
            if c is None:
                c = self._slices[k] = ErrorCusum(self.cfg)
            if c.update(error, None if k == "fleet" else p0) if p0 is not None or k == "fleet" else c.count(error):
                fired.append(k)
        return fired

    def alarms(self) -> list[str]:
        return sorted(k for k, c in self._slices.items() if c.alarm)

    def reset(self, slice_key: str) -> None:
        """Start a slice afresh (after a retraining served it)."""
        self._slices.pop(slice_key, None)

    def snapshot(self) -> list[SliceState]:
        return [SliceState(k, c.n, c.accuracy, c.p0, c.s, c.threshold, c.alarm) for k, c in sorted(self._slices.items())]
