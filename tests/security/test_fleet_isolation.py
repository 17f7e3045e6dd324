"""One provisioned device must not hurt another, against a real Mosquitto with the generated files.

Each case runs the attack as the ``attacker`` device (its own, valid credentials) and
asserts both that it fails and that the ``victim`` loses nothing (issue 16).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.chunks import split
from core.protocol import SAMPLES_KIND, DeployCommand, Feedback, JobStatus, Telemetry
from core.sampling import DriftSample, encode_sample
from tests.plugins.hostile import HostileFleet, Peer, wait_until

pytestmark = pytest.mark.broker


def send_sample(fleet: HostileFleet, dev: Peer, device_id: str, sample_id: str, *, shape: tuple[int, ...] = (16, 16),
                chunk_size: int = 256, oid0: int = 1, frames: slice = slice(None), flat: bool = False) -> list[bytes]:
    image = (np.zeros(shape, np.uint8) if flat
             else np.random.default_rng(len(sample_id)).integers(0, 256, shape, dtype=np.uint8))
    payload = encode_sample(DriftSample(sample_id, device_id, time.time(), "1", 3, 0.4, 2.0, "drift", image))
    all_frames = split(sample_id, payload, chunk_size=chunk_size, kind=SAMPLES_KIND)
    for i, f in enumerate(all_frames[frames]):
        dev.publish(fleet.topics.device(device_id, "samples"), f, oid=oid0 + i)
    return all_frames


def test_label_poisoning_is_refused_and_counted(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    victim, attacker = fleet.device("victim"), fleet.device("attacker")
    send_sample(fleet, victim, "victim", "v-1")
    assert wait_until(lambda: fleet.registry.sample("v-1") is not None)
    fb = fleet.topics.device("attacker", "feedback")
    # On its own topic, naming the victim's sample: as an "operator", as a device, and for a
    # victim sample that has not arrived yet (it would be parked and applied later).
    attacker.publish(fb, Feedback("v-1", "7", source="operator").encode())
    attacker.publish(fb, Feedback("v-1", "7", source="device").encode())
    attacker.publish(fb, Feedback("v-2", "7", source="device").encode())
    # ... and on the operators' topic, which the ACL keeps for fleet users.
    attacker.publish(fleet.topics.operator_feedback, Feedback("v-1", "7").encode())
    assert wait_until(lambda: fleet.counted("label_source") == 1 and fleet.counted("label_foreign") == 1)
    send_sample(fleet, victim, "victim", "v-2")
    assert wait_until(lambda: fleet.registry.sample("v-2") is not None)
    assert fleet.ingest.wait_idle(15)
    for sid in ("v-1", "v-2"):
        rec = fleet.registry.sample(sid)
        assert rec is not None and rec.label is None and rec.label_source is None, rec
    assert fleet.registry.labels.pending_count() == 0  # the parked label died with its mismatch
    # The victim labelling its own sample still works.
    victim.publish(fleet.topics.device("victim", "feedback"), Feedback("v-1", "3", source="device").encode())
    assert wait_until(lambda: (fleet.registry.sample("v-1").label, fleet.registry.sample("v-1").label_source)  # type: ignore[union-attr]
                      == ("3", "device"))


def test_a_device_cannot_join_the_fleets_subscriptions(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    filt = fleet.topics.all_devices("telemetry")
    group = fleet.config.broker.shared_group
    # The default group name, the real one (as if leaked) and a plain wildcard: with one ingest
    # process the fleet subscribes plainly, so no share group of the fleet exists to join.
    attacker = fleet.device("attacker", subscribe=(f"$share/fleet/{filt}", f"$share/{group}/{filt}", filt))
    victim = fleet.device("victim")
    n = 30
    for i in range(n):
        victim.publish(fleet.topics.device("victim", "telemetry"), Telemetry("victim", seq=i + 1, ts=1000.0 + i).encode())
    assert wait_until(lambda: len(fleet.registry.telemetry(device_ids=["victim"])) == n)
    assert attacker.got == {}  # and it reads nothing (the ACL's read check on delivery)


def test_a_device_cannot_take_another_devices_client_id(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    victim = fleet.device("victim", subscribe=(fleet.topics.device_commands("victim"),))
    for _ in range(5):  # use_username_as_clientid: the attacker's id becomes "attacker"
        fleet.device("attacker", client_id="victim")
    cmd = fleet.topics.command("victim", "deploy")
    op = fleet.operator()
    op.publish(cmd, DeployCommand("j1", "m", "2", 10, "0" * 64, url="http://x/b.elb").encode())
    assert wait_until(lambda: victim.count(cmd) == 1)
    assert victim.disconnects == 0 and victim.connected.is_set()
    assert fleet.ingest.client is not None and fleet.ingest.client.client.is_connected()


def test_one_device_cannot_evict_or_spoil_another_devices_transfer(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    victim, attacker = fleet.device("victim"), fleet.device("attacker")
    frames = send_sample(fleet, victim, "victim", "v-big", shape=(32, 32), frames=slice(0, 2))
    assert len(frames) > 4
    # 300 partial transfers (twice the old global bound) and the victim's own transfer id with other content.
    junk = b"\x00" * 2000
    for i in range(300):
        attacker.publish(fleet.topics.device("attacker", "samples"),
                         split(f"a-{i}", junk, chunk_size=256, kind=SAMPLES_KIND)[0], oid=10_000 + i)
    attacker.publish(fleet.topics.device("attacker", "samples"), split("v-big", junk, chunk_size=256)[0])
    assert fleet.ingest.wait_idle(30)
    assert fleet.ingest.reassembler.owner_usage("victim")[0] == 1  # still open, untouched
    assert ("victim", "v-big") in fleet.ingest.reassembler
    for i, f in enumerate(frames[2:]):
        victim.publish(fleet.topics.device("victim", "samples"), f, oid=100 + i)
    assert wait_until(lambda: fleet.registry.sample("v-big") is not None)
    assert fleet.counted("transfer_dropped") + fleet.counted("transfer_budget") > 0  # the attacker's own
    assert fleet.ingest.guard_counters.devices().keys() == {"attacker"}


def test_job_statuses_for_another_devices_job_are_refused(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    fleet.registry.create_rollout("r1", "m", "2", {"victim": 0, "attacker": 0})
    fleet.registry.update_targets("r1", ["victim"], status="sent", job_id="r1-w0-victim")
    attacker = fleet.device("attacker")
    attacker.publish(fleet.topics.device("attacker", "jobs"),
                     JobStatus("attacker", "r1-w0-victim", "2", "failed", ok=False).encode(), oid=1)
    assert wait_until(lambda: fleet.counted("job_foreign") == 1)
    assert fleet.registry.job_statuses(job_id="r1-w0-victim") == []


def test_oversized_messages_never_reach_the_database(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    attacker = fleet.device("attacker")
    big = JobStatus("attacker", "j", "2", "failed", ok=False, detail="x" * (2 << 20)).encode()
    info = attacker.c.publish(fleet.topics.device("attacker", "jobs"), big, qos=1)
    # The broker (max_packet_size, told to MQTT 5 clients) or the fleet (64 KiB) refuses it.
    assert info.rc != 0 or wait_until(lambda: not attacker.connected.is_set(), 10)
    mid = JobStatus("attacker", "j", "2", "failed", ok=False, detail="x" * (100 << 10)).encode()
    fleet.ingest.submit(fleet.topics.device("attacker", "jobs"), mid)
    assert wait_until(lambda: fleet.counted("message_size") == 1)
    assert fleet.registry.job_statuses(device_id="attacker") == []


def test_a_sample_with_hostile_dimensions_is_refused(hardened_fleet: HostileFleet) -> None:
    fleet = hardened_fleet
    attacker = fleet.device("attacker")
    frames = send_sample(fleet, attacker, "attacker", "wide", shape=(1, 50_000), chunk_size=64 * 1024, flat=True)
    assert len(frames) == 1 and len(frames[0]) < 2048  # a few hundred bytes on the wire
    assert wait_until(lambda: fleet.counted("image_size") == 1)
    assert fleet.registry.sample("wide") is None


def test_with_several_ingest_processes_the_share_group_is_unguessable(hardened_fleet: HostileFleet) -> None:
    import dataclasses

    from fleet.ingest import IngestService

    fleet = hardened_fleet
    fleet.ingest.stop()
    cfg = dataclasses.replace(fleet.config, ingest=dataclasses.replace(fleet.config.ingest, workers=2))
    fleet.ingest = IngestService(cfg, fleet.registry)  # shared subscriptions, the random group of fleet init
    fleet.ingest.start()
    assert fleet.ingest.protocol == "5"
    filt = fleet.topics.all_devices("telemetry")
    fleet.device("attacker", subscribe=(f"$share/fleet/{filt}", f"$share/edgeloop/{filt}"))
    victim = fleet.device("victim")
    n = 30
    for i in range(n):
        victim.publish(fleet.topics.device("victim", "telemetry"), Telemetry("victim", seq=i + 1, ts=1000.0 + i).encode())
    assert wait_until(lambda: len(fleet.registry.telemetry(device_ids=["victim"])) == n)
