"""The shadow stage end to end: a real Mosquitto, the real ingest, registry and RolloutDriver,
simulated devices that shadow a candidate as edge_agent.shadow does (tests/plugins/canary_fleet.py).

The canary devices first run the candidate beside the serving model on the same inputs
(``DeployCommand(shadow=True)``: installed, never served); only when the shadow verdict
passes does the canary serve it.  The state machine's shadow transitions are tested
without a broker at the end."""

from __future__ import annotations

import pytest

from fleet.canary import CanaryPolicy, GroupData, judge_shadow
from fleet.rollout import JobOutcome, RolloutPlan, advance, new_rollout
from tests.plugins.canary_fleet import Profile, wait_for

GOOD = Profile()
POLICY = CanaryPolicy(min_feedback=20, max_extension_s=60.0, extension_step_s=0.5)


def plan(**kw) -> RolloutPlan:
    return RolloutPlan(canary=1 / 3, waves=(1.0,), soak_s=1.0, job_timeout_s=60.0, analysis=POLICY, shadow_s=1.0,
                       **kw)


@pytest.mark.broker
def test_a_disagreeing_candidate_is_stopped_at_the_shadow_stage_and_never_served(canary_fleet) -> None:
    fleet = canary_fleet({"a": 3, "b": 3}, {"1": GOOD, "2": Profile(agreement=0.3)})
    wait_for(lambda: fleet.telemetry_count() >= 30, what="telemetry before the rollout", timeout=300)
    s = fleet.driver.start("m", "2", plan(), rollout_id="r-shadow-bad")
    s = fleet.run(s.rollout_id, lambda s: False)
    assert s.status == "rolled_back", [e.detail for e in s.events]
    assert "shadow stage failed" in s.reason and "agreement" in s.reason
    assert [name for name, d in sorted(fleet.devices.items()) if d.shadowed] == ["cam-a0", "cam-a1"]
    assert all(not d.deploys for d in fleet.devices.values())  # no device was ever told to serve it
    assert {d.version for d in fleet.devices.values()} == {"1"} and all(d.shadow is None for d in fleet.devices.values())
    v = s.verdicts[-1]
    assert v["mode"] == "shadow" and v["decision"] == "fail" and v["canary"] == ["cam-a0", "cam-a1"]
    agreement = next(m for m in v["metrics"] if m["metric"] == "agreement")
    assert agreement["decision"] == "fail" and agreement["p_value"] < POLICY.alpha, agreement
    assert any("device cost" in n for n in v["notes"])
    kinds = [e.kind for e in s.events]
    assert "shadow_started" in kinds and "shadowing" in kinds and "wave_started" not in kinds


@pytest.mark.broker
def test_a_good_candidate_passes_the_shadow_stage_then_the_canary(canary_fleet) -> None:
    fleet = canary_fleet({"a": 3, "b": 3}, {"1": GOOD, "2": GOOD})
    wait_for(lambda: fleet.telemetry_count() >= 30, what="telemetry before the rollout", timeout=300)
    targets = ["cam-a0", "cam-a1", "cam-b0", "cam-b1"]  # cam-a2 and cam-b2 stay on 1: every wave has a control
    s = fleet.driver.start("m", "2", RolloutPlan(canary=0.5, waves=(1.0,), soak_s=1.0, job_timeout_s=60.0,
                                                 analysis=POLICY, shadow_s=1.0, shadow_every=5),
                           devices=targets, rollout_id="r-shadow-good")
    s = fleet.run(s.rollout_id, lambda s: False)
    assert s.status == "completed", (s.reason, [f"{e.kind}: {e.detail[:400]}" for e in s.events[-4:]])
    shadow = [v for v in s.verdicts if v["mode"] == "shadow"]
    assert shadow and shadow[-1]["decision"] == "pass", shadow
    later = [v for v in s.verdicts if v["mode"] != "shadow"]
    assert later and later[0]["wave"] == 0 and later[-1]["decision"] == "pass"
    kinds = [e.kind for e in s.events]
    assert kinds.index("shadow_passed") < kinds.index("wave_started")
    assert fleet.devices["cam-a0"].shadowed and fleet.devices["cam-a0"].deploys  # shadowed first, then served
    assert {name: d.version for name, d in fleet.devices.items()} == {
        "cam-a0": "2", "cam-a1": "2", "cam-a2": "1", "cam-b0": "2", "cam-b1": "2", "cam-b2": "1"}


@pytest.mark.broker
def test_disagreeing_where_the_serving_model_drifted_is_not_held_against_a_retrained_candidate(canary_fleet) -> None:
    """The retraining loop's case: on devices whose inputs drifted, the candidate answers otherwise than the model
    it replaces -- that is the point -- so agreement does not vote there; the other metrics and the canary do."""
    fleet = canary_fleet({"a": 3, "b": 3}, {"1": Profile(drift_alarm=True), "2": Profile(agreement=0.3)})
    wait_for(lambda: fleet.telemetry_count() >= 30, what="telemetry before the rollout", timeout=300)
    s = fleet.driver.start("m", "2", plan(), rollout_id="r-shadow-drifted")
    s = fleet.run(s.rollout_id, lambda s: False)
    shadow = [v for v in s.verdicts if v["mode"] == "shadow"]
    assert shadow and shadow[-1]["decision"] == "pass", (s.reason, shadow[-1:])
    agreement = next(m for m in shadow[-1]["metrics"] if m["metric"] == "agreement")
    assert agreement["decision"] == "skipped" and "drifted" in agreement["note"], agreement
    kinds = [e.kind for e in s.events]
    assert kinds.index("shadow_passed") < kinds.index("wave_started")  # then the canary served it (judged there)
    assert all(fleet.devices[d].deploys for d in shadow[-1]["canary"])


def test_agreement_counts_only_devices_on_the_serving_models_own_ground() -> None:
    cand = GroupData(devices=("d0", "d1"), attempts=400, latency_hist={"40": 400})
    serv = GroupData(devices=("d0", "d1"), attempts=400, latency_hist={"40": 400})
    mixed = judge_shadow(cand, serv, 60, CanaryPolicy(), compared=200, drifted=["d1"])  # d0: 60/200 agree
    m = next(m for m in mixed.metrics if m.metric == "agreement")
    assert mixed.decision == "fail" and m.decision == "fail" and m.n_canary == 200 and "d1 not counted" in m.note


def test_shadow_machine_skips_the_stage_when_no_device_can_shadow() -> None:
    """Agents without shadowing reject the command (strict decoding): the canary goes on as usual."""
    p = RolloutPlan(canary=0.5, waves=(1.0,), soak_s=10.0, job_timeout_s=30.0, shadow_s=20.0)
    s, acts = advance(new_rollout("r", "m", "2", [("d0", "1"), ("d1", "1")], p, now=0.0), 0.0)
    assert s.phase == "shadow_deploying" and [a.shadow for a in acts] == [True]
    s, acts = advance(s, 31.0)  # nobody answered before the job timeout
    assert s.phase == "deploying" and [a.shadow for a in acts] == [False]
    assert [e.kind for e in s.events][-2:] == ["shadow_skipped", "wave_started"]
    # and with an answer: shadowing, then a verdict decides
    s, acts = advance(new_rollout("r", "m", "2", [("d0", "1"), ("d1", "1")], p, now=0.0), 0.0)
    s, _ = advance(s, 1.0, {acts[0].job_id: JobOutcome("completed")})
    assert s.phase == "shadowing" and s.device("d0").status == "shadowing" and not s.wants_health(20.0)
    assert s.wants_health(21.0)
    agree = judge_shadow(GroupData(devices=("d0",), attempts=200, latency_hist={"40": 200}),
                         GroupData(devices=("d0",), attempts=200, latency_hist={"40": 200}), 40, CanaryPolicy())
    s, acts = advance(s, 21.0, verdict=agree)
    assert agree.decision == "fail" and s.status == "rolling_back"
    assert [(type(a).__name__, a.to_version) for a in acts] == [("Rollback", "1")]
