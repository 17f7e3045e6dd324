"""The agent logs one summary line per telemetry interval, not one line per prediction."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from edge_agent.agent import _Summary


def _snap(n: int) -> SimpleNamespace:
    return SimpleNamespace(inferences=n, errors=1, latency_p50_ms=1.25)


def test_summary_counts_predictions_since_the_last_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.agent")
    s = _Summary(10, 0.0)
    s.log(_snap(250), drift_alarm=False)
    s.log(_snap(250), drift_alarm=False)  # nothing new: no line
    s.log(_snap(260), drift_alarm=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.agent"]
    assert len(lines) == 2
    assert lines[0].startswith("240 predictions in the last") and "1.2 ms" in lines[0]
    assert lines[1].startswith("10 predictions") and lines[1].endswith("DRIFT ALARM")
