"""The retrained model's "adapted" drift domain is built from samples captured while their camera was drifted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.retrain_domains import adapted_domain, drifted_at_capture, supported_windows


@dataclass(frozen=True)
class Report:
    device_id: str
    ts: float
    model_version: str | None
    alarm: bool
    input_shift: bool = False


@dataclass(frozen=True)
class Sample:
    device_id: str
    ts: float
    model_version: str | None = "1"


class Reports:
    def __init__(self, reports: list[Report]) -> None:
        self.reports = reports

    def drift_reports(self, *, device_ids: list[str], since: float, until: float) -> list[Report]:
        return [r for r in self.reports if r.device_id in device_ids and since <= r.ts <= until]


def test_a_sample_belongs_to_the_drift_window_that_contains_it() -> None:
    reports = [Report("shifted", 10.0, "1", False), Report("shifted", 20.0, "1", True),
               Report("shifted", 30.0, "1", False, input_shift=True), Report("clean", 20.0, "1", False),
               Report("shifted", 40.0, "2", True)]  # another model's window says nothing about version 1's
    samples = [("shifted", 5.0, "1"), ("shifted", 15.0, "1"), ("shifted", 20.0, "1"), ("shifted", 25.0, "1"),
               ("clean", 15.0, "1"), ("shifted", 35.0, "1"), ("gone", 1.0, "1"), ("shifted", 15.0, None)]
    assert drifted_at_capture(samples, reports).tolist() == [False, True, True, True, False, False, False, False]
    # a report long after the sample is another window
    assert drifted_at_capture([("shifted", 0.0, "1")], [Report("shifted", 500.0, "1", True)]).tolist() == [False]


def test_windows_the_held_out_part_can_calibrate() -> None:
    assert supported_windows(74) == () and supported_windows(75) == (25,)
    assert supported_windows(180) == (25, 50) and supported_windows(300) == (25, 50, 100)


def test_adapted_domain_prefers_drifted_captures_and_falls_back_when_too_few() -> None:
    # 240 held-out: 160 from a camera in alarm, 80 low-confidence captures from a clean one
    reports = [Report("shifted", float(t), "1", True) for t in range(0, 420, 5)]
    reports += [Report("clean", float(t), "1", False) for t in range(0, 420, 5)]
    recs = [Sample("shifted", 2.0 * i) for i in range(160)] + [Sample("clean", 3.0 * i) for i in range(80)]
    got = adapted_domain(Reports(reports), recs)
    assert got.source == "drifted at capture" and got.n_drifted == 160 and got.n_holdout == 240
    assert np.array_equal(got.indices, np.arange(160))
    # 100 drifted of 180: they cannot calibrate the 50-input window that all 180 can, so all are used
    few = adapted_domain(Reports(reports), recs[60:])
    assert few.source == "all held-out" and few.n_drifted == 100 and np.array_equal(few.indices, np.arange(180))
    assert few.to_dict() == {"source": "all held-out", "n": 180, "n_drifted": 100, "n_holdout": 180}
    assert adapted_domain(Reports([]), []).n_holdout == 0
