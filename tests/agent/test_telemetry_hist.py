"""The per-interval latency histogram and error count the agent reports for the fleet's canary analysis."""

from __future__ import annotations

from core.protocol import Telemetry, decode, latency_bucket, latency_bucket_ms
from edge_agent.telemetry import InferenceStats


def test_interval_histogram_and_errors_reset_with_the_interval() -> None:
    stats = InferenceStats()
    for ms in (1.0, 1.01, 5.0):
        stats.record(ms, 0.9)
    stats.record_error()
    snap = stats.snapshot(reset_interval=True)
    assert snap.latency_hist == {str(latency_bucket(1.0)): 2, str(latency_bucket(5.0)): 1}
    assert snap.errors_interval == 1
    assert latency_bucket_ms(latency_bucket(5.0)) <= 5.0 < latency_bucket_ms(latency_bucket(5.0) + 1)
    stats.record(2.0, 0.8)
    again = stats.snapshot(reset_interval=True)
    assert again.latency_hist == {str(latency_bucket(2.0)): 1} and again.errors_interval == 0


def test_telemetry_from_an_older_agent_still_decodes() -> None:
    old = Telemetry("cam-1", 1).to_dict()
    del old["latency_hist"], old["errors_interval"]  # what an agent before the canary analysis sends
    import json

    msg = decode(json.dumps(old))
    assert isinstance(msg, Telemetry) and msg.latency_hist == {} and msg.errors_interval is None
