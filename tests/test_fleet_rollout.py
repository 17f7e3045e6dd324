"""The rollout state machine (pure) with a fake clock."""

from __future__ import annotations

import json

import pytest

from edge_agent.errors import ConfigError, RolloutError
from fleet.rollout import (
    Deploy,
    HealthPolicy,
    HealthSample,
    JobOutcome,
    Rollback,
    RolloutPlan,
    RolloutState,
    abort,
    advance,
    assess_health,
    new_rollout,
    pause,
    resume,
    rollback,
    wave_sizes,
)

PLAN = RolloutPlan(canary=0.1, waves=(0.5, 1.0), soak_s=60.0, max_failures=0.05, job_timeout_s=300.0)
DEVICES = [(f"d{i:02d}", "1.0.0") for i in range(10)]


def done(actions: list, step: str = "completed", ok: bool = True) -> dict[str, JobOutcome]:
    return {a.job_id: JobOutcome(step, ok) for a in actions}


def test_wave_sizes() -> None:
    assert wave_sizes(10, PLAN) == [1, 4, 5]
    assert wave_sizes(6, RolloutPlan(canary=0.1, waves=(0.25, 0.5, 1.0))) == [1, 1, 1, 3]
    assert wave_sizes(1, PLAN) == [1]
    assert wave_sizes(20, RolloutPlan(canary=0.1, waves=(0.5,))) == [2, 8]  # stops at half the fleet
    with pytest.raises(ConfigError):
        RolloutPlan(waves=(0.5, 0.25))
    with pytest.raises(ConfigError):
        RolloutPlan(canary=0.0)


def test_happy_path_goes_through_every_wave() -> None:
    s = new_rollout("r1", "digits", "2.0.0", DEVICES, PLAN, now=0.0)
    s, acts = advance(s, 0.0)
    assert s.status == "running" and s.phase == "deploying" and acts == [Deploy("d00", "r1-w0-d00")]
    s, more = advance(s, 10.0)  # nothing reported yet
    assert more == [] and s.phase == "deploying"
    s, _ = advance(s, 20.0, done(acts))
    assert s.phase == "soaking"
    assert not s.wants_health(79.0) and s.wants_health(80.0)
    s, none = advance(s, 80.0)  # the driver must supply health first
    assert none == [] and s.phase == "soaking"
    s, acts = advance(s, 80.0, health={"d00": ()})
    assert s.wave == 1 and [a.device_id for a in acts] == ["d01", "d02", "d03", "d04"]
    s, _ = advance(s, 90.0, done(acts))
    s, acts = advance(s, 150.0, health={})
    assert s.wave == 2 and len(acts) == 5
    s, _ = advance(s, 160.0, done(acts))
    s, acts = advance(s, 220.0, health={})
    assert s.status == "completed" and s.terminal and acts == []
    assert s.counts() == {"updated": 10}
    kinds = [e.kind for e in s.events]
    assert kinds[0] == "created" and kinds[-1] == "completed" and kinds.count("wave_started") == 3


def test_failing_canary_halts_and_rolls_back() -> None:
    s, acts = advance(new_rollout("r2", "digits", "2.0.0", DEVICES, PLAN, now=0.0), 0.0)
    s, acts = advance(s, 5.0, {acts[0].job_id: JobOutcome("failed", False, "health check failed")})
    # the canary device failed by itself: nothing of ours to roll back
    assert s.status == "rolled_back" and "1/1 updates failed" in s.reason and acts == []
    assert all(d.status == "pending" for d in s.devices if d.wave > 0)


def test_unhealthy_wave_rolls_back_every_updated_device() -> None:
    s, acts = advance(new_rollout("r3", "digits", "2.0.0", DEVICES, PLAN, now=0.0), 0.0)
    s, _ = advance(s, 1.0, done(acts))
    s, acts = advance(s, 61.0, health={})
    s, _ = advance(s, 62.0, done(acts))
    s, acts = advance(s, 122.0, health={"d02": ("accuracy on feedback 95.0% -> 60.0%",)})
    assert s.status == "rolling_back" and "d02" in s.reason
    assert all(isinstance(a, Rollback) for a in acts)
    # the canary and the healthy devices of wave 1 are rolled back; d02 too (it runs the new version)
    assert {a.device_id for a in acts} == {"d00", "d01", "d02", "d03", "d04"}
    assert all(a.to_version == "1.0.0" for a in acts)
    s, _ = advance(s, 130.0, done(acts, "rolled_back"))
    assert s.status == "rolled_back" and s.counts()["rolled_back"] == 5


def test_job_timeout_counts_as_failure() -> None:
    s, acts = advance(new_rollout("r4", "m", "2", DEVICES[:2], RolloutPlan(canary=0.5, waves=(1.0,)), now=0.0), 0.0)
    s, _ = advance(s, 299.0)
    assert s.status == "running"
    s, rb = advance(s, 300.0)  # the device may have updated after all: roll it back
    assert s.status == "rolling_back" and s.device("d00").status == "rolling_back"
    assert [a.device_id for a in rb] == ["d00"]
    s, _ = advance(s, 601.0)  # no answer to the rollback either
    assert s.status == "rolled_back" and s.device("d00").status == "rollback_failed"


def test_max_failures_tolerates_a_share() -> None:
    plan = RolloutPlan(canary=0.5, waves=(1.0,), max_failures=0.25, soak_s=0.0)
    devs = [(f"x{i}", None) for i in range(8)]
    s, acts = advance(new_rollout("r5", "m", "2", devs, plan, now=0.0), 0.0)
    outcomes = done(acts)
    outcomes[acts[0].job_id] = JobOutcome("failed", False)
    s, _ = advance(s, 1.0, outcomes)  # 1/4 failed = 25 %, not more than 25 %
    assert s.phase == "soaking"
    s, acts = advance(s, 1.0, health={})
    assert s.wave == 1


def test_pause_freezes_and_resume_keeps_the_soak_clock() -> None:
    s, acts = advance(new_rollout("r6", "m", "2", DEVICES, PLAN, now=0.0), 0.0)
    s, _ = advance(s, 10.0, done(acts))  # soak starts at 10
    s = pause(s, 40.0)
    s, acts = advance(s, 500.0, health={})
    assert s.status == "paused" and acts == []
    s = resume(s, 1000.0)  # 30 s of soak were done before the pause
    assert not s.wants_health(1029.0) and s.wants_health(1030.0)
    s, acts = advance(s, 1030.0, health={})
    assert s.wave == 1 and len(acts) == 4


def test_abort_and_operator_rollback() -> None:
    s, acts = advance(new_rollout("r7", "m", "2", DEVICES, PLAN, now=0.0), 0.0)
    s, _ = advance(s, 1.0, done(acts))
    aborted = abort(s, 2.0)
    assert aborted.status == "aborted" and advance(aborted, 3.0) == (aborted, [])
    with pytest.raises(RolloutError):
        pause(aborted, 4.0)
    s, acts = rollback(s, 2.0)
    assert s.status == "rolling_back" and [a.device_id for a in acts] == ["d00"]


def test_state_round_trips_through_json() -> None:
    s, acts = advance(new_rollout("r8", "m", "2", DEVICES, PLAN, now=0.0), 0.0)
    s, _ = advance(s, 1.0, done(acts))
    again = RolloutState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    # a machine rebuilt from the stored state carries on exactly as the original would
    assert advance(again, 61.0, health={}) == advance(s, 61.0, health={})
    with pytest.raises(RolloutError):
        RolloutState.from_dict({"rollout_id": "x"})


def test_assess_health() -> None:
    pol = HealthPolicy()
    before = HealthSample(inferences=100, latency_p99_ms=2.0, mean_confidence=0.9, feedback_n=20, feedback_correct=19)
    good = HealthSample(inferences=100, errors=1, latency_p99_ms=3.0, mean_confidence=0.85,
                        feedback_n=20, feedback_correct=19)
    assert assess_health(before, good, pol) == ()
    bad = HealthSample(inferences=100, errors=10, latency_p99_ms=9.0, mean_confidence=0.5, drift_alarm=True,
                       feedback_n=20, feedback_correct=10)
    reasons = assess_health(before, bad, pol)
    assert len(reasons) == 5
    # too few labels say nothing about accuracy
    few = HealthSample(inferences=10, feedback_n=3, feedback_correct=0)
    assert assess_health(before, few, pol) == ()
