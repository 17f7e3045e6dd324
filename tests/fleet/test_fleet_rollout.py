"""The rollout state machine (pure) with a fake clock."""

from __future__ import annotations

import json

import pytest

from core.errors import ConfigError, RolloutError
from fleet.canary import CanaryPolicy
from fleet.rollout import (
    Deploy,
    JobOutcome,
    Rollback,
    RolloutPlan,
    RolloutState,
    abort,
    advance,
    new_rollout,
    pause,
    resume,
    rollback,
    wave_sizes,
)

PLAN = RolloutPlan(canary=0.1, waves=(0.5, 1.0), soak_s=60.0, max_failures=0.05, job_timeout_s=300.0)
# The driver tests below are about the mechanics (restarts, re-sends): no telemetry, so the
# canary analysis is inconclusive at once and proceeds with a warning.
BLIND = CanaryPolicy(max_extension_s=0.0, on_inconclusive="proceed")
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


def _verdict(decision: str, metric: str = "latency"):
    from fleet.canary import MetricResult, Verdict

    m = MetricResult(metric, {"pass": "pass", "fail": "fail"}.get(decision, "insufficient"), "c", "k")
    return Verdict(decision, 100.0 if decision == "pass" else None, "control", (m,), ("d00",), ("d05",))


def test_failed_canary_analysis_rolls_back_with_the_evidence() -> None:
    s, acts = advance(new_rollout("rv", "m", "2", DEVICES, PLAN, now=0.0), 0.0)
    s, _ = advance(s, 1.0, done(acts))
    s, rbs = advance(s, 61.0, verdict=_verdict("fail"))
    assert s.status == "rolling_back" and "canary failed the canary analysis" in s.reason
    assert [a.device_id for a in rbs] == ["d00"]
    (v,) = s.verdicts
    assert v["wave"] == 0 and v["decision"] == "fail" and v["metrics"][0]["metric"] == "latency"
    assert RolloutState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_inconclusive_analysis_extends_the_soak_then_holds() -> None:
    from fleet.canary import CanaryPolicy

    plan = RolloutPlan(canary=0.1, waves=(1.0,), soak_s=60.0,
                       analysis=CanaryPolicy(max_extension_s=120.0, on_inconclusive="hold"))
    s, acts = advance(new_rollout("rh", "m", "2", DEVICES, plan, now=0.0), 0.0)
    s, _ = advance(s, 0.0, done(acts))
    s, _ = advance(s, 60.0, verdict=_verdict("inconclusive"))
    assert s.phase == "soaking" and s.soak_extended_s == 60.0 and s.events[-1].kind == "soak_extended"
    assert not s.wants_health(119.0) and s.wants_health(120.0)
    s, _ = advance(s, 120.0, verdict=_verdict("inconclusive"))
    assert s.soak_extended_s == 120.0
    s, acts = advance(s, 180.0, verdict=_verdict("inconclusive"))
    assert s.status == "paused" and s.held and acts == [] and s.events[-1].kind == "held"
    assert "resume to accept" in s.reason and len(s.verdicts) == 3
    # the operator looked at the evidence and resumes: the wave is accepted, the next one starts
    s = resume(s, 500.0)
    assert not s.held and s.accepted_wave == 0 and s.wants_health(500.0)
    s, acts = advance(s, 500.0, verdict=_verdict("inconclusive"))
    assert s.wave == 1 and len(acts) == 9 and any(e.kind == "warning" for e in s.events)
    # ... but data showing the model is worse still stops it
    s, _ = advance(s, 501.0, done(acts))
    s, _ = advance(s, 561.0, verdict=_verdict("fail"))
    assert s.status == "rolling_back"


def test_inconclusive_analysis_may_proceed_with_a_warning() -> None:
    from fleet.canary import CanaryPolicy

    plan = RolloutPlan(canary=0.5, waves=(1.0,), soak_s=10.0,
                       analysis=CanaryPolicy(max_extension_s=10.0, on_inconclusive="proceed"))
    s, acts = advance(new_rollout("rp", "m", "2", DEVICES[:2], plan, now=0.0), 0.0)
    s, _ = advance(s, 0.0, done(acts))
    s, _ = advance(s, 10.0, verdict=_verdict("marginal"))
    assert s.events[-1].kind == "soak_extended"
    s, acts = advance(s, 20.0, verdict=_verdict("inconclusive"))
    assert s.wave == 1 and [e.kind for e in s.events if e.kind == "warning"] == ["warning"]
    assert "on_inconclusive = proceed" in next(e.detail for e in s.events if e.kind == "warning")


def test_reports_in_transit_extend_the_soak_on_a_budget_of_their_own() -> None:
    """Reports that reach the fleet late (a backlog, not silence) do not use up the budget for missing data:
    a quick demo under load once had its canary's telemetry arrive 114-187 s after it was sent, and its
    120 s of extensions ran out with nothing to judge."""
    import dataclasses

    plan = RolloutPlan(canary=0.1, waves=(1.0,), soak_s=60.0,
                       analysis=CanaryPolicy(max_extension_s=120.0, on_inconclusive="hold"))
    s, acts = advance(new_rollout("rt", "m", "2", DEVICES, plan, now=0.0), 0.0)
    s, _ = advance(s, 0.0, done(acts))
    late = dataclasses.replace(_verdict("inconclusive"), transit_s=150.0)
    s, _ = advance(s, 60.0, verdict=late)
    assert (s.transit_waited_s, s.soak_extended_s) == (60.0, 0.0) and s.events[-1].kind == "soak_extended"
    assert "in transit" in s.events[-1].detail and "150 s after they were sent" in s.events[-1].detail
    assert not s.wants_health(119.0) and s.wants_health(120.0)
    s, _ = advance(s, 120.0, verdict=late)
    assert (s.transit_waited_s, s.soak_extended_s) == (120.0, 0.0)
    s, _ = advance(s, 180.0, verdict=late)  # its own budget spent: now it counts as missing data
    assert (s.transit_waited_s, s.soak_extended_s) == (120.0, 60.0) and "in transit" not in s.events[-1].detail
    # a step's lateness is normal delivery, not a backlog
    s, _ = advance(s, 240.0, verdict=dataclasses.replace(_verdict("inconclusive"), transit_s=30.0))
    assert s.soak_extended_s == 120.0
    s, _ = advance(s, 300.0, verdict=late)
    assert s.status == "paused" and s.held
    assert [v["transit_s"] for v in s.verdicts] == [150.0, 150.0, 150.0, 30.0, 150.0]
    assert RolloutState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # the data arrived: a late pass decides at once
    s, acts = advance(new_rollout("rt2", "m", "2", DEVICES, plan, now=0.0), 0.0)
    s, _ = advance(s, 0.0, done(acts))
    s, acts = advance(s, 60.0, verdict=dataclasses.replace(_verdict("pass"), transit_s=150.0))
    assert s.wave == 1 and len(acts) == 9


def test_old_rollout_state_with_the_before_after_health_policy_loads() -> None:
    s, _ = advance(new_rollout("rold", "m", "2", DEVICES[:2], PLAN, now=0.0), 0.0)
    data = json.loads(json.dumps(s.to_dict()))
    del data["plan"]["analysis"], data["verdicts"], data["soak_extended_s"], data["held"], data["accepted_wave"]
    data["plan"]["health"] = {"max_latency_ratio": 2.0}
    assert RolloutState.from_dict(data) == s


# --------------------------------------------------------------------------- driver + registry


class Recorder:
    """The driver's Publisher seam, recording what would go on the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def take(self) -> list:
        from core.protocol import decode

        out = [decode(p) for _t, p in self.sent]
        self.sent.clear()
        return out


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fleet(tmp_path, n: int = 4):
    from core.protocol import DeviceState
    from fleet.registry import IngestBatch, Registry

    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    bundle = tmp_path / "m-2.elb"
    bundle.write_bytes(b"not really a bundle, the driver only sends its size and hash")
    reg.add_model_version("m", "2", status="accepted", bundle_path=str(bundle), sha256="ab" * 32,
                          size=bundle.stat().st_size)
    states = [(DeviceState(f"cam{i}", True, model_name="m", model_version="1", delivery=("http", "mqtt")), 1.0)
              for i in range(n)]
    reg.apply(IngestBatch(states=states))
    return reg


def _answer(reg, cmds, step: str = "completed", ok: bool = True, t: float = 0.0) -> None:
    from core.protocol import JobStatus
    from fleet.registry import IngestBatch

    jobs = [(JobStatus(c.job_id.split("-")[-1], c.job_id, getattr(c, "version", "1"), step, ok=ok, ts=t), t)
            for c in cmds]
    reg.apply(IngestBatch(jobs=jobs))


def test_driver_restart_mid_rollout_resumes_from_the_database(tmp_path) -> None:
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path)
    pub, clock = Recorder(), Clock()
    plan = RolloutPlan(canary=0.25, waves=(1.0,), soak_s=30.0, job_timeout_s=100.0, analysis=BLIND)
    drv = RolloutDriver(reg, pub, api_base_url="http://fleet:8080", clock=clock)
    s = drv.start("m", "2", plan, rollout_id="r-restart")
    cmds = pub.take()
    assert [c.job_id for c in cmds] == ["r-restart-w0-cam0"] and cmds[0].url == "http://fleet:8080/bundles/m/2.elb"
    _answer(reg, cmds, t=clock.t)
    clock.t += 1
    s = drv.tick_one("r-restart")
    assert s.phase == "soaking"
    assert reg.rollout("r-restart").status == "running"
    del drv  # the fleet dies here

    clock.t += 31
    drv2 = RolloutDriver(reg.__class__.open(f"sqlite:///{tmp_path / 'fleet.db'}"), pub,
                         api_base_url="http://fleet:8080", clock=clock)
    assert [a.rollout_id for a in drv2.active()] == ["r-restart"]
    s = drv2.tick()[0]
    assert s.wave == 1
    cmds = pub.take()
    assert sorted(c.device_id if hasattr(c, "device_id") else c.job_id.split("-")[-1] for c in cmds) == \
        ["cam1", "cam2", "cam3"]
    # a second restart before any device answered: the deploys are sent again, same job ids
    drv3 = RolloutDriver(reg, pub, api_base_url="http://fleet:8080", clock=clock)
    drv3.tick()
    again = pub.take()
    assert sorted(c.job_id for c in again) == sorted(c.job_id for c in cmds)
    _answer(reg, cmds, t=clock.t)
    clock.t += 31
    drv3.tick()
    clock.t += 31
    s = drv3.tick()[0] if drv3.active() else drv3.load("r-restart")
    assert s.status == "completed", s.events
    assert reg.rollout("r-restart").status == "completed"
    assert {t.status for t in reg.rollout_targets("r-restart")} == {"updated"}


def test_driver_failing_canary_sends_rollback(tmp_path) -> None:
    from core.protocol import RollbackCommand
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path, n=3)
    pub, clock = Recorder(), Clock()
    drv = RolloutDriver(reg, pub, api_base_url="http://fleet:8080", clock=clock)
    drv.start("m", "2", RolloutPlan(canary=0.34, waves=(1.0,), soak_s=0.0, job_timeout_s=10.0), rollout_id="r-bad")
    cmds = pub.take()
    assert len(cmds) == 2  # ceil(0.34 * 3)
    _answer(reg, cmds[:1], t=clock.t)  # one updates, the other never answers
    clock.t += 11
    s = drv.tick_one("r-bad")
    assert s.status == "rolling_back"
    rbs = pub.take()
    assert all(isinstance(r, RollbackCommand) and r.to_version == "1" for r in rbs) and len(rbs) == 2
    assert reg.rollout("r-bad").status == "halted"
    _answer(reg, rbs, step="rolled_back", t=clock.t)
    clock.t += 1
    s = drv.tick_one("r-bad")
    assert s.status == "rolled_back" and reg.rollout("r-bad").status == "rolled_back"


def test_driver_pause_resume_abort_and_mqtt_delivery(tmp_path) -> None:
    from core import chunks
    from core.protocol import BundleRequest
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path, n=2)
    pub, clock = Recorder(), Clock()
    drv = RolloutDriver(reg, pub, delivery="mqtt", chunk_size=16 * 1024, clock=clock)
    drv.start("m", "2", RolloutPlan(canary=0.5, waves=(1.0,), soak_s=5.0), rollout_id="r-ops")
    (cmd,) = pub.take()
    assert cmd.delivery == "mqtt" and cmd.url is None
    n = drv.handle_bundle_request(BundleRequest("cam0", cmd.job_id, "2", start=0))
    frames = [chunks.parse_frame(p) for _t, p in pub.sent]
    assert n == len(frames) >= 1 and frames[0].transfer_id == cmd.job_id
    assert b"".join(f.data for f in frames) == (tmp_path / "m-2.elb").read_bytes()
    pub.sent.clear()
    assert drv.pause("r-ops").status == "paused"
    assert reg.rollout("r-ops").status == "paused"
    assert drv.resume("r-ops").status == "running"
    assert drv.abort("r-ops").status == "aborted"
    assert drv.active() == []
    with pytest.raises(RolloutError):
        drv.start("m", "3", PLAN)


def test_target_selects_devices_by_tag_and_is_kept_in_the_state(tmp_path) -> None:
    from fleet.rollout import parse_target
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path, n=4)
    reg.upsert_device("cam1", tags={"group": "cams-north"})
    reg.upsert_device("cam3", tags={"group": "cams-north", "site": "b"})
    reg.upsert_device("cam2", tags={"group": "cams-south"})
    pub = Recorder()
    drv = RolloutDriver(reg, pub, delivery="mqtt", clock=Clock())
    s = drv.start("m", "2", RolloutPlan(canary=0.5, waves=(1.0,), soak_s=5.0), target="group=cams-north",
                  rollout_id="r-north")
    assert sorted(d.device_id for d in s.devices) == ["cam1", "cam3"] and s.target == "group=cams-north"
    assert "group=cams-north" in s.events[0].detail
    assert drv.load("r-north").target == "group=cams-north"  # persisted with the state
    assert {c.job_id.split("-")[-1] for c in pub.take()} <= {"cam1", "cam3"}
    drv.abort("r-north")
    # several pairs must all match; no match is a one-line error naming the target
    assert [d.device_id for d in drv.start("m", "2", PLAN, target="group=cams-north,site=b").devices] == ["cam3"]
    drv.abort(drv.active()[0].rollout_id)
    with pytest.raises(RolloutError, match="group=nowhere"):
        drv.start("m", "2", PLAN, target="group=nowhere")
    with pytest.raises(RolloutError, match="not both"):
        drv.start("m", "2", PLAN, target="group=cams-north", devices=["cam0"])
    assert str(parse_target(None)) == "all" and parse_target("all").everything
    for bad in ("group", "=x", "group=", "gr oup=x"):
        with pytest.raises(ConfigError):
            parse_target(bad)
    # the agent may report its group itself (hardware); a fleet-set tag wins over it
    sel = parse_target("group=a")
    assert sel.matches({}, {"group": "a"}) and not sel.matches({"group": "b"}, {"group": "a"})


@pytest.mark.parametrize(("flags", "says"), [
    (["--target", "group"], ["bad rollout target 'group'", "group=cams-north"]),
    (["--at", "tomorrow"], ["--at 'tomorrow'", "2026-12-03T02:00:00+00:00", "+2h"]),
    (["--at", "2020-01-01T00:00:00+00:00"], ["not in the future", "2026-12-03T02:00:00+00:00"]),
    (["--at", "2026-12-03T02:00:00"], ["has no timezone", "+30m"]),
    (["--window", "1-5"], ["maintenance window '1-5'", "--window 01:00-05:00"]),
])
def test_cli_refuses_bad_flags_before_touching_anything(tmp_path, capsys, flags, says) -> None:
    from edgeloop.cli import main
    from fleet.config import load_config
    from fleet.registry import Registry

    cfg = str(tmp_path / "fleet" / "fleet.toml")
    assert main(["fleet", "init", "--dir", str(tmp_path / "fleet")]) == 0
    capsys.readouterr()
    assert main(["fleet", "rollout", "m:2", *flags, "-c", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert all(x in err for x in says) and "\n" not in err, err
    assert Registry.open(load_config(cfg).database_url).rollouts() == []  # nothing stored


def test_cli_parsers() -> None:
    import argparse

    from fleet.cli_rollout import parse_duration, parse_share, register_rollout

    assert parse_share("10%") == pytest.approx(0.1) and parse_share("25") == pytest.approx(0.25)
    assert parse_share("0.5") == 0.5 and parse_share("100") == 1.0
    assert parse_duration("60s") == 60 and parse_duration("2m") == 120 and parse_duration("90") == 90
    with pytest.raises(ConfigError):
        parse_share("lots")
    with pytest.raises(ConfigError):
        parse_duration("soon")
    parser = argparse.ArgumentParser()
    register_rollout(parser.add_subparsers())
    args = parser.parse_args(["rollout", "m-2.elb", "--canary", "10%", "--waves", "25,50,100", "--soak", "60s",
                              "--max-failures", "5%", "--json"])
    assert args.canary == "10%" and args.json and args.func.__name__ == "_cmd_rollout" and args.target is None
    assert parser.parse_args(["rollout", "m:2", "--target", "group=cams-north"]).target == "group=cams-north"
    assert parser.parse_args(["abort", "r1"]).verb == "abort"


# --------------------------------------------------------------------------- real agents over real MQTT


@pytest.mark.slow
@pytest.mark.broker
def test_rollout_and_rollback_with_real_agents_over_mqtt(tmp_path, digits_run, broker) -> None:
    """Two real agents on Mosquitto: the driver rolls 2.0.0 out in MQTT chunks (canary, then the
    rest), then an operator rollback puts both back on 1.0.0."""
    import threading

    from core.protocol import TopicScheme
    from core.signing import load_public_key, save_keypair
    from demo.devices import agent_config
    from edge_agent.agent import Agent
    from export.pipeline import export_run
    from fleet.config import BrokerConfig, default_config
    from fleet.ingest import IngestService, connect_client
    from fleet.registry import Registry
    from fleet.rollout_driver import RolloutDriver

    keys = save_keypair(tmp_path / "keys" / "fleet")
    (tmp_path / "b").mkdir()
    bundles = {v: export_run(digits_run, out=tmp_path / "b", formats=("onnx",), onnx_precisions=("fp32",),
                             sign_key=keys.private, version=v, name="digits", max_drop=1.0).bundle
               for v in ("1.0.0", "2.0.0")}
    cfg = default_config(tmp_path / "fleet", broker=BrokerConfig(host=broker.host, port=broker.port, protocol="5"))
    reg = Registry.open(cfg.database_url)
    pub = load_public_key(keys.public)
    for b in bundles.values():
        reg.register_model(b, trusted_key=pub, status="accepted")
    ingest = IngestService(cfg, reg)
    ingest.start()
    client, _ = connect_client(cfg.broker, client_id="test-fleet-cmd")
    driver = RolloutDriver(reg, client, topics=TopicScheme(cfg.prefix), delivery="mqtt", chunk_size=16 * 1024)
    ingest.add_hook(lambda msgs: [driver.handle_bundle_request(m) for m in msgs if m.TYPE == "bundle-req"])
    agents, stop = [], threading.Event()
    try:
        for name in ("cam-a", "cam-b"):
            a = Agent(agent_config(name, tmp_path / name, host=broker.host, port=broker.port, protocol="5",
                                   trusted_key=keys.public, prefix=cfg.prefix, drift_window=50, telemetry_s=0.5))
            a.install(bundles["1.0.0"])
            a.start(connect=True, serve_http=False)
            threading.Thread(target=a.run, args=(stop,), daemon=True).start()
            agents.append(a)
        for _ in range(200):
            if len(reg.devices(online=True, model_version="1.0.0")) == 2:
                break
            stop.wait(0.1)
        plan = RolloutPlan(canary=0.5, waves=(1.0,), soak_s=0.5, job_timeout_s=60.0, analysis=BLIND)
        s = driver.start("digits", "2.0.0", plan, rollout_id="r-real")
        s = driver.run_until_done(s.rollout_id, interval_s=0.2, timeout_s=120)
        assert s.status == "completed", s.events
        assert [a.model.version for a in agents] == ["2.0.0", "2.0.0"]
        assert [e.kind for e in s.events].count("wave_started") == 2
        s = driver.rollback("r-real")
        s = driver.run_until_done("r-real", interval_s=0.2, timeout_s=60)
        assert s.status == "rolled_back" and s.counts() == {"rolled_back": 2}, s.devices
        assert [a.model.version for a in agents] == ["1.0.0", "1.0.0"]
    finally:
        stop.set()
        for a in agents:
            a.close()
        client.disconnect()
        client.loop_stop()
        ingest.stop()
        reg.close()


# --------------------------------------------------------------------------- lost commands


def test_resend_policy_doubles_up_to_the_cap() -> None:
    from fleet.rollout import ResendPolicy

    assert [ResendPolicy().interval(n) for n in range(7)] == [30, 60, 120, 240, 300, 300, 300]
    assert ResendPolicy(after_s=500).interval(3) == 500  # a long first wait is not cut by the cap
    with pytest.raises(ConfigError):
        ResendPolicy(after_s=0)


def test_due_resends_silent_offline_and_reconnected_devices() -> None:
    from fleet.rollout import Liveness, ResendPolicy, due_resends, resend

    pol = ResendPolicy(after_s=30, max_s=300)
    plan = RolloutPlan(canary=1.0, waves=(1.0,), job_timeout_s=1000.0)
    s, acts = advance(new_rollout("rs", "m", "2", DEVICES[:4], plan, now=0.0), 0.0)
    jobs = {a.device_id: a.job_id for a in acts}
    answered = {jobs["d00"]}  # d00 reported a step; d01, d02, d03 said nothing
    live = {"d01": Liveness(True, 0.0), "d02": Liveness(False, 0.0)}  # d03: unknown to the registry

    def due(state, now, seen=live):
        return [d.device_id for d in due_resends(state, now, answered, seen, pol)]

    assert due(s, 29.9) == []
    assert due(s, 30.0) == ["d01", "d03"]  # d02 is offline: its broker session holds the command
    s2, again = resend(s, 30.0, answered, live, pol)
    assert again == [Deploy("d01", jobs["d01"]), Deploy("d03", jobs["d03"])]  # same job ids
    assert s2.device("d01").resends == 1 and s2.device("d01").resent_at == 30.0
    assert s2.events[-1].kind == "resent" and "d01" in s2.events[-1].detail
    assert due(s2, 89.9) == [] and due(s2, 90.0) == ["d01", "d03"]  # then 60 s later
    # d02 reconnects (its birth arrives after the command went out): at once, no waiting
    back = {**live, "d02": Liveness(True, 31.0)}
    assert due(s2, 31.5, back) == ["d02"]
    s3, again = resend(s2, 31.5, answered, back, pol)
    assert again == [Deploy("d02", jobs["d02"])] and due(s3, 32.0, back) == []  # once per reconnect
    # a fleet that restarted resends every unanswered command, whatever the clock says
    assert [d.device_id for d in due_resends(s3, 32.0, answered, back, pol, everything=True)] == \
        ["d01", "d02", "d03"]
    # commands of a paused rollout are still delivered; a finished one sends nothing
    assert due(pause(s, 40.0), 40.0) == ["d01", "d03"]
    assert due(abort(s, 40.0), 40.0) == []


def test_resent_rollbacks_carry_the_reason_and_target_version() -> None:
    from fleet.rollout import Liveness, ResendPolicy, resend

    s, acts = advance(new_rollout("rr", "m", "2", DEVICES[:2], RolloutPlan(canary=1.0, waves=(1.0,)), now=0.0), 0.0)
    s, _ = advance(s, 1.0, done(acts))
    s, rbs = rollback(s, 2.0, "operator says no")
    s, again = resend(s, 40.0, set(), {"d00": Liveness(True)}, ResendPolicy())
    assert again == rbs and all(isinstance(a, Rollback) and a.reason == "operator says no" for a in again)
    assert {d.status for d in s.devices} == {"rolling_back"}  # re-sending changes no status


def test_old_rollout_state_without_resend_fields_still_loads() -> None:
    s, _ = advance(new_rollout("ro", "m", "2", DEVICES[:2], PLAN, now=0.0), 0.0)
    data = json.loads(json.dumps(s.to_dict()))
    for d in data["devices"]:
        del d["resends"], d["resent_at"]  # as a fleet before re-sends stored it
    assert RolloutState.from_dict(data) == s


def _silent_rollout(tmp_path, n: int, *, resend_after_s: float = 30.0):
    from fleet.rollout import ResendPolicy
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path, n=n)
    pub, clock = Recorder(), Clock()
    drv = RolloutDriver(reg, pub, api_base_url="http://fleet:8080", clock=clock,
                        resend=ResendPolicy(after_s=resend_after_s))
    drv.start("m", "2", RolloutPlan(canary=1.0, waves=(1.0,), job_timeout_s=3600.0), rollout_id="r-silent")
    return reg, pub, clock, drv


def test_driver_resends_the_deploy_to_a_silent_device_only(tmp_path) -> None:
    from core.protocol import DeployCommand, DeviceState
    from fleet.registry import IngestBatch

    reg, pub, clock, drv = _silent_rollout(tmp_path, 2)
    first = {c.job_id.split("-")[-1]: c for c in pub.take()}
    _answer(reg, [first["cam0"]], step="received", t=clock.t)  # cam0 got it; cam1 never says a word
    clock.t += 29
    drv.tick_one("r-silent")
    assert pub.take() == []
    clock.t += 1  # resend_after_s after the deploy
    drv.tick_one("r-silent")
    (again,) = pub.take()
    assert isinstance(again, DeployCommand) and again.job_id == first["cam1"].job_id
    assert again.sha256 == first["cam1"].sha256 and again.url == first["cam1"].url
    assert drv.load("r-silent").device("cam1").resends == 1
    clock.t += 59
    drv.tick_one("r-silent")
    assert pub.take() == []  # the back-off doubled: 60 s now
    clock.t += 1
    drv.tick_one("r-silent")
    assert [c.job_id for c in pub.take()] == [first["cam1"].job_id]
    # it drops off (Last Will): no point queueing more; its birth brings the command at once
    reg.apply(IngestBatch(states=[(DeviceState("cam1", False), clock.t + 1)]))
    clock.t += 1000
    drv.tick_one("r-silent")
    assert pub.take() == []
    reg.apply(IngestBatch(states=[(DeviceState("cam1", True, model_name="m", model_version="1"), clock.t + 1)]))
    clock.t += 2
    drv.tick_one("r-silent")
    assert [c.job_id for c in pub.take()] == [first["cam1"].job_id]
    drv.tick_one("r-silent")
    assert pub.take() == []
    # once it answers, no more
    _answer(reg, [first["cam1"]], step="received", t=clock.t)
    clock.t += 1000  # several back-off intervals, within the job timeout
    drv.tick_one("r-silent")
    assert pub.take() == []
    reg.close()


def test_driver_tick_costs_the_same_for_a_small_and_a_large_silent_wave(tmp_path) -> None:
    from sqlalchemy import event

    counts = []
    for n in (5, 200):
        reg, pub, clock, drv = _silent_rollout(tmp_path / str(n), n)
        assert len(pub.take()) == n
        statements: list[str] = []
        event.listen(reg.engine, "before_cursor_execute", lambda *a, seen=statements: seen.append(a[2]))
        clock.t += 30
        drv.tick_one("r-silent")  # every device is due: n deploys go out again
        assert len(pub.take()) == n
        counts.append(len(statements))
        reg.close()
    assert counts[0] == counts[1], counts  # batched queries: no statement per device


# --------------------------------------------------------------------------- scheduled rollouts


def test_scheduled_rollout_sends_nothing_before_its_time_then_starts() -> None:
    s = new_rollout("r-at", "digits", "2.0.0", DEVICES, PLAN, now=0.0, start_at=3600.0)
    assert s.status == "scheduled" and s.start_at == 3600.0
    assert s.reason == "scheduled for 1970-01-01T01:00:00+00:00" and s.events[-1].kind == "scheduled"
    for now in (0.0, 1800.0, 3599.9):
        s, acts = advance(s, now)
        assert acts == [] and s.status == "scheduled"
    assert RolloutState.from_dict(json.loads(json.dumps(s.to_dict()))) == s  # persisted like the rest
    s, acts = advance(s, 3600.0)
    assert s.status == "running" and s.reason == "" and acts == [Deploy("d00", "r-at-w0-d00")]
    assert [e.kind for e in s.events[-2:]] == ["schedule_due", "wave_started"]
    # a start time that is not in the future: an ordinary pending rollout
    assert new_rollout("r-now", "digits", "2.0.0", DEVICES, PLAN, now=10.0, start_at=10.0).status == "pending"


def test_scheduled_rollout_abort_cancels_and_pause_keeps_the_schedule() -> None:
    s = new_rollout("r-at", "digits", "2.0.0", DEVICES, PLAN, now=0.0, start_at=100.0)
    p = resume(pause(s, 10.0), 20.0)
    assert p.status == "scheduled"  # resumed before its time: still waits for it
    assert resume(pause(s, 10.0), 150.0).status == "pending"  # resumed after it: starts at the next tick
    a = abort(s, 50.0)
    assert a.status == "aborted" and a.terminal and "cancelled before its start time" in a.reason
    assert advance(a, 200.0) == (a, [])


def test_driver_scheduled_rollout_is_stored_blocks_the_model_and_starts_after_a_restart(tmp_path) -> None:
    from fleet.rollout_driver import RolloutDriver

    reg = _fleet(tmp_path, n=2)
    pub, clock = Recorder(), Clock()
    plan = RolloutPlan(canary=0.5, waves=(1.0,), soak_s=5.0)
    drv = RolloutDriver(reg, pub, clock=clock)
    s = drv.start("m", "2", plan, rollout_id="r-at", start_at=clock.t + 7200)
    assert s.status == "scheduled" and pub.sent == []
    rec = reg.rollout("r-at")
    assert rec.status == "scheduled" and rec.reason.startswith("scheduled for ")
    with pytest.raises(RolloutError, match="still scheduled"):  # one rollout of a model at a time
        drv.start("m", "2", plan)
    clock.t += 3600
    assert drv.tick()[0].status == "scheduled" and pub.sent == []
    del drv  # the fleet restarts; the schedule lives in the database
    clock.t += 3600
    drv2 = RolloutDriver(reg.__class__.open(f"sqlite:///{tmp_path / 'fleet.db'}"), pub, clock=clock)
    s = drv2.tick()[0]
    assert s.status == "running" and [c.job_id for c in pub.take()] == ["r-at-w0-cam0"]
    assert reg.rollout("r-at").status == "running" and not reg.rollout("r-at").reason
    drv2.abort("r-at")
    # abort cancels a scheduled one: nothing is ever sent
    drv2.start("m", "2", plan, rollout_id="r-later", start_at=clock.t + 60)
    assert drv2.abort("r-later").status == "aborted" and reg.rollout("r-later").status == "aborted"
    clock.t += 120
    assert drv2.tick() == [] and pub.sent == []


def test_parse_start_time() -> None:
    from fleet.cli_rollout import parse_start_time

    now = 1_796_000_000.0
    assert parse_start_time("+2h", now) == now + 7200 and parse_start_time("+30m", now) == now + 1800
    assert parse_start_time("2026-12-03T02:00:00+00:00", now) == 1_796_263_200.0
    assert parse_start_time("2026-12-03T03:00:00+01:00", now) == parse_start_time("2026-12-03T02:00:00Z", now)
    for bad in ("", "soon", "+", "+0s", "2026-12-03", "2000-01-01T00:00:00+00:00"):
        with pytest.raises(ConfigError, match="--at"):
            parse_start_time(bad, now)


def test_dashboard_shows_a_scheduled_rollout_and_offers_to_cancel_it(tmp_path) -> None:
    from fleet.dashboard.data import rollout_summary
    from fleet.dashboard.views import Views
    from fleet.registry import Registry

    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    plan = RolloutPlan(canary=0.5, waves=(1.0,), window="01:00-05:00")
    s = new_rollout("r-at", "m", "2", [("cam0", "1"), ("cam1", "1")], plan, now=0.0, start_at=3600.0)
    reg.create_rollout("r-at", "m", "2", {"cam0": 0, "cam1": 1}, state=s.to_dict(), status="scheduled",
                       reason=s.reason)
    d = {**rollout_summary(reg.rollout("r-at")), "devices": [], "can_act": True}
    assert d["progress"] == "scheduled for 1970-01-01T01:00:00+00:00" and d["active"] and not d["reason"]
    views = Views(prefix="/dashboard", refresh_s=5.0)
    page = views.render("rollout.html", d=d, session={"role": "operator"}, csrf="x")
    assert "scheduled for 1970-01-01T01:00:00+00:00" in page and ">Cancel</button>" in page
    assert 'id="btn-rollback"' not in page  # nothing to roll back before it started
    assert '<span id="rollout-window">01:00-05:00 UTC</span>' in page
    listing = views.render("rollouts.html", d={"items": [d]}, session={"role": "operator"}, csrf="x")
    assert "scheduled for 1970-01-01T01:00:00+00:00" in listing and 'data-start-at="1970-01-01T01:00:00+00:00"' in listing


def test_maintenance_window_holds_waves_due_outside_it() -> None:
    from fleet.rollout_state import in_window, parse_window

    day = 1_796_256_000.0  # 2026-12-03T00:00:00+00:00
    h = 3600.0
    assert parse_window("01:00-05:00") == (60, 300) and parse_window("22:00-04:00") == (1320, 240)
    assert in_window("", day) and in_window("01:00-05:00", day + 1 * h) and not in_window("01:00-05:00", day + 5 * h)
    assert in_window("22:00-04:00", day + 23 * h) and in_window("22:00-04:00", day + 3 * h)
    assert not in_window("22:00-04:00", day + 12 * h)
    for bad in ("1-5", "25:00-05:00", "01:00-01:00", "01:60-02:00"):
        with pytest.raises(ConfigError, match="--window"):
            RolloutPlan(window=bad)
    plan = RolloutPlan(canary=0.1, waves=(1.0,), soak_s=60.0, window="01:00-02:00")
    s = new_rollout("r-w", "digits", "2.0.0", DEVICES, plan, now=day)
    s, acts = advance(s, day + 0.5 * h)  # before the window: the rollout waits, one event
    s, acts2 = advance(s, day + 0.6 * h)
    assert acts == acts2 == [] and s.status == "pending" and [e.kind for e in s.events].count("window_wait") == 1
    s, acts = advance(s, day + 1 * h)
    assert s.status == "running" and acts == [Deploy("d00", "r-w-w0-d00")]
    s, _ = advance(s, day + 1 * h, done(acts))
    s, acts = advance(s, day + 2 * h, health={"d00": ()})  # healthy after the window closed: wave 1 waits
    assert acts == [] and s.phase == "window" and s.events[-1].kind == "window_wait" and not s.wants_health(day + 3 * h)
    assert RolloutState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert advance(s, day + 20 * h) == (s, [])
    s, acts = advance(s, day + 25 * h)  # the next day's window
    assert s.wave == 1 and s.phase == "deploying" and len(acts) == 9
