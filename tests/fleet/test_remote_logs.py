"""Remote logs: the agent's ring, the protocol's bounds, the bounded store, and a real agent answering
``edgeloop fleet logs`` over a real Mosquitto (issue 15)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import protocol as proto
from core.errors import ProtocolError
from edge_agent.agent import Agent
from edge_agent.link_commands import CommandInbox
from edge_agent.logring import LogRing
from edgeloop.cli import main
from fleet.cli_logs import follow
from fleet.config import BrokerConfig, FleetConfig, default_config, render_config
from fleet.ingest import IngestService
from fleet.registry import Registry
from fleet.remote_logs import NO_LINES, LogClient, device_logs, request_logs
from fleet.repos import LogRepo
from tests.plugins.agent_kit import agent_config
from tests.plugins.broker import MosquittoBroker

WAIT = 30.0  # upper bound for one wait; the tests finish long before
PASSWORD = "broker-pw-never-in-logs"  # the test broker lets anyone in; the agent still redacts it


def _ring(capacity: int = 500) -> tuple[LogRing, logging.Logger]:
    ring = LogRing(capacity)
    logger = logging.getLogger(f"test.logring.{uuid.uuid4().hex[:8]}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(ring)
    return ring, logger


def _lines(device: str, boot: str, seqs: range, *, level: str = "INFO", request: str = "r1") -> proto.LogLines:
    return proto.LogLines(device, request, boot, tuple({"seq": s, "ts": 1000.0 + s, "level": level,
                                                        "logger": "edge_agent.test", "msg": f"line {s}"}
                                                       for s in seqs))


# --------------------------------------------------------------------------- the agent's ring


def test_the_ring_keeps_the_newest_lines_truncated_and_redacted() -> None:
    ring, logger = _ring(capacity=10)
    ring.add_secret("s3cret-pass")
    ring.add_secret("ab")  # too short to redact without mangling ordinary words
    for i in range(25):
        logger.info("line %d with s3cret-pass and ab", i)
    logger.warning("x" * 5000)
    try:
        raise ValueError("bad frame")
    except ValueError:
        logger.exception("camera failed")
    lines, dropped = ring.lines(max_lines=100)
    assert [ln["seq"] for ln in lines] == list(range(18, 28)) and dropped == 17
    assert all("s3cret" not in str(ln["msg"]) for ln in lines) and "*** and ab" in str(lines[0]["msg"])
    assert len(str(lines[-2]["msg"])) == proto.MAX_LOG_LINE_CHARS and str(lines[-2]["msg"]).endswith("...")
    assert lines[-1]["level"] == "ERROR" and lines[-1]["msg"] == "camera failed [ValueError: bad frame]"
    warn, _ = ring.lines(min_level="WARNING", max_lines=100)
    assert [ln["level"] for ln in warn] == ["WARNING", "ERROR"]


def test_an_answer_is_split_within_the_protocol_bounds_and_resumes_after_the_last_line() -> None:
    ring, logger = _ring()
    for i in range(500):
        logger.info("%d %s", i, "é" * 900)  # escaped to 6 bytes a character on the wire
    parts = ring.answer("cam-1", proto.LogsRequest("r1", max_lines=1000))
    assert len(parts) > 1 and [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    for p in parts:
        wire = p.encode()
        assert len(wire) <= proto.MAX_LOG_MESSAGE_BYTES and len(p.lines) <= proto.MAX_LOG_LINES_PER_MESSAGE
        assert proto.decode(wire) == p
    assert [ln["seq"] for p in parts for ln in p.lines] == list(range(1, 501))
    logger.info("one more")
    (after,) = ring.answer("cam-1", proto.LogsRequest("r2", since_seq=500, boot=ring.boot))
    assert [ln["msg"] for ln in after.lines] == ["one more"] and not after.more
    # Another boot's position means the agent restarted: everything it holds (the newest max_lines).
    (fresh,) = ring.answer("cam-1", proto.LogsRequest("r3", since_seq=999, boot="otherboot", max_lines=3))
    assert [ln["seq"] for ln in fresh.lines] == [499, 500, 501]
    (empty,) = ring.answer("cam-1", proto.LogsRequest("r4", since_seq=501, boot=ring.boot))
    assert empty.lines == () and not empty.more  # an answer always comes: the fleet knows the agent heard


def test_the_command_thread_hands_logs_requests_to_on_logs_and_drops_bad_ones() -> None:
    topics = proto.TopicScheme("c/v1")
    commands: list[proto.RollbackCommand] = []  # what on_command got
    asked: list[proto.LogsRequest] = []
    handled = threading.Semaphore(0)

    def on_command(cmd: object) -> None:
        commands.append(cmd)  # type: ignore[arg-type]
        handled.release()

    def on_logs(req: proto.LogsRequest) -> None:
        asked.append(req)
        handled.release()

    inbox = CommandInbox("cam-1", topics, on_command, on_logs=on_logs)
    thread = threading.Thread(target=inbox.run, daemon=True)
    thread.start()
    Msg = dataclasses.make_dataclass("Msg", ["topic", "payload"])
    logs = topics.command("cam-1", "logs")
    for payload in (proto.LogsRequest("r1").encode(), b"{}", b'{"type": "logs-req", "schema_version": 1, '
                    b'"request_id": "r2", "max_lines": 100000}', proto.RollbackCommand("j1", "x").encode()):
        inbox.put(Msg(logs, payload))
    inbox.put(Msg(topics.command("cam-1", "rollback"), proto.RollbackCommand("j2", "x").encode()))
    assert handled.acquire(timeout=WAIT) and handled.acquire(timeout=WAIT)  # the request, then the rollback
    inbox.close()
    thread.join(WAIT)
    assert [r.request_id for r in asked] == ["r1"] and [c.job_id for c in commands] == ["j2"]
    assert inbox.rejected == 3  # the bad requests (and a rollback on the logs topic) are counted, not fatal


@pytest.mark.parametrize("bad", [
    {"lines": [{"seq": i, "ts": 1.0, "level": "INFO", "logger": "x", "msg": "m"} for i in range(101)]},
    {"lines": [{"seq": 1, "ts": 1.0, "level": "INFO", "logger": "x", "msg": "m" * 1001}]},
    {"lines": [{"seq": 1, "ts": 1.0, "level": "LOUD", "logger": "x", "msg": "m"}]},
    {"lines": [{"seq": 1, "ts": 1.0, "level": "INFO", "logger": "x", "msg": "m", "extra": 1}]},
    {"lines": [{"seq": -1, "ts": 1.0, "level": "INFO", "logger": "x", "msg": "m"}]},
    {"lines": [{"seq": True, "ts": 1.0, "level": "INFO", "logger": "x", "msg": "m"}]},
    {"lines": [{"seq": 1, "ts": 1.0, "level": "INFO", "logger": "x" * 101, "msg": "m"}]},
    {"boot": "../etc"},
    {"request_id": "../x"},
    {"dropped": -3},
])
def test_log_lines_out_of_bounds_are_malformed(bad: dict) -> None:
    data = {**_lines("cam-1", "b1", range(1, 3)).to_dict(), **bad}
    with pytest.raises(ProtocolError):
        proto.decode(json.dumps(data))


def test_a_logs_request_is_bounded() -> None:
    for kw in ({"max_lines": 0}, {"max_lines": proto.MAX_LOG_REQUEST_LINES + 1}, {"min_level": "LOUD"},
               {"since_seq": -1}, {"boot": "a/b"}):
        with pytest.raises(ProtocolError):
            proto.LogsRequest("r1", **kw)


# --------------------------------------------------------------------------- the store


def test_the_store_keeps_the_latest_lines_per_device_once(registry: Registry) -> None:
    repo = LogRepo.of(registry, keep=50)
    assert repo.add(_lines("cam-1", "b1", range(1, 41))) == 40
    assert repo.add(_lines("cam-1", "b1", range(1, 41))) == 0  # a re-sent answer
    assert repo.add(_lines("cam-1", "b1", range(41, 81), level="ERROR")) == 40
    assert repo.add(_lines("cam-1", "b1", range(1, 11))) == 0  # pruned lines do not come back as the newest
    assert repo.add(_lines("cam-2", "b9", range(1, 6))) == 5
    assert repo.count(["cam-1"]) == 50 and repo.count(["cam-2"]) == 5  # one device's lines never prune another's
    assert [r.seq for r in repo.find("cam-1", lines=3)] == [78, 79, 80] and repo.last("cam-1") == ("b1", 80)
    assert {r.level for r in repo.find("cam-1", lines=100, min_level="WARNING")} == {"ERROR"}
    assert len(repo.find("cam-1", lines=100, min_level="INFO")) == 50
    assert repo.add(_lines("cam-1", "b2", range(1, 3))) == 2  # the agent restarted: a new boot, seq from 1
    assert repo.last("cam-1") == ("b2", 2) and [r.seq for r in repo.find("cam-1", lines=3)] == [80, 1, 2]


def test_the_api_and_dashboard_helpers_ask_after_the_last_stored_line(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    sent: list[tuple[str, bytes, int]] = []
    topics = proto.TopicScheme("h/v1")
    assert device_logs(reg, "cam-1") == {"device_id": "cam-1", "lines": [], "note": NO_LINES}
    first = request_logs(lambda t, p, qos: sent.append((t, p, qos)), topics, reg, "cam-1")
    assert (first.boot, first.since_seq) == (None, 0)
    LogRepo.of(reg).add(_lines("cam-1", "b1", range(1, 4), level="ERROR"))
    second = request_logs(lambda t, p, qos: sent.append((t, p, qos)), topics, reg, "cam-1")
    assert [(t, proto.decode(p), q) for t, p, q in sent] == [(topics.command("cam-1", "logs"), first, 1),
                                                              (topics.command("cam-1", "logs"), second, 1)]
    assert (second.boot, second.since_seq, second.min_level) == ("b1", 3, "DEBUG")
    data = device_logs(reg, "cam-1", lines=2, min_level="WARNING")
    assert [ln["seq"] for ln in data["lines"]] == [2, 3] and data["note"] is None
    reg.close()


def test_ingestion_checks_and_stores_answers(tmp_path: Path) -> None:
    """``fleet serve`` stores answers arriving on its subscription (IngestService, fed directly here)."""
    cfg = default_config(tmp_path / "fleet", prefix="l/v1")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, flush_ms=10))
    reg = Registry.open(cfg.database_url)
    svc = IngestService(cfg, reg)
    seen: list[proto.Message] = []
    svc.add_hook(seen.extend)
    svc.start(connect=False)
    try:
        topics = proto.TopicScheme("l/v1")
        svc.submit(topics.device("cam-1", "logs"), _lines("cam-1", "b1", range(1, 6)).encode())
        svc.submit(topics.device("cam-1", "logs"), _lines("cam-2", "b1", range(1, 6)).encode())  # not its own
        svc.submit(topics.device("cam-1", "logs"), b'{"type": "logs", "schema_version": 1}')
        assert svc.wait_idle(20)
    finally:
        svc.stop()
    assert [r.seq for r in LogRepo.of(reg).find("cam-1")] == [1, 2, 3, 4, 5] and LogRepo.of(reg).count() == 5
    assert svc.stats.malformed == 2 and any(isinstance(m, proto.LogLines) for m in seen)
    reg.close()


# --------------------------------------------------------------------------- a real agent, a real broker


@pytest.fixture
def fleet_cfg(broker: MosquittoBroker, topic_prefix: str, tmp_path: Path) -> FleetConfig:
    cfg = default_config(tmp_path / "fleet-data", prefix=topic_prefix,
                         broker=BrokerConfig(host=broker.host, port=broker.port))
    (tmp_path / "fleet.toml").write_text(render_config(cfg))
    return cfg


@pytest.fixture
def agent(broker: MosquittoBroker, topic_prefix: str, tmp_path: Path) -> Iterator[Agent]:
    cfg = agent_config(tmp_path / "state", agent={"device_id": "cam-logs"},
                       broker={"enabled": True, "host": broker.host, "port": broker.port,
                               "topic_prefix": topic_prefix, "username": "cam-logs", "password": PASSWORD})
    a = Agent(cfg).start()
    assert a.link.connection.ready.wait(WAIT), "the agent never subscribed to its commands"
    yield a
    a.close()


@pytest.mark.broker
def test_a_real_agent_answers_and_fleet_logs_prints_its_lines(agent: Agent, fleet_cfg: FleetConfig, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    marker = uuid.uuid4().hex[:8]
    logging.getLogger("edge_agent.camera").warning("camera 0 lost 12 frames (%s)", marker)
    logging.getLogger("edge_agent.camera").warning("connecting with %s (%s)", PASSWORD, marker)
    logging.getLogger("edge_agent.camera").debug("below the agent's level: never recorded (%s)", marker)
    assert main(["fleet", "logs", "cam-logs", "-c", str(tmp_path / "fleet.toml"), "--timeout", str(WAIT),
                 "--level", "warning"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING  edge_agent.camera: camera 0 lost 12 frames ({marker})" in out, out
    assert "never recorded" not in out and PASSWORD not in out and f"connecting with *** ({marker})" in out
    # --json, and the answer is stored: the next request asks only for what is new
    logging.getLogger("edge_agent.camera").error("second line %s", marker)
    assert main(["fleet", "logs", "cam-logs", "-c", str(tmp_path / "fleet.toml"), "--timeout", str(WAIT),
                 "--json", "-n", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answered"] is True and [ln["msg"] for ln in data["lines"]] == [f"second line {marker}"]


@pytest.mark.broker
def test_follow_prints_new_lines_as_they_come(agent: Agent, fleet_cfg: FleetConfig) -> None:
    reg = Registry.open(fleet_cfg.database_url)
    out, stop, rounds = io.StringIO(), threading.Event(), threading.Condition()
    done: list[int] = []

    def on_round(n: int) -> None:
        with rounds:
            done.append(n)
            rounds.notify_all()

    log = logging.getLogger("edge_agent.follow")
    first, second = (f"{w} {uuid.uuid4().hex[:8]}" for w in ("first", "second"))  # the ring is the process's
    log.warning(first)
    with LogClient(fleet_cfg, reg) as client:
        t = threading.Thread(target=follow, args=(client, "cam-logs", stop), daemon=True,
                             kwargs={"level": "WARNING", "interval_s": 0.02, "timeout_s": WAIT, "out": out,
                                     "on_round": on_round})
        t.start()
        with rounds:
            assert rounds.wait_for(lambda: first in out.getvalue(), WAIT)
            log.warning(second)
            assert rounds.wait_for(lambda: second in out.getvalue(), WAIT)
        stop.set()
        t.join(WAIT)
    printed = [ln.split(": ", 1)[1] for ln in out.getvalue().splitlines()]
    assert printed.count(first) == 1 and printed.count(second) == 1 and len(done) >= 2  # each line once
    reg.close()


@pytest.mark.broker
def test_an_agent_that_does_not_know_the_command_gets_no_lines(agent: Agent, fleet_cfg: FleetConfig, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    answer = agent.link.commands.on_logs
    agent.link.commands.on_logs = None  # as an agent from before remote logs: the request is dropped
    assert main(["fleet", "logs", "cam-logs", "-c", str(tmp_path / "fleet.toml"), "--timeout", "0.5"]) == 0
    got = capsys.readouterr()
    assert got.out.strip() == NO_LINES and "cam-logs did not answer within 0.5 s" in got.err
    # The link outlived the command it did not take: the next request (a newer agent) is answered.
    agent.link.commands.on_logs = answer
    logging.getLogger("edge_agent.camera").warning("after the upgrade")
    assert main(["fleet", "logs", "cam-logs", "-c", str(tmp_path / "fleet.toml"), "--timeout", str(WAIT)]) == 0
    assert "after the upgrade" in capsys.readouterr().out
