"""The retraining trigger, driven with a fake clock (pure logic, no fleet needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.errors import ConfigError
from fleet.policy import (
    CandidateGate,
    DriftPoint,
    FleetSnapshot,
    GatePolicy,
    RetrainPolicyConfig,
    TriggerPolicy,
    check_due,
    decide,
    persistently_alarmed,
)

CFG = RetrainPolicyConfig(alarm_devices=2, alarm_reports=3, alarm_persist_s=100.0, min_labelled_samples=500,
                          min_labels_for_drift=20, cooldown_s=1000.0, check_interval_s=60.0)


def series(*alarms: bool, start: float = 0.0, step: float = 10.0) -> list[DriftPoint]:
    return [DriftPoint(start + i * step, a) for i, a in enumerate(alarms)]


def test_persistence_needs_m_consecutive_alarms() -> None:
    assert persistently_alarmed(series(True, True, True), now=25.0, cfg=CFG)
    assert not persistently_alarmed(series(True, False, True, True), now=35.0, cfg=CFG)
    assert not persistently_alarmed(series(True, True, True, False), now=35.0, cfg=CFG)
    assert not persistently_alarmed([], now=0.0, cfg=CFG)


def test_persistence_by_duration() -> None:
    cfg = RetrainPolicyConfig(alarm_reports=50, alarm_persist_s=100.0)
    pts = series(False, True, True, step=60.0)  # alarm since t=60
    assert not persistently_alarmed(pts, now=150.0, cfg=cfg)
    assert persistently_alarmed(pts, now=160.0, cfg=cfg)
    off = RetrainPolicyConfig(alarm_reports=50, alarm_persist_s=0.0)
    assert not persistently_alarmed(pts, now=10_000.0, cfg=off)


def test_drift_trigger_fires_exactly_at_k_devices() -> None:
    one = {"a": series(True, True, True), "b": series(True, True, False), "c": series(False, False, False)}
    d = decide(CFG, FleetSnapshot(now=30.0, reports=one, labelled_since_model=40))
    assert not d.retrain and d.alarmed_devices == ("a",)
    two = dict(one, b=series(True, True, True))
    d = decide(CFG, FleetSnapshot(now=30.0, reports=two, labelled_since_model=40))
    assert d.retrain and d.trigger == "drift" and d.alarmed_devices == ("a", "b")


def test_drift_trigger_waits_for_labels_to_learn_from() -> None:
    reports = {"a": series(True, True, True), "b": series(True, True, True)}
    d = decide(CFG, FleetSnapshot(now=30.0, reports=reports, labelled_since_model=19))
    assert not d.retrain and "labelled" in d.reason
    assert decide(CFG, FleetSnapshot(now=30.0, reports=reports, labelled_since_model=20)).retrain


def test_label_count_trigger() -> None:
    assert not decide(CFG, FleetSnapshot(now=0.0, reports={}, labelled_since_model=499)).retrain
    d = decide(CFG, FleetSnapshot(now=0.0, reports={}, labelled_since_model=500))
    assert d.retrain and d.trigger == "labels"


def test_cooldown_and_running_job_block_the_trigger() -> None:
    snap = dict(reports={}, labelled_since_model=10_000)
    assert not decide(CFG, FleetSnapshot(now=1999.0, last_job_at=1000.0, **snap)).retrain
    assert decide(CFG, FleetSnapshot(now=2000.0, last_job_at=1000.0, **snap)).retrain
    assert not decide(CFG, FleetSnapshot(now=5000.0, job_running=True, **snap)).retrain
    disabled = RetrainPolicyConfig(enabled=False)
    assert not decide(disabled, FleetSnapshot(now=0.0, **snap)).retrain


def test_check_interval() -> None:
    assert check_due(None, 0.0, CFG)
    assert not check_due(100.0, 159.0, CFG)
    assert check_due(100.0, 160.0, CFG)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ConfigError):
        RetrainPolicyConfig(alarm_devices=0)
    with pytest.raises(ConfigError):
        GatePolicy(holdout_fraction=1.0)
    with pytest.raises(ConfigError, match=r"alarm_device: unknown key \(did you mean alarm_devices\?"):
        RetrainPolicyConfig.from_dict({"alarm_device": 3})
    with pytest.raises(ConfigError, match=r"\[gate\].min_holdout: expected an integer >= 1, got 0"):
        RetrainPolicyConfig.from_dict({"gate": {"min_holdout": 0}})
    cfg = RetrainPolicyConfig(alarm_devices=5, gate=CandidateGate(min_improvement=0.05))
    assert RetrainPolicyConfig.from_dict(cfg.to_dict()) == cfg
    assert GatePolicy is CandidateGate  # the old name still imports


def test_policy_from_fleet_config_is_the_same_schema() -> None:
    from fleet.config import default_config
    from fleet.policy import policy_from_fleet_config

    cfg = default_config("unused")
    assert isinstance(cfg.trigger, TriggerPolicy) and isinstance(cfg.acceptance, CandidateGate)
    pol = policy_from_fleet_config(cfg)
    # one definition per knob: the fleet.toml defaults are the policy's defaults
    assert pol == RetrainPolicyConfig()
    assert pol.alarm_persist_s == cfg.trigger.alarm_persist_s == 600.0
    tuned = dataclasses.replace(cfg, trigger=TriggerPolicy(min_labelled_samples=7, alarm_persist_s=30.0),
                                acceptance=CandidateGate(min_improvement=0.1),
                                rollout=dataclasses.replace(cfg.rollout, auto=False))
    pol = policy_from_fleet_config(tuned)
    assert (pol.min_labelled_samples, pol.alarm_persist_s, pol.gate.min_improvement, pol.auto_rollout) == \
        (7, 30.0, 0.1, False)


def test_fleet_toml_old_names_still_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fleet.config import load_config

    p = tmp_path / "fleet.toml"
    p.write_text("[trigger]\nlabelled_samples = 40\n[gate]\nmin_improvement = 0.05\n")
    with caplog.at_level("WARNING", logger="core.configfile"):
        cfg = load_config(p)
    assert cfg.trigger.min_labelled_samples == 40 and cfg.acceptance.min_improvement == 0.05
    assert "deprecated" in caplog.text
    p.write_text("[gate]\nmin_improvement = 0.05\n[acceptance]\nmin_improvement = 0.05\n")
    with pytest.raises(ConfigError, match=r"gate.*old name of acceptance"):
        load_config(p)


def test_drift_trigger_counts_labels_from_the_alarmed_devices_when_given() -> None:
    reports = {"a": series(True, True, True), "b": series(True, True, True)}
    snap = FleetSnapshot(now=30.0, reports=reports, labelled_since_model=100, labelled_during_alarm=5)
    d = decide(CFG, snap)
    assert not d.retrain and "5/20" in d.reason
    assert decide(CFG, FleetSnapshot(now=30.0, reports=reports, labelled_since_model=0,
                                     labelled_during_alarm=20)).retrain
