"""Remote logs against a hostile device (issue 15, with the rules of issue 16): oversized, malformed,
foreign and flooding LogLines are refused and counted; the victim's lines arrive whole."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from core.protocol import LogLines, LogsRequest, decode_as
from fleet.ingest_guard import Budgets
from fleet.remote_logs import LogClient
from tests.plugins.hostile import HostileFleet, Peer, wait_until

pytestmark = pytest.mark.broker

BURST = 5


def lines(device: str, request: str, seqs: range, *, msg: str = "ok", more: bool = False) -> LogLines:
    return LogLines(device, request, "boot1", tuple({"seq": s, "ts": 1.0 + s, "level": "INFO",
                                                     "logger": "edge_agent", "msg": msg} for s in seqs), more=more)


@pytest.fixture
def client(hardened_fleet: HostileFleet) -> Iterator[LogClient]:
    """The operator's `fleet logs` connection (the fleet's tool user), with a small per-device burst."""
    with LogClient(hardened_fleet.config, hardened_fleet.registry,
                   budgets=Budgets(log_messages_burst=BURST, log_messages_per_s=0.0)) as c:
        yield c


def answering(fleet: HostileFleet, peer: Peer, device: str) -> None:
    """Make ``peer`` answer every LogsRequest on ``device``'s cmd/logs with three lines."""
    def on_message(_c: object, _u: object, msg: object) -> None:
        req = decode_as(bytes(msg.payload), LogsRequest)  # type: ignore[attr-defined]
        peer.c.publish(fleet.topics.device(device, "logs"), lines(device, req.request_id, range(1, 4)).encode(),
                       qos=1)
    peer.c.on_message = on_message
    peer.c.subscribe(fleet.topics.command(device, "logs"), qos=1)


def test_hostile_log_lines_are_refused_and_counted(hardened_fleet: HostileFleet, client: LogClient) -> None:
    fleet = hardened_fleet
    attacker, victim = fleet.device("attacker"), fleet.device("victim")
    own = fleet.topics.device("attacker", "logs")
    # Oversized (over the fleet's per-message limit, under the broker's packet cap) ...
    attacker.publish(own, json.dumps({**lines("attacker", "r1", range(1, 2)).to_dict(),
                                      "pad": "x" * (Budgets().log_message_bytes + 1)}).encode())
    # ... malformed: not JSON, too many lines, another device's lines on its own topic
    attacker.publish(own, b"\xff\xfe not json")
    too_many = lines("attacker", "r2", range(1, 2)).to_dict()
    too_many["lines"] = too_many["lines"] * 101
    attacker.publish(own, json.dumps(too_many).encode())
    attacker.publish(own, lines("victim", "r3", range(1, 4), msg="forged").encode())
    # ... and on the victim's topic, which the broker's ACL does not let it write (silently dropped).
    attacker.publish(fleet.topics.device("victim", "logs"), lines("victim", "r4", range(1, 4), msg="forged").encode())
    assert wait_until(lambda: client.counters.rules()["logs_size"] == 1 and client.malformed == 3)
    # A flood of well-formed lines: what is left of the burst is stored, the rest refused by rate
    # (the three malformed messages took their tokens: the rate is checked before decoding).
    left = BURST - 3
    for i in range(BURST + 20):
        attacker.publish(own, lines("attacker", f"f{i}", range(10 * i + 1, 10 * i + 11)).encode())
    assert wait_until(lambda: client.counters.rules()["logs_rate"] == BURST + 20 - left)
    assert client.counters.devices()["attacker"] == {"logs_size": 1, "logs_rate": BURST + 20 - left}
    # What this client let through is stored whole; `fleet serve`'s ingestion (subscribed to the logs
    # topic too, with its own per-device budget refilling in time) may store a few more of the same flood.
    stored = client.repo.count(["attacker"])
    assert stored >= 10 * left and stored % 10 == 0
    assert {r.msg for r in client.repo.find("attacker", lines=1000)} == {"ok"}  # nothing forged or malformed
    # The victim answers its request in full, untouched by any of it.
    answering(fleet, victim, "victim")
    answer = client.ask("victim", timeout_s=15)
    assert answer.answered  # stored by this client or, first, by the fleet's ingestion: once either way
    assert [r.msg for r in client.repo.find("victim")] == ["ok"] * 3
    assert "victim" not in client.counters.devices()


def test_ingestion_counts_hostile_log_lines_per_rule(hardened_fleet: HostileFleet) -> None:
    """The same rules at `fleet serve`'s ingestion, counted where /metrics and the dashboard read them."""
    svc = hardened_fleet.ingest
    own = hardened_fleet.topics.device("attacker", "logs")
    before = dict(svc.guard_counters.rules())
    svc.submit(own, b"{" * 10 + b"x" * (Budgets().log_message_bytes + 1))
    svc.submit(own, b"[1, 2, 3]")
    assert svc.wait_idle(15)
    rules = svc.guard_counters.rules()
    assert rules["logs_size"] - before.get("logs_size", 0) == 1
    assert svc.stats.malformed >= 1 and svc.guard_counters.devices()["attacker"]["logs_size"] >= 1
