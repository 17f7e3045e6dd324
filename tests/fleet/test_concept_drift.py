"""fleet.concept_drift: calibrated CUSUM on feedback errors, per slice; concept drift vs input drift; the
fleet wiring (registry labels -> alarms per slice -> /api/concept-drift -> the retrain trigger)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from core.drift import DriftFeatures, DriftMonitor, calibrate
from core.errors import ConfigError
from fleet.concept_drift import (
    ConceptDriftConfig,
    ConceptDriftTracker,
    ErrorCusum,
    concept_drift_status,
    cusum_threshold,
    fleet_concept_drift,
    with_concept_drift,
)
from fleet.config import config_from_dict, default_config
from fleet.policy import FleetSnapshot, RetrainPolicyConfig, decide, policy_from_fleet_config
from fleet.registry import Registry, SampleRecord


def test_cusum_false_alarm_rate_is_the_budget() -> None:
    cfg = ConceptDriftConfig(budget=0.05, horizon=300, warmup=10, reference_error=0.05)
    rng = np.random.default_rng(0)
    fired = 0
    for _ in range(400):
        c = ErrorCusum(cfg)
        fired += any(c.update(bool(e)) for e in rng.random(300) < 0.05)
    assert 0.02 <= fired / 400 <= 0.09  # 5 % budget, 400 streams
    assert cusum_threshold(0.05, 0.1, 300, 0.01) > cusum_threshold(0.05, 0.1, 300, 0.05)


def _stream(rng: np.random.Generator, n: int, flipped: set[str]) -> list[tuple[str, str, str, str]]:
    """(device, group, true, predicted): a 97 %-accurate model; on flipped devices class 3 is now labelled 8."""
    out = []
    for _ in range(n):
        dev = f"cam-{rng.integers(6)}"
        y = str(rng.integers(10))
        pred = y if rng.random() < 0.97 else str(rng.integers(10))
        true = "8" if (dev in flipped and y == "3") else y
        out.append((dev, "north" if dev < "cam-3" else "south", true, pred))
    return out


def test_label_mapping_flip_fires_concept_drift_but_not_input_drift() -> None:
    rng = np.random.default_rng(1)
    tracker = ConceptDriftTracker(ConceptDriftConfig(horizon=2000))
    for dev, group, true, pred in _stream(rng, 3000, set()):
        tracker.update(dev, true, pred, group=group)
    assert tracker.alarms() == []
    for dev, group, true, pred in _stream(rng, 8000, {"cam-4", "cam-5"}):
        tracker.update(dev, true, pred, group=group)
    alarms = tracker.alarms()
    assert {"device:cam-4", "device:cam-5", "group:south"} <= set(alarms)
    assert not any(a in alarms for a in ("device:cam-0", "device:cam-1", "device:cam-2", "group:north"))
    snap = {s.slice: s for s in tracker.snapshot()}
    assert snap["device:cam-4"].accuracy < snap["device:cam-0"].accuracy

    # The inputs are untouched, so the input-drift monitor stays quiet on the same cameras.
    def feats(n: int) -> DriftFeatures:
        y = rng.integers(0, 4, n)
        emb = np.eye(4)[y] * 3 + rng.normal(size=(n, 4))
        p = np.exp(emb)
        return DriftFeatures(inputs=rng.uniform(size=(n, 1, 8, 8)).astype(np.float32), probs=p / p.sum(1, keepdims=True),
                             embedding=emb)

    mon = DriftMonitor(calibrate(feats(200), feats(200), windows=(25,), n_boot=400))
    assert np.mean([r.alarm for r in mon.update(feats(25 * 100))]) <= 0.05



def _quiet_input_monitor(rng: np.random.Generator) -> float:
    """Fraction of windows with the input-drift alarm on for untouched inputs (the same cameras' frames)."""
    def feats(n: int) -> DriftFeatures:
        y = rng.integers(0, 4, n)
        emb = np.eye(4)[y] * 3 + rng.normal(size=(n, 4))
        p = np.exp(emb)
        return DriftFeatures(inputs=rng.uniform(size=(n, 1, 8, 8)).astype(np.float32),
                             probs=p / p.sum(1, keepdims=True), embedding=emb)

    mon = DriftMonitor(calibrate(feats(200), feats(200), windows=(25,), n_boot=400))
    return float(np.mean([r.alarm for r in mon.update(feats(25 * 60))]))


@pytest.fixture
def labelled_fleet(tmp_path: Path) -> Registry:
    """Six cameras in two groups; feedback labels for 6,000 predictions, class 3 relabelled 8 on cam-4/5 after 2,000."""
    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    for i in range(6):
        reg.devices.upsert(f"cam-{i}", tags={"group": "north" if i < 3 else "south"})
    rng = np.random.default_rng(7)
    stream = _stream(rng, 2000, set()) + _stream(rng, 4000, {"cam-4", "cam-5"})
    t0 = 1_700_000_000.0
    reg.add_samples([SampleRecord(f"s{i:06d}", dev, t0 + i, f"{dev}/s{i}.bin", 1, received=t0 + i, model_version="2",
                                  prediction=pred) for i, (dev, _g, _y, pred) in enumerate(stream)])
    reg.labels.apply([(f"s{i:06d}", true, "feedback") for i, (_d, _g, true, _p) in enumerate(stream)])
    # a teacher's pseudo-labels never count as evidence of concept drift
    reg.add_samples([SampleRecord("t1", "cam-0", t0, "cam-0/t1.bin", 1, received=t0, prediction="1")])
    reg.labels.apply([("t1", "7", "teacher")])
    return reg


def test_feedback_labels_in_the_registry_raise_concept_alarms_per_slice(labelled_fleet: Registry) -> None:
    status = concept_drift_status(labelled_fleet, ConceptDriftConfig(horizon=2000))
    assert status.labels == 6000
    alarms = set(status.alarm_slices)
    assert {"device:cam-4", "device:cam-5", "group:south"} <= alarms
    assert not alarms & {"device:cam-0", "device:cam-1", "device:cam-2", "group:north"}
    by_group = status.accuracy("group")
    assert by_group["south"] < by_group["north"] - 0.03  # the failing group is visible while the average holds
    assert status.accuracy("class")["8"] < status.accuracy("class")["5"]
    assert len(status.accuracy("hour")) >= 1
    a = next(a for a in status.alarms if a.slice == "device:cam-4")
    assert (a.kind, a.key) == ("device", "cam-4") and a.alarm_at is not None and a.alarm_ts is not None
    d = status.to_dict()
    assert {r["slice"] for r in d["slices"]} >= {"fleet", "device:cam-4", "group:south", "class:3"}
    # the inputs are untouched: the input-drift alarm stays quiet on the same cameras
    assert _quiet_input_monitor(np.random.default_rng(3)) <= 0.05
    assert not concept_drift_status(labelled_fleet, ConceptDriftConfig(enabled=False)).alarms


def test_concept_alarms_trigger_retraining_like_the_drift_alarm(labelled_fleet: Registry) -> None:
    cfg = dataclasses.replace(default_config("unused"), concept=ConceptDriftConfig(horizon=2000))
    policy = policy_from_fleet_config(cfg)
    assert policy.concept == cfg.concept
    snap = FleetSnapshot(now=1e9, reports={}, labelled_since_model=100)
    wired = with_concept_drift(snap, labelled_fleet, policy.concept, model_version="2")
    assert "device:cam-4" in wired.concept_alarms
    decision = decide(policy, wired)
    assert decision.retrain and decision.trigger == "concept" and "device:cam-4" in decision.concept_alarms
    assert not decide(dataclasses.replace(policy, concept_drift=False), wired).retrain  # [trigger].concept_drift
    assert not decide(policy, snap).retrain  # without the alarms: 100 labels are not enough on their own


def test_concept_drift_api_serves_slices_and_alarms(labelled_fleet: Registry, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fleet.api import create_app

    cfg = dataclasses.replace(default_config(tmp_path / "f"), concept=ConceptDriftConfig(horizon=2000))
    body = TestClient(create_app(cfg, labelled_fleet)).get("/api/concept-drift", params={"model_version": "2"}).json()
    assert "device:cam-4" in {a["slice"] for a in body["alarms"]} and body["labels"] == 6000
    groups = {r["key"]: r["accuracy"] for r in body["slices"] if r["kind"] == "group"}
    assert groups["south"] < groups["north"]
    assert fleet_concept_drift(labelled_fleet, cfg).labels == 6000  # no model in service: every feedback label


def test_concept_section_of_fleet_toml() -> None:
    cfg = config_from_dict({"concept": {"budget": 0.001, "horizon": 500, "group_tag": "site"},
                            "trigger": {"concept_drift": False}})
    assert cfg.concept.budget == 0.001 and cfg.concept.group_tag == "site" and not cfg.trigger.concept_drift
    with pytest.raises(ConfigError, match="budget"):
        config_from_dict({"concept": {"budget": 0.7}})
    with pytest.raises(ConfigError, match="unknown"):
        config_from_dict({"concept": {"budgte": 0.01}})
    assert RetrainPolicyConfig.from_dict(RetrainPolicyConfig().to_dict()) == RetrainPolicyConfig()
