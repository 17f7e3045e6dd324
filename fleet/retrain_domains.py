"""Which held-out samples show the domain a retrained model is adapted to (issue 11 §2).

The retrained model gets a second drift baseline, ``adapted``, so that the cameras it was
retrained for stop alarming once they are served well (:mod:`core.drift_domains`).  That
baseline must be calibrated on *their* inputs.  The labelled samples that trigger a
retraining are a mixture: captures from the shifted cameras (drift) and low-confidence
captures from cameras that never drifted.  A baseline calibrated on the mixture fits
neither domain, and the recovered cameras go on alarming in a share of their windows.

So the ``adapted`` domain is built from the held-out samples captured while their device
was drifted: the device's drift window that contains the sample (its first report on the
sample's model version at or after the sample's device time, within ``WINDOW_SLACK_S``)
was in alarm or flagged "input changed".  When those are too few to calibrate every
window size the whole held-out set could (see :func:`supported_windows`), the whole set
is used, as before, and the outcome says which.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.drift_calibrate import DEFAULT_WINDOWS

__all__ = ["AdaptedDomain", "WINDOW_SLACK_S", "adapted_domain", "drifted_at_capture", "supported_windows"]

# how long after a sample its device's next drift report may come and still be "its" window
WINDOW_SLACK_S = 120.0


@dataclass(frozen=True)
class AdaptedDomain:
    """The held-out indices the ``adapted`` baseline is calibrated on, and why."""

    indices: np.ndarray  # positions into the held-out set
    source: str  # "drifted at capture" | "all held-out"
    n_drifted: int  # held-out samples captured while their device was drifted
    n_holdout: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n": int(len(self.indices)), "n_drifted": self.n_drifted,
                "n_holdout": self.n_holdout}


def supported_windows(n: int, windows: Sequence[int] = DEFAULT_WINDOWS) -> tuple[int, ...]:
    """Drift window sizes ``n`` held-out images can calibrate: W reference and 2 W calibration images."""
    return tuple(w for w in windows if n >= 3 * w)


def drifted_at_capture(samples: Sequence[tuple[str, float, str | None]], reports: Sequence[Any],
                       slack_s: float = WINDOW_SLACK_S) -> np.ndarray:
    """Per sample ``(device_id, ts, model_version)``: was the drift window containing it in alarm or
    flagged "input changed"?  ``reports``: drift records (``device_id``, ``ts``, ``model_version``,
    ``alarm``, ``input_shift``).  A sample without a report after it counts as not drifted."""
    series: dict[tuple[str, str | None], tuple[list[float], list[bool]]] = {}
    for r in sorted(reports, key=lambda r: r.ts):
        ts, flags = series.setdefault((r.device_id, r.model_version), ([], []))
        ts.append(float(r.ts))
        flags.append(bool(r.alarm or r.input_shift))
    out = np.zeros(len(samples), dtype=bool)
    for i, (device, ts, version) in enumerate(samples):
        found = series.get((device, version))
        if not found:
            continue
        j = bisect.bisect_left(found[0], ts)
        out[i] = j < len(found[0]) and found[0][j] - ts <= slack_s and found[1][j]
    return out


def adapted_domain(registry: Any, recs: Sequence[Any]) -> AdaptedDomain:
    """The held-out samples ``recs`` (sample records, in held-out order) to calibrate ``adapted`` on."""
    n = len(recs)
    keys = [(r.device_id, float(r.ts), r.model_version) for r in recs]
    if not n:
        return AdaptedDomain(np.arange(0), "all held-out", 0, 0)
    reports = registry.drift_reports(device_ids=sorted({k[0] for k in keys}), since=min(k[1] for k in keys),
                                     until=max(k[1] for k in keys) + WINDOW_SLACK_S)
    drifted = np.flatnonzero(drifted_at_capture(keys, reports))
    if supported_windows(len(drifted)) and supported_windows(len(drifted)) == supported_windows(n):
        return AdaptedDomain(drifted, "drifted at capture", len(drifted), n)
    return AdaptedDomain(np.arange(n), "all held-out", len(drifted), n)
