"""Which samples show the domain a retrained model is adapted to (issue 11 §2).

The retrained model gets a second drift baseline, ``adapted``, so that the cameras it was
retrained for stop alarming once they are served well (:mod:`core.drift_domains`).  That
baseline must be calibrated on *their* inputs, never on what the model was trained on.
The labelled held-out samples are the wrong set: the labels that trigger a retraining are
a mixture of captures from the shifted cameras and low-confidence captures from cameras
that never drifted (about half and half in the demo), and a baseline calibrated on the
mixture fits neither domain: the recovered cameras alarmed in 25 % of their windows.

The drift baseline needs no labels.  So ``adapted`` is calibrated on the newest samples
(labelled or not, up to ``ADAPTED_MAX``) that were captured while their device was
drifted and that the model was not trained on.  "Drifted": the device's drift window
containing the sample (its first report on the sample's model version at or after the
sample's device time, within ``WINDOW_SLACK_S``) was in alarm or flagged "input
changed".  The devices searched are those whose labelled samples were captured so.
Reservoir samples are left out: the sampler keeps an input in the reservoir only when it
was neither drift-flagged nor of low confidence, so on a shifted camera they are the few
inputs that look clean (a baseline of them alarmed on every recovered window).

Measured offline on a demo run's fleet (`demo --quick`, 107 windows of W = 50 of shifted
images through the candidate): all held-out samples 27 windows in alarm, the newest 150,
300 or 600 drifted captures 0; clean windows 0 of 16 either way.  In a demo run with the
newest 600: 0 of 18 recovered windows in alarm (the export took 70 s on a loaded machine, so
the default is 300, which calibrates every default window size).

When the drifted captures are too few to calibrate every window size the held-out set
could (see :func:`supported_windows`), the held-out set is used, as before, and the
outcome says which.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.drift_calibrate import DEFAULT_WINDOWS

__all__ = ["ADAPTED_MAX", "AdaptedDomain", "WINDOW_SLACK_S", "adapted_domain", "drifted_at_capture", "supported_windows"]

# how long after a sample its device's next drift report may come and still be "its" window
WINDOW_SLACK_S = 120.0
ADAPTED_MAX = 300  # the newest drifted captures the baseline is calibrated on: 3 x the largest default window
SCAN_FACTOR = 4  # newest captures read per drifted capture wanted (some are from before the drift, or trained on)
CAPTURE_REASONS = ("drift", "low_confidence")  # not "reservoir" (see the module docstring)


@dataclass(frozen=True)
class AdaptedDomain:
    """The samples the ``adapted`` baseline is calibrated on, and why."""

    records: tuple[Any, ...]  # sample records
    source: str  # "drifted captures" | "all held-out"
    n_drifted: int  # drifted captures found that the model was not trained on
    n_holdout: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self.records), "n_drifted": self.n_drifted,
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


def adapted_domain(registry: Any, labelled: Sequence[Any], trained: set[str], holdout: Sequence[Any]
                   ) -> AdaptedDomain:
    """The samples to calibrate ``adapted`` on (see the module docstring).

    ``labelled``: the labelled sample records the retraining used; ``trained``: the ids of those it
    trained on; ``holdout``: the held-out records (the fallback)."""
    flags = drifted_at_capture([_key(r) for r in labelled], _reports(registry, labelled))
    devices = sorted({r.device_id for r, f in zip(labelled, flags, strict=True) if f})
    found: list[Any] = []
    if devices:
        recent = [r for r in registry.samples.newest(device_ids=devices, reasons=CAPTURE_REASONS,
                                                     limit=SCAN_FACTOR * ADAPTED_MAX) if r.id not in trained]
        drifted = drifted_at_capture([_key(r) for r in recent], _reports(registry, recent))
        found = [r for r, f in zip(recent, drifted, strict=True) if f][:ADAPTED_MAX]
    if supported_windows(len(found)) and supported_windows(len(found)) >= supported_windows(len(holdout)):
        return AdaptedDomain(tuple(found), "drifted captures", len(found), len(holdout))
    return AdaptedDomain(tuple(holdout), "all held-out", len(found), len(holdout))


def _key(r: Any) -> tuple[str, float, str | None]:
    return (r.device_id, float(r.ts), r.model_version)


def _reports(registry: Any, recs: Sequence[Any]) -> list[Any]:
    if not recs:
        return []
    return registry.drift_reports(device_ids=sorted({r.device_id for r in recs}), since=min(float(r.ts) for r in recs),
                                  until=max(float(r.ts) for r in recs) + WINDOW_SLACK_S)
