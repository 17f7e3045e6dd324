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

Wired into the fleet: :func:`concept_drift_status` replays the feedback labels stored in
the registry (teacher pseudo-labels excluded) for the model in service through a
:class:`ConceptDriftTracker` -- the alarms are a pure function of the stored labels, so
they survive restarts and every reader (API, dashboard, trigger) sees the same ones --
and reports accuracy per slice (device, group from the device tag ``group_tag``, true
class, hour of day UTC).  ``GET /api/concept-drift`` serves it; :func:`with_concept_drift`
puts the alarmed slices into the retrain trigger's :class:`~fleet.policy.FleetSnapshot`,
where ``[trigger].concept_drift`` lets them start a retraining job like a persistent
input-drift alarm.  ``[concept]`` in fleet.toml is :class:`ConceptDriftConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.configfile import check, knob

__all__ = ["ConceptDriftConfig", "cusum_threshold", "ErrorCusum", "ConceptDriftTracker", "SliceState",
           "ConceptAlarm", "ConceptDriftStatus", "concept_drift_status", "current_model", "with_concept_drift",
           "fleet_concept_drift"]


@dataclass(frozen=True)
class ConceptDriftConfig:
    """How sensitive the concept-drift detector is, and its false-alarm budget: ``[concept]`` in fleet.toml."""

    enabled: bool = True  # off: no concept-drift slices, no alarms, nothing for the trigger
    budget: float = knob(0.01, gt=0, lt=0.5)  # false-alarm probability per `horizon` labels of an unchanged slice
    horizon: int = knob(1000, ge=10)
    ratio: float = knob(2.0, gt=1)  # detect the error rate doubling ...
    min_increase: float = knob(0.05, ge=0, lt=1)  # ... or rising by 5 points, whichever is larger
    warmup: int = knob(300, ge=10)  # fleet labels before slices are judged (their p0 when no reference error)
    reference_error: float | None = knob(None, ge=0, lt=1)  # the model's error on held-out data, if known
    group_tag: str = "group"  # the device tag that names its group (slices group:<value>)

    def __post_init__(self) -> None:
        check(self)


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
    alarm_at: int | None = None  # the slice's label count when its alarm went on
    alarm_ts: float | None = None  # when the label that turned it on was given (fleet clock)


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
        self._alarm_ts: dict[str, float | None] = {}

    def update(self, device: str, true_label: str, predicted: str, *, group: str | None = None,
               ts: float | None = None) -> list[str]:
        """One feedback label (given at ``ts``, if known); returns the slices whose alarm this label turned on."""
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
                self._alarm_ts[k] = ts
        return fired

    def alarms(self) -> list[str]:
        return sorted(k for k, c in self._slices.items() if c.alarm)

    def reset(self, slice_key: str) -> None:
        """Start a slice afresh (after a retraining served it)."""
        self._slices.pop(slice_key, None)
        self._alarm_ts.pop(slice_key, None)

    def snapshot(self) -> list[SliceState]:
        return [SliceState(k, c.n, c.accuracy, c.p0, c.s, c.threshold, c.alarm, c.alarm_at, self._alarm_ts.get(k))
                for k, c in sorted(self._slices.items())]


# ------------------------------------------------------------------ the fleet's view


@dataclass(frozen=True)
class ConceptAlarm:
    """One slice in concept-drift alarm: ``kind`` is fleet, device, group or class; ``key`` its value."""

    slice: str
    kind: str
    key: str
    n: int
    accuracy: float | None
    baseline_error: float | None
    alarm_at: int | None
    alarm_ts: float | None


@dataclass(frozen=True)
class ConceptDriftStatus:
    """Concept drift of the model in service: accuracy and CUSUM per slice, the alarms, accuracy per hour.

    ``slices`` are ``fleet``, ``device:<id>``, ``group:<g>`` and ``class:<true label>``;
    ``hours`` are ``hour:<HH>`` (UTC hour the sample was captured, report-only: no alarm).
    """

    model_version: str | None
    since: float | None
    labels: int
    slices: tuple[SliceState, ...]
    alarms: tuple[ConceptAlarm, ...]
    hours: tuple[SliceState, ...]
    enabled: bool = True

    @property
    def alarm_slices(self) -> tuple[str, ...]:
        return tuple(a.slice for a in self.alarms)

    def accuracy(self, kind: str) -> dict[str, float | None]:
        """Accuracy per slice of one kind (``device``, ``group``, ``class``, ``hour``) -> {key: accuracy}."""
        rows = self.hours if kind == "hour" else self.slices
        return {s.slice.split(":", 1)[1]: s.accuracy for s in rows if s.slice.startswith(kind + ":")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``GET /api/concept-drift`` returns and the dashboard shows."""
        def row(s: SliceState) -> dict[str, Any]:
            kind, _, key = s.slice.partition(":")
            return {**dataclasses.asdict(s), "kind": kind, "key": key or kind}

        return {"enabled": self.enabled, "model_version": self.model_version, "since": self.since,
                "labels": self.labels, "alarms": [dataclasses.asdict(a) for a in self.alarms],
                "slices": [row(s) for s in self.slices], "hours": [row(s) for s in self.hours]}


def current_model(registry: Any, model_name: str | None = None) -> tuple[str, float] | None:
    """``(version, created)`` of the model in service (the newest accepted version), or None."""
    name = model_name or registry.devices.most_common_model_name()
    model = registry.models.latest(name, status="accepted") if name else None
    return (model.version, model.created) if model else None


def concept_drift_status(registry: Any, cfg: ConceptDriftConfig | None = None, *, model_version: str | None = None,
                         since: float | None = None) -> ConceptDriftStatus:
    """Replay the feedback labels in ``registry`` through a fresh tracker (oldest label first).

    Only true labels count (``label_source`` other than ``teacher``) on samples that carry
    the prediction; ``model_version``: only samples served by it (and those without a
    version); ``since``: only samples received since then (the model in service's
    creation, so alarms against a replaced model do not count).
    """
    cfg = cfg or ConceptDriftConfig()
    if not cfg.enabled:
        return ConceptDriftStatus(model_version, since, 0, (), (), (), enabled=False)
    rows = [r for r in registry.samples.find(labelled=True, since=since)
            if r.prediction is not None and r.label_source != "teacher"
            and (model_version is None or r.model_version in (None, model_version))]
    rows.sort(key=lambda r: (r.labelled_at or r.received or r.ts, r.id))
    devices = registry.devices.by_ids(sorted({r.device_id for r in rows})) if rows else {}
    tracker = ConceptDriftTracker(cfg)
    hours: dict[str, list[int]] = {}
    for r in rows:
        dev = devices.get(r.device_id)
        group = (dev.tags or {}).get(cfg.group_tag) if dev is not None else None
        tracker.update(r.device_id, str(r.label), str(r.prediction), group=None if group is None else str(group),
                       ts=r.labelled_at)
        h = hours.setdefault(f"hour:{time.gmtime(r.ts).tm_hour:02d}", [0, 0])
        h[0] += 1
        h[1] += int(str(r.label) != str(r.prediction))
    slices = tuple(tracker.snapshot())
    alarms = tuple(ConceptAlarm(s.slice, s.slice.partition(":")[0], s.slice.partition(":")[2] or "fleet", s.n,
                                s.accuracy, s.baseline_error, s.alarm_at, s.alarm_ts) for s in slices if s.alarm)
    hour_rows = tuple(SliceState(k, n, 1.0 - e / n, None, 0.0, None, False) for k, (n, e) in sorted(hours.items()))
    return ConceptDriftStatus(model_version, since, len(rows), slices, alarms, hour_rows)


def with_concept_drift(snapshot: Any, registry: Any, cfg: ConceptDriftConfig | None = None, *,
                       model_version: str | None = None, since: float | None = None) -> Any:
    """``snapshot`` (a :class:`fleet.policy.FleetSnapshot`) with the concept-drift alarms of the model in service."""
    status = concept_drift_status(registry, cfg, model_version=model_version, since=since)
    return dataclasses.replace(snapshot, concept_alarms=status.alarm_slices)


def fleet_concept_drift(registry: Any, config: Any, *, model_version: str | None = None,
                        since: float | None = None) -> ConceptDriftStatus:
    """Concept drift as a :class:`fleet.config.FleetConfig` sees it: ``[concept]``, and by default the labels
    of the model in service (``model_name``, else what most devices run) since it was created.

    What ``GET /api/concept-drift`` and the dashboard call.
    """
    if model_version is None and since is None:
        cur = current_model(registry, getattr(config, "model_name", None))
        if cur is not None:
            model_version, since = cur
    return concept_drift_status(registry, getattr(config, "concept", None), model_version=model_version, since=since)
