"""The agent's local HTTP endpoint (stdlib ``http.server``; no extra dependency on a Pi).

    POST /predict   body: raw image bytes (.npy, binary PGM/PPM, PNG/JPEG with Pillow) or a
                    JSON array of pixel rows (application/json) -> the Prediction as JSON
    GET  /healthz   200 {"status": "ok", ...} when a model serves, else 503
    GET  /metrics   Prometheus text format
    GET  /results/latest   the latest result of ``agent run``'s sources (404 before the first)
    GET  /results/stream   the same as Server-Sent Events, one ``event: result`` per result

Bound to 127.0.0.1 unless the config says otherwise.  A bad input is a 400 with the
one-line message, and the server keeps serving.  Hostile input: an image over the pixel
budget is a 413 (refused before decoding), a compressed body (``Content-Encoding``) a 415
(never decompressed), JSON nested too deeply a 400, anything unexpected a 500 -- every
request gets an answer.  The listen backlog is 128 and every socket has a timeout, so a
burst of clients is queued rather than reset and a stalled client cannot hold a thread.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import EdgeloopError, ImageTooLargeError, InputError, ProtocolError
from core.imageio import decode_image_bytes
from core.protocol import parse_json

from .telemetry import prometheus_text

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["AgentHTTPServer", "serve", "decode_image", "metrics_text"]

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128  # http.server's default of 5 reset 72-77 % of 200 concurrent clients
SOCKET_TIMEOUT_S = 30.0  # a client that stops sending or reading loses its connection

_SUFFIX_BY_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"P5", ".pgm"), (b"P6", ".ppm"), (b"BM", ".bmp"),
                    (b"GIF8", ".gif"), (b"RIFF", ".webp"))


def decode_image(body: bytes, content_type: str = "") -> np.ndarray:
    """Request body -> image array; raises :class:`InputError` with a one-line message."""
    if not body:
        raise InputError("empty request body", hint="POST the image bytes or a JSON array")
    if content_type.startswith("application/json") or body[:1] in (b"[", b"{"):
        try:
            data = parse_json(body, max_bytes=len(body), what="request body")
        except ProtocolError as exc:
            raise InputError(str(exc)) from None
        if isinstance(data, dict):
            data = data.get("image")
        try:
            arr = np.asarray(data)
        except ValueError as exc:  # ragged rows
            raise InputError(f"JSON image is not a rectangular array: {exc}") from None
        if arr.dtype.kind == "i" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind not in "iuf":
            raise InputError(f"JSON image must be an array of numbers, got {arr.dtype}",
                             hint="send rows of pixel values 0-255")
        return arr
    if body[:6] == b"\x93NUMPY":
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"cannot read .npy body: {exc}") from None
    if not any(body.startswith(magic) for magic, _ in _SUFFIX_BY_MAGIC):
        raise InputError("unrecognised image format", hint="send .npy, PGM/PPM, PNG or JPEG bytes, or a JSON array")
    # Decoded from memory: no temp file (whose path an error would leak), pixel budget first.
    return decode_image_bytes(body, what="request image")


def metrics_text(agent: Agent) -> str:
    """The agent's counters in the Prometheus text exposition format."""
    snap = agent.stats.snapshot()
    model = agent.model
    q = agent.outbox.stats() if agent.outbox is not None else None
    labels = {"device": agent.device_id, "model_version": model.version if model else "none",
              "variant": model.variant.id if model else "none"}
    dev = {"device": agent.device_id}
    rows: list[tuple[str, str, str, float | None, dict[str, str]]] = [
        ("edgeloop_model_info", "gauge", "The model being served (value 1).", 1.0 if model else None, labels),
        ("edgeloop_inferences_total", "counter", "Predictions served.", float(snap.inferences), dev),
        ("edgeloop_inference_errors_total", "counter", "Rejected inputs.", float(snap.errors), dev),
        ("edgeloop_inference_latency_ms", "gauge", "Latency percentiles over the recent ring.",
         snap.latency_p50_ms, dev | {"quantile": "0.5"}),
        ("edgeloop_inference_latency_ms", "gauge", "", snap.latency_p99_ms, dev | {"quantile": "0.99"}),
        ("edgeloop_drift_alarm", "gauge", "1 while the drift alarm is on.", 1.0 if agent.drift_alarm else 0.0, dev),
        ("edgeloop_outbox_depth", "gauge", "Messages waiting for the broker.", float(q.depth) if q else None, dev),
        ("edgeloop_outbox_bytes", "gauge", "Bytes waiting for the broker.", float(q.bytes) if q else None, dev),
        ("edgeloop_dropped_samples_total", "counter", "Samples dropped because the outbox was full.",
         float(q.dropped_samples) if q else None, dev),
    ]
    rep = agent.reports[-1] if agent.reports else None
    if rep is not None:
        rows.append(("edgeloop_drift_risk", "gauge", "Risk score of the last drift window (alarm above threshold).",
                     float(rep.risk), dev))
    from .pipeline import stream_metric_rows

    rows += stream_metric_rows(agent.stream, agent.device_id)
    return prometheus_text(rows)


class _Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edgeloop-agent"
    timeout = SOCKET_TIMEOUT_S  # socketserver sets it on the connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, data: Any) -> None:
        self._send(code, (json.dumps(data) + "\n").encode())

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        agent = self.server.agent
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            model = agent.model
            data = {"status": "ok" if model else "no-model", "device_id": agent.device_id,
                    "model_version": model.version if model else None,
                    "variant": model.variant.id if model else None, "drift_alarm": agent.drift_alarm}
            self._json(200 if model else 503, data)
        elif path == "/metrics":
            self._send(200, metrics_text(agent).encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path in ("/results/latest", "/results/stream"):
            self._results(path)
        else:
            self._json(404, {"error": f"no route GET {path}"})

    def _results(self, path: str) -> None:
        """The continuous pipeline's results: the latest as JSON, or a Server-Sent-Events stream."""
        hub = self.server.agent.results
        if hub is None:
            self._json(404, {"error": "no continuous source is running", "hint": "edgeloop agent run --source URI"})
            return
        if path == "/results/latest":
            _, text = hub.latest()
            if text is None:
                self._json(404, {"error": "no result yet"})
            else:
                self._send(200, text.encode() + b"\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for event in hub.events(stop=self.server.stopping.is_set):
                self.wfile.write(event)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            pass

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/predict":
            self._json(404, {"error": f"no route POST {path}"})
            return
        try:
            self._predict()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client went away or stalled
            self.close_connection = True
        except Exception:  # every request gets an answer; the server keeps serving
            log.exception("POST /predict failed")
            self.close_connection = True
            self._json(500, {"error": "internal error; see the agent's log"})

    def _predict(self) -> None:
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self.close_connection = True
            self._json(415, {"error": f"Content-Encoding {encoding[:40]!r} is not accepted",
                             "hint": "send the image bytes uncompressed (PNG/JPEG are compressed already)"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > self.server.max_body:
            self.close_connection = True
            self._json(413 if length > 0 else 411, {"error": f"body must have a Content-Length up to "
                                                             f"{self.server.max_body} bytes"})
            return
        body = self.rfile.read(length)
        try:
            image = decode_image(body, self.headers.get("Content-Type", ""))
        except ImageTooLargeError as exc:  # refused before its pixels were decoded
            self.server.agent.stats.record_error()
            self._json(413, {"error": str(exc)})
            return
        except InputError as exc:
            self.server.agent.stats.record_error()
            self._json(400, {"error": str(exc)})
            return
        try:
            pred = self.server.agent.predict(image)
        except InputError as exc:  # counted by the pipeline
            self._json(400, {"error": str(exc)})
            return
        except EdgeloopError as exc:
            self._json(503, {"error": str(exc)})
            return
        self._json(200, pred.to_dict())


class AgentHTTPServer(ThreadingHTTPServer):
    """A threading server bound to one agent; ``port`` is the bound port (useful with port 0)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, agent: Agent, bind: str, port: int) -> None:
        self.agent = agent
        self.max_body = agent.config.http.max_body_bytes
        self.stopping = threading.Event()  # ends Server-Sent-Events streams on shutdown
        super().__init__((bind, port), _Handler)
        self.port = int(self.server_address[1])
        self._thread = threading.Thread(target=self.serve_forever, name="edgeloop-http", daemon=True)

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> AgentHTTPServer:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.stopping.set()
        if self.agent.results is not None:
            self.agent.results.close()  # wakes SSE handlers waiting for the next result
        super().shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def serve(agent: Agent, bind: str = "127.0.0.1", port: int = 8765) -> AgentHTTPServer:
    """Start serving ``agent`` on ``bind:port`` in a background thread."""
    try:
        return AgentHTTPServer(agent, bind, port).start()
    except OSError as exc:
        raise EdgeloopError(f"cannot serve HTTP on {bind}:{port}: {exc.strerror}",
                            hint="choose another [http].port or stop the other process") from exc
