"""Hostile fleet -> device commands against a real Mosquitto (issue 16 §4): a deeply nested
or oversized command, a frame with a nested header, ``../`` in a job id, a ``file://``
deploy URL.  Each is refused, the old model keeps serving, nothing is written outside the
state directory, and the command thread stays alive: a valid deploy and rollback sent
afterwards still work."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from core import protocol as proto
from core.chunks import CHUNK_MAGIC
from core.errors import UpdateError
from core.mqtt import connect_client
from edge_agent.agent import Agent
from edge_agent.updater import download_http
from tests.plugins.agent_kit import agent_config, digits
from tests.plugins.broker import MosquittoBroker
from tests.plugins.files import FileServer, deploy_command

pytestmark = pytest.mark.broker
WAIT = 60.0  # upper bound for one wait; the tests finish long before
DEV = "dev-hostile"


class Jobs:
    """The fleet side: publishes commands, records the device's job steps."""

    def __init__(self, broker: MosquittoBroker, topics: proto.TopicScheme) -> None:
        self.topics = topics
        self.steps: list[proto.JobStatus] = []
        self._cond = threading.Condition()
        self.conn = connect_client(broker.host, broker.port, client_id=f"fleet-{DEV}", clean=True,
                                   subscriptions=[topics.device(DEV, "jobs")], on_message=self._on_message,
                                   wait_s=WAIT)

    def _on_message(self, msg: Any) -> None:
        with self._cond:
            self.steps.append(proto.decode_as(bytes(msg.payload), proto.JobStatus))
            self._cond.notify_all()

    def publish(self, kind: str, payload: bytes) -> None:
        self.conn.publish(self.topics.command(DEV, kind), payload, qos=1)

    def wait_for(self, predicate: Callable[[], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, WAIT)

    def last(self, job: str) -> str | None:
        return next((s.step for s in reversed(self.steps) if s.job_id == job), None)


@pytest.fixture()
def device(broker: MosquittoBroker, topic_prefix: str, tmp_path: Path,
           tiny_bundles: dict[str, Path]) -> Iterator[tuple[Agent, Jobs]]:
    topics = proto.TopicScheme(topic_prefix)
    jobs = Jobs(broker, topics)
    cfg = agent_config(tmp_path / "state", agent={"device_id": DEV},
                       broker={"enabled": True, "host": broker.host, "port": broker.port,
                               "topic_prefix": topic_prefix})
    agent = Agent(cfg).start()
    agent.install(tiny_bundles["v1"])
    agent.worker.retry_wait_s = 0.0
    assert agent.link.wait_connected(WAIT)
    yield agent, jobs
    agent.close()
    jobs.conn.close()


def _serves(agent: Agent, version: str) -> None:
    assert agent.predict(digits().test_x[0]).model_version == version


def _raw(msg: proto.Message, **override: Any) -> bytes:
    """``msg`` on the wire with fields a well-behaved sender could never construct."""
    return json.dumps(msg.to_dict() | override).encode()


def test_hostile_commands_are_refused_and_the_command_thread_survives(
        device: tuple[Agent, Jobs], file_server: FileServer, tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    agent, jobs = device
    good = deploy_command(file_server, tiny_bundles["v2"], "job-ok", "1.1.0")
    deep = b'{"type":"deploy","schema_version":1,"job_id":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    header = b"[" * 10_000 + b"]" * 10_000  # within the frame header limit, too deep for json
    frame = CHUNK_MAGIC + len(header).to_bytes(2, "big") + header
    secret = tmp_path / "secret.elb"
    secret.write_bytes(tiny_bundles["v2"].read_bytes())  # a valid bundle the attacker wants installed
    hostile = [
        ("deploy", deep),  # RecursionError inside json, once fatal to the command thread
        ("deploy", b'{"type":"deploy","schema_version":1,"pad":"' + b"x" * (2 << 20) + b'"}'),  # 2 MB
        ("bundle", frame),
        ("deploy", _raw(good, job_id="../../escaped")),  # would write state/../../escaped.elb
        ("rollback", _raw(proto.RollbackCommand(job_id="rb", reason="x"), job_id="../rb")),
        ("deploy", _raw(good, job_id="job-file", url=f"file://{secret}")),
        ("deploy", _raw(good, job_id="job-ftp", url="ftp://127.0.0.1/b.elb")),
    ]
    for kind, payload in hostile:
        jobs.publish(kind, payload)
    assert agent.link.wait_until(lambda: agent.link.rejected_commands == len(hostile), WAIT)
    _serves(agent, "1.0.0")
    state = agent.config.state_dir
    assert not list(tmp_path.glob("**/escaped*")) and not (state.parent / "escaped.elb").exists()
    assert not any(j.job_id in ("job-file", "job-ftp") for j in agent.jobs)  # never even started
    # the command thread is alive: a valid deploy, then a valid rollback, both still work
    jobs.publish("deploy", good.encode())
    assert jobs.wait_for(lambda: jobs.last("job-ok") in ("completed", "failed"))
    assert jobs.last("job-ok") == "completed"
    _serves(agent, "1.1.0")
    jobs.publish("rollback", proto.RollbackCommand(job_id="job-rb", reason="operator").encode())
    assert jobs.wait_for(lambda: jobs.last("job-rb") == "rolled_back")
    _serves(agent, "1.0.0")


class _Redirect(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(302)
        self.send_header("Location", self.server.target)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.parametrize("target", ["file:///etc/hostname", "ftp://127.0.0.1/b.elb"])
def test_a_download_redirected_to_another_scheme_is_refused(tmp_path: Path, target: str) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    srv.target = target  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UpdateError, match=r"http\(s\)"):
            download_http(f"http://127.0.0.1:{srv.server_address[1]}/b.elb", tmp_path / "b.elb", size=10,
                          sha256="0" * 64)
        with pytest.raises(UpdateError, match=r"only http\(s\)"):
            download_http(target, tmp_path / "b.elb", size=10, sha256="0" * 64)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not list(tmp_path.iterdir())
