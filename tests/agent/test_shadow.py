"""The shadow stage on the device (edge_agent/shadow.py): a candidate installed without
switching runs beside the serving model on every N-th input, its answers never served,
and the comparison goes out in telemetry.  Real ONNX Runtime, real slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.protocol import DeployCommand, Telemetry, decode
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, digits, make_bundle


@pytest.fixture(scope="module")
def disagreeing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A candidate that passes its own health check but answers differently on most inputs."""
    d = tmp_path_factory.mktemp("shadow-bundles")
    return make_bundle(d / "tiny-1.1.0-flipped.elb", "1.1.0", broken_model=True, wrong_reference=True)


def _serve(agent: Agent, n: int) -> list:
    imgs = digits().test_x[:n]
    return [agent.predict(img) for img in imgs]


def test_a_shadowed_candidate_is_never_served_and_agreement_is_reported(tmp_path: Path, tiny_bundles) -> None:
    with Agent(agent_config(tmp_path / "state")).start(connect=False) as agent:
        agent.install(tiny_bundles["v1"])
        runner = agent.updates.install_shadow(tiny_bundles["v2"], job_id="shadow-1", every=2)
        assert agent.pipeline.shadow is runner and agent.model is not None and agent.model.version == "1.0.0"
        served = []
        for img in digits().test_x[:40]:  # one at a time: every 2nd input reaches the idle candidate
            served.append(agent.predict(img))
            assert runner.wait_idle()
        assert {p.model_version for p in served} == {"1.0.0"}  # the candidate's answers never come out
        t = agent.telemetry()
        assert t.shadow_version == "1.1.0" and t.shadow_inputs == 20 and t.shadow_skipped == 0
        assert t.shadow_agree == 20 and t.shadow_errors == 0  # the same weights: the same answers
        assert sum(t.shadow_latency_hist.values()) == 20 and sum(t.shadow_serving_hist.values()) == 20
        assert t.shadow_confidence == pytest.approx(t.shadow_serving_confidence, abs=1e-4) and t.shadow_cost_ms > 0
        assert decode(t.encode()) == t
        steps = [(j.job_id, j.step) for j in agent.jobs if j.job_id == "shadow-1"]
        assert ("shadow-1", "completed") in steps and ("shadow-1", "switched") not in steps
        agent.install(tiny_bundles["v2"])  # the canary deploy: serving the candidate ends its shadow
        assert agent.pipeline.shadow is None and agent.model.version == "1.1.0"
        assert "shadow_inputs" not in json.loads(agent.telemetry().encode())


def test_a_disagreeing_candidate_shows_it_and_a_busy_one_is_skipped(tmp_path: Path, tiny_bundles,
                                                                      disagreeing: Path) -> None:
    with Agent(agent_config(tmp_path / "state")).start(connect=False) as agent:
        agent.install(tiny_bundles["v1"])
        runner = agent.updates.install_shadow(disagreeing, every=1)
        for img in digits().test_x[:30]:
            agent.predict(img)
            assert runner.wait_idle()
        t = agent.telemetry()
        assert t.shadow_inputs == 30 and t.shadow_agree <= 6, t  # flipped logits: another answer nearly always
        agent.updates.stop_shadow()
        assert agent.pipeline.shadow is None and agent.model.version == "1.0.0"
        # the cost bound: while the candidate is busy, the next N-th inputs are skipped, not queued
        runner = agent.updates.install_shadow(disagreeing, every=1)
        with runner._lock:  # noqa: SLF001 - hold the candidate "busy" deterministically
            runner._busy = True  # noqa: SLF001
        _serve(agent, 5)
        with runner._lock:  # noqa: SLF001
            runner._busy = False  # noqa: SLF001
        assert agent.telemetry().shadow_skipped == 5


def test_shadow_fields_stay_off_the_wire_unless_used() -> None:
    """Older agents and fleets decode strictly: an unused shadow field must not reach them."""
    cmd = DeployCommand(job_id="j1", name="m", version="2", size=10, sha256="ab" * 32, url="http://fleet/b.elb")
    assert not {"shadow", "shadow_every"} & json.loads(cmd.encode()).keys()
    assert not any(k.startswith("shadow") for k in Telemetry("d1", 1).to_dict())
    shadow = DeployCommand(job_id="j1", name="m", version="2", size=10, sha256="ab" * 32, url="http://fleet/b.elb",
                           shadow=True, shadow_every=5)
    assert decode(shadow.encode()) == shadow
