"""Per-device budgets of the fleet (issue 16 §3): bundle requests, pending labels, the reassembler,
thumbnails.  Exceeding one is refused, counted per rule and device, and costs other devices nothing."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from core import chunks
from core.protocol import BundleRequest, Feedback, Message, TopicScheme
from fleet.config import default_config
from fleet.dashboard.png import encode_png, upscale
from fleet.ingest import IngestService
from fleet.ingest_guard import Budgets
from fleet.registry import Registry


@pytest.fixture
def service(tmp_path: Path) -> tuple[IngestService, list[Message]]:
    cfg = default_config(tmp_path / "fleet", prefix="b/v1")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, flush_ms=10))
    reg = Registry.open(cfg.database_url)
    svc = IngestService(cfg, reg, budgets=Budgets(pending_labels_per_device=50, bundle_request_burst=3))
    seen: list[Message] = []
    svc.add_hook(seen.extend)
    svc.start(connect=False)
    yield svc, seen
    svc.stop()
    reg.close()


def test_bundle_requests_are_bound_to_the_device_and_rate_limited(service: tuple[IngestService, list[Message]]) -> None:
    svc, seen = service
    reg, topics = svc.registry, TopicScheme("b/v1")
    reg.create_rollout("r1", "m", "2", {"victim": 0, "attacker": 0})
    reg.update_targets("r1", ["victim"], status="sent", job_id="r1-w0-victim")
    reg.update_targets("r1", ["attacker"], status="sent", job_id="r1-w0-attacker")
    topic = topics.device("attacker", "bundle-req")
    for _ in range(200):  # each one answered would publish the whole bundle
        svc.submit(topic, BundleRequest("attacker", "r1-w0-attacker", "2").encode())
    svc.submit(topic, BundleRequest("attacker", "r1-w0-victim", "2").encode())  # another's job
    svc.submit(topic, BundleRequest("attacker", "r1-w0-attacker", "1").encode())  # another version
    svc.submit(topics.device("victim", "bundle-req"), BundleRequest("victim", "r1-w0-victim", "2").encode())
    assert svc.wait_idle(20)
    passed = [m for m in seen if isinstance(m, BundleRequest)]
    assert [m.device_id for m in passed].count("attacker") == 3  # the burst, then the rate
    assert [m.device_id for m in passed].count("victim") == 1  # the victim's own budget is whole
    rules = svc.guard_counters.rules()
    assert rules["bundle_request_rate"] == 197 and rules["bundle_request_foreign"] == 2


def test_pending_labels_are_capped_per_device(service: tuple[IngestService, list[Message]]) -> None:
    svc, _ = service
    topics = TopicScheme("b/v1")
    for i in range(120):
        svc.submit(topics.device("attacker", "feedback"), Feedback(f"future-{i}", "1", source="device").encode())
    svc.submit(topics.device("victim", "feedback"), Feedback("mine", "1", source="device").encode())
    assert svc.wait_idle(20)
    assert svc.registry.labels.pending_count() == 51  # 50 of the attacker's, and the victim's one
    assert svc.guard_counters.rules()["pending_labels"] == 70
    assert svc.guard_counters.devices() == {"attacker": {"pending_labels": 70}}


def test_the_reassembler_never_evicts_another_owner() -> None:
    dropped: list[chunks.Dropped] = []
    r = chunks.Reassembler(max_transfers=10, max_bytes=10_000, max_transfers_per_owner=4,
                           max_bytes_per_owner=4_000, on_drop=dropped.append)
    data = bytes(range(256)) * 8
    victim = chunks.split("v", data, chunk_size=512)
    r.add(victim[0], owner="victim")
    for i in range(300):
        try:
            r.add(chunks.split(f"a{i}", data, chunk_size=512)[0], owner="attacker")
        except chunks.OverBudgetError:
            pass
    assert all(d.owner == "attacker" for d in dropped)
    done = [r.add(f, owner="victim") for f in victim[1:]]
    assert done[-1] is not None and done[-1].data == data
    # The global bound: when nothing of the same owner can go, the frame is refused, nothing dropped.
    r2 = chunks.Reassembler(max_transfers=2, max_bytes=1 << 20)
    r2.add(chunks.split("x", data, chunk_size=512)[0], owner="a")
    r2.add(chunks.split("y", data, chunk_size=512)[0], owner="b")
    with pytest.raises(chunks.OverBudgetError):
        r2.add(chunks.split("z", data, chunk_size=512)[0], owner="c")
    assert len(r2) == 2 and not r2.dropped and r2.refused == 1


def test_a_thumbnail_of_hostile_proportions_stays_small() -> None:
    tracemalloc.start()
    try:
        thumb = upscale(np.zeros((1, 50_000), np.uint8), 96)
        encode_png(np.ascontiguousarray(thumb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(thumb.shape) <= 512 and peak < 8 << 20  # it was +540 MB
    assert upscale(np.zeros((8, 8), np.uint8)).shape == (96, 96)  # tiny digits still enlarged
