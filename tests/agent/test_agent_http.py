"""The agent's local HTTP endpoint: /predict (npy, PGM, JSON), /healthz, /metrics, and 400s that keep it serving."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, digits


def _req(url: str, body: bytes | None = None, ctype: str = "application/octet-stream") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_config(tmp_path / "state", http={"enabled": True, "port": 0})).start()
    yield a
    a.close()


def test_endpoints(served: Agent, tiny_bundles: dict[str, Path]) -> None:
    base = served.http.url
    assert base.startswith("http://127.0.0.1:")  # localhost unless configured otherwise
    code, body = _req(f"{base}/healthz")
    assert code == 503 and json.loads(body)["status"] == "no-model"
    code, body = _req(f"{base}/predict", _npy(digits().test_x[0]))
    assert code == 503 and "no model is installed" in json.loads(body)["error"]

    served.install(tiny_bundles["v1"])
    code, body = _req(f"{base}/healthz")
    assert code == 200 and json.loads(body)["model_version"] == "1.0.0"

    img = digits().test_x[3]
    direct = served.predict(img)
    code, body = _req(f"{base}/predict", _npy(img))
    assert code == 200
    pred = json.loads(body)
    assert pred["index"] == direct.index and pred["probs"] == pytest.approx(direct.probs, abs=1e-6)
    pgm = b"P5\n8 8\n255\n" + img.tobytes()
    assert json.loads(_req(f"{base}/predict", pgm)[1])["index"] == direct.index
    code, body = _req(f"{base}/predict", json.dumps(img.tolist()).encode(), "application/json")
    assert code == 200 and json.loads(body)["index"] == direct.index

    for bad, ctype in ((_npy(np.zeros((8, 8, 2), np.uint8)), "application/octet-stream"),
                       (b"garbage bytes", "application/octet-stream"),
                       (b"[[1, 2], [3]]", "application/json"),
                       (b"", "application/octet-stream")):
        code, body = _req(f"{base}/predict", bad, ctype)
        err = json.loads(body)["error"]
        assert code == 400 and err and "\n" not in err and "Traceback" not in err
    assert _req(f"{base}/predict", _npy(img))[0] == 200  # still serving

    code, body = _req(f"{base}/metrics")
    text = body.decode()
    assert code == 200
    assert "# TYPE edgeloop_inferences_total counter" in text
    assert 'edgeloop_inferences_total{device="dev-test"} 5.0' in text
    assert 'edgeloop_inference_errors_total{device="dev-test"} 4.0' in text
    assert 'edgeloop_model_info{device="dev-test",model_version="1.0.0",variant="onnx-fp32"} 1.0' in text
    assert 'quantile="0.99"' in text
    assert _req(f"{base}/nope")[0] == 404


def test_body_size_limit(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    cfg = agent_config(tmp_path / "s", http={"enabled": True, "port": 0, "max_body_bytes": 2048})
    with Agent(cfg).start() as a:
        a.install(tiny_bundles["v1"])
        code, body = _req(f"{a.http.url}/predict", _npy(np.zeros((64, 64), np.uint8)))
        assert code == 413 and "2048" in json.loads(body)["error"]
        assert _req(f"{a.http.url}/predict", _npy(digits().test_x[0]))[0] == 200
