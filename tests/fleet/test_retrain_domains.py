"""The retrained model's "adapted" drift domain is built from samples captured while their camera was drifted."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.retrain_domains import ADAPTED_MAX, adapted_domain, drifted_at_capture, supported_windows


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
    reason: str = "drift"
    id: str = ""


class Fleet:
    """The two registry queries adapted_domain makes, over lists."""

    def __init__(self, reports: list[Report], samples: list[Sample]) -> None:
        self.reports, self.samples = reports, self
        self.stored = samples

    def drift_reports(self, *, device_ids: list[str], since: float, until: float) -> list[Report]:
        return [r for r in self.reports if r.device_id in device_ids and since <= r.ts <= until]

    def newest(self, *, device_ids: list[str], reasons: tuple[str, ...], limit: int) -> list[Sample]:
        found = [s for s in self.stored if s.device_id in device_ids and s.reason in reasons]
        return sorted(found, key=lambda s: -s.ts)[:limit]


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


def test_adapted_domain_is_the_newest_drifted_captures_not_trained_on() -> None:
    reports = [Report("shifted", float(t), "1", t >= 100) for t in range(0, 3000, 5)]  # drifted from t=100 on
    reports += [Report("clean", float(t), "1", False) for t in range(0, 3000, 5)]
    stored = [Sample("shifted", float(t), id=f"s{t}") for t in range(0, 2000)]  # one capture a second
    stored += [Sample("shifted", t + 0.5, reason="reservoir", id=f"r{t}") for t in range(0, 2000)]  # look clean
    stored += [Sample("clean", float(t), reason="low_confidence", id=f"c{t}") for t in range(0, 2000)]
    labelled = [s for s in stored if s.id in {"s150", "s160", "c170", "s50"}]  # 2 drifted, 1 before, 1 clean
    trained = {"s1999", "s1998"}
    holdout = labelled[:2]
    got = adapted_domain(Fleet(reports, stored), labelled, trained, holdout)
    assert got.source == "drifted captures" and got.n_drifted == ADAPTED_MAX and got.n_holdout == 2
    assert [r.id for r in got.records[:2]] == ["s1997", "s1996"] and {r.device_id for r in got.records} == {"shifted"}
    assert got.to_dict() == {"source": "drifted captures", "n": ADAPTED_MAX, "n_drifted": ADAPTED_MAX, "n_holdout": 2}
    # 104 drifted captures (t = 96..199: 96-99 are in the first window in alarm) cannot calibrate the
    # 50-input window that 180 held-out samples can: those are used
    few = [s for s in stored if s.id.startswith("c") or (s.id.startswith("s") and float(s.ts) < 200)]
    held = [Sample("clean", float(t), reason="low_confidence", id=f"h{t}") for t in range(180)]
    fallback = adapted_domain(Fleet(reports, few), labelled, set(), held)
    assert fallback.source == "all held-out" and fallback.n_drifted == 104 and fallback.records == tuple(held)
    # nothing drifted among the labels: nothing to search
    none = adapted_domain(Fleet(reports, stored), [s for s in labelled if s.id == "c170"], set(), held)
    assert none.source == "all held-out" and none.n_drifted == 0
