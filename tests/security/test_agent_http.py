"""Hostile clients of the agent's local HTTP endpoint (issue 16 §4): every attack gets a 4xx
(or a closed connection for a client that stalls), and the agent keeps serving predictions."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.http import LISTEN_BACKLOG
from tests.plugins.agent_kit import agent_config, digits

WAIT = 60.0  # upper bound for one wait


@pytest.fixture()
def served(tmp_path: Path, tiny_bundles: dict[str, Path]) -> Iterator[Agent]:
    agent = Agent(agent_config(tmp_path / "state", http={"enabled": True, "port": 0})).start()
    agent.install(tiny_bundles["v1"])
    yield agent
    agent.close()


def _request(agent: Agent, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.http.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _still_predicts(agent: Agent) -> None:
    img = digits().test_x[0]
    status, body = _request(agent, "POST", "/predict", json.dumps(np.asarray(img).tolist()).encode(),
                            {"Content-Type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["model_version"] == "1.0.0"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_hostile_bodies_get_4xx_and_the_agent_keeps_serving(served: Agent) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    status, body = _request(served, "POST", "/predict", deep, {"Content-Type": "application/json"})
    assert status == 400 and b"nested" in body
    bomb = gzip.compress(b"\0" * (50 << 20))  # 50 MB of zeros in ~50 KB
    status, body = _request(served, "POST", "/predict", bomb, {"Content-Encoding": "gzip"})
    assert status == 415, body
    status, body = _request(served, "POST", "/predict", _png_header_only(100_000, 100_000))
    assert status == 413 and b"pixels" in body, body  # refused before a single pixel is decoded
    status, _ = _request(served, "POST", "/predict", b"x" * 64, {"Content-Length": str(1 << 40)})
    assert status == 413
    _still_predicts(served)


def test_a_burst_of_clients_is_queued_not_reset(served: Agent) -> None:
    assert served.http.request_queue_size == LISTEN_BACKLOG >= 128

    def healthz(_: int) -> int:
        return _request(served, "GET", "/healthz")[0]

    with ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(healthz, range(200)))
    assert statuses == [200] * 200
    _still_predicts(served)


def test_a_stalled_client_is_disconnected(served: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(served.http.RequestHandlerClass, "timeout", 0.5)  # the real one is 30 s
    with socket.create_connection(("127.0.0.1", served.http.port), timeout=WAIT) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-a-part")
        _still_predicts(served)  # served meanwhile
        assert sock.recv(4096) == b""  # the server hangs up on the client that stopped sending
    _still_predicts(served)
