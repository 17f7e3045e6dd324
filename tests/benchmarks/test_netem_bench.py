"""A small run of the network-fault benchmark (benchmarks/netem_bench.py): the real fleet and
Mosquitto in one network namespace, six devices in their own, every link lossy and slow,
one device cut off mid-wave.  Needs root and ``ip netns``; skips with the reason otherwise."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.netem_bench import NetemConfig, run_bench
from benchmarks.netns_lab import available

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# Six devices in three groups: the canary is one per group (a single wave), the last group
# (a third) is cut off while it deploys; shorter receipt timeouts so the drain is quick.
SMALL = NetemConfig(scenarios=("good",), groups=3, per_group=2, partition_s=5.0, partition_wave=0, soak_s=2.0, period_s=0.5,
                    bundle_kb=20, warmup_reports=2, scenario_timeout_s=120.0, drain_timeout_s=90.0,
                    receipt_grace_s=2.0, receipt_timeout_s=5.0)


def test_a_good_model_is_promoted_over_a_flaky_network_without_losing_a_message() -> None:
    why = available()
    if why:
        pytest.skip(f"network namespaces: {why}")
    if shutil.which("mosquitto") is None and not any(
            shutil.which(p) for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")):
        pytest.skip("no mosquitto binary")
    result = run_bench(SMALL, say=lambda m: None)
    s = result["scenarios"]["good"]
    assert "error" not in s, s
    assert s["status"] == "completed", s["timeline"]
    assert s["checks"]["ok"], s["checks"]
    assert s["messages"]["telemetry_lost"] == 0 and s["messages"]["drift_lost"] == 0
    assert s["devices_final"]["bricked"] == 0
    assert any("partition of" in f["event"] for f in s["faults"]), s["faults"]
    assert s["links"]["down_dropped"] + s["links"]["up_dropped"] > 0  # the links did lose packets
