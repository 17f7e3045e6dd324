"""Simulated edge devices for the fleet benchmark: one real MQTT session per device, many per thread.

Why this shape.  A thousand :class:`edge_agent.agent.Agent` objects would mean a thousand
paho network threads, command threads and ONNX sessions on a 2-core box: the benchmark
would measure the simulator.  A few paho clients publishing for many device ids would
be cheap but unfaithful (one session, one client id, no per-device Last Will, no
per-device persistent session to queue commands for an offline device, nothing an ACL
could check).  Here every device is its own paho client -- its own TCP connection,
client id, MQTT 5 persistent session, retained birth state and Last Will -- but the
clients are driven by one ``selectors`` loop per process (paho's documented external
event-loop mode: ``loop_read`` / ``loop_write`` / ``loop_misc``), so 1,000 devices cost
one thread.  The messages are the real protocol dataclasses from
:mod:`core.protocol`; updates follow :mod:`edge_agent.deploy` step by step
(HTTP with :func:`edge_agent.updater.download_http`: Range resume and sha256; or MQTT
chunk frames requested with ``BundleRequest`` and reassembled by
:class:`core.chunks.Reassembler`), and the downloaded bundle's signature is checked
with :func:`core.bundle.open_bundle`.  What is *not* simulated: unpacking into a
slot and the ONNX health check (per-device CPU work that says nothing about the fleet).

A swarm runs in a child process (:class:`SwarmHandle`) and obeys commands over a pipe.
QoS 1 messages a device published while disconnected stay in paho's queue and go out on
reconnect, like the agent's outbox; a message counts as *sent* once the broker
acknowledged it (PUBACK), so ``lost = acknowledged - ingested`` is an honest loss count.
Delivery receipts follow the agent's rules (``docs/protocol.md``, "Receipts"): messages of
the receipted kinds carry the ``oid`` user property and, once the device has seen a
receipt, stay held after the PUBACK until the fleet's ``Receipt`` names them; a held
message is sent again when a message PUBACKed ``receipt_grace_s`` later was receipted
first, or after ``receipt_timeout_s`` (doubling per resend).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from core.chunks import Reassembler, parse_frame
from core.errors import EdgeloopError, ProtocolError
from core.protocol import (
    DEFAULT_PREFIX,
    RECEIPT_KINDS,
    RECEIPT_PROPERTY,
    BundleRequest,
    DeployCommand,
    DeviceState,
    DriftReportMsg,
    JobStatus,
    Receipt,
    RollbackCommand,
    TopicScheme,
    decode,
)
from edge_agent.outbox import receipt_overdue
from fleet.mosquitto import MosquittoBroker, find_mosquitto, free_port

__all__ = ["Broker", "find_mosquitto_binary", "free_port", "make_sized_bundle", "SwarmSpec", "SwarmHandle", "run_swarm", "device_ids"]

HOST = "127.0.0.1"
_SESSION_EXPIRY_S = 3600


find_mosquitto_binary = find_mosquitto


def device_ids(n: int, offset: int = 0) -> list[str]:
    return [f"sim-{i:05d}" for i in range(offset, offset + n)]


# --------------------------------------------------------------------------- broker
class Broker(MosquittoBroker):
    """The project's Mosquitto launcher (``fleet.mosquitto``) set up for the fleet benchmark:
    persistence (queued QoS 1 messages survive a restart), ``$SYS`` every second, deep queues."""

    def __init__(self, workdir: Path, *, binary: str | None = None) -> None:
        super().__init__(workdir, persistence=True, binary=binary, max_queued_messages=100_000,
                         extra_conf=("autosave_interval 0", "sys_interval 1", "max_inflight_messages 100",
                                     "persistent_client_expiration 1h"))

    def restart_for(self, down_s: float = 2.0, *, crash: bool = False) -> float:
        """Stop, stay down ``down_s``, start on the same port; returns the seconds it was unreachable.

        ``crash``: SIGKILL instead of SIGTERM, so the broker saves nothing: every session,
        subscription and queued message is gone when it comes back.
        """
        t0 = time.monotonic()
        if crash and self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            (self.workdir / "mosquitto.db").unlink(missing_ok=True)  # nothing saved since start
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0


# --------------------------------------------------------------------------- bundles
def make_sized_bundle(out: Path, *, name: str, version: str, size_bytes: int, signing_key: Any,
                      seed: int = 0) -> Path:
    """A real signed bundle of about ``size_bytes``: a valid ONNX MLP whose hidden layer pads it out.

    The weights are random (incompressible, like real weights) and stored uncompressed, so
    the bundle is as large on the wire as on disk.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from core.bundle import write_bundle
    from core.manifest import InputSpec, Manifest, OutputSpec, Preprocessing, Variant

    hidden = max(8, int(size_bytes / ((64 + 10) * 4)))
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (rng.normal(0, 0.1, (64, hidden)).astype(np.float32), "w1"), (np.zeros(hidden, np.float32), "b1"),
        (rng.normal(0, 0.1, (hidden, 10)).astype(np.float32), "w2"), (np.zeros(10, np.float32), "b2"),
        (np.array([-1, 64], np.int64), "flat_shape"))]
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["embedding"]),
             helper.make_node("Gemm", ["embedding", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "bench_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = Manifest(
        name=name, version=version, created="2025-01-01T00:00:00Z", labels=tuple(str(i) for i in range(10)),
        input=InputSpec(name="x", shape=(-1, 1, 8, 8)), outputs=OutputSpec(embedding_dim=hidden),
        preprocessing=Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,), scale=1.0 / 255.0),
        variants=(Variant(id="onnx-fp32", format="onnx", precision="fp32", file="models/onnx-fp32.onnx"),),
        baseline=None, health=None)
    return write_bundle(out, manifest, {"models/onnx-fp32.onnx": model.SerializeToString()},
                        signing_key=signing_key)


# --------------------------------------------------------------------------- the swarm
@dataclass(frozen=True)
class SwarmSpec:
    """One process's devices and how they behave."""

    port: int
    device_ids: tuple[str, ...]
    host: str = HOST
    prefix: str = DEFAULT_PREFIX
    model_name: str = "bench-model"
    version: str = "1.0.0"
    delivery: str = "http"  # what the devices accept: "http" or "mqtt"
    workdir: str = ""
    trusted_key: str | None = None  # public key file: verify downloaded bundles' signatures
    download_threads: int = 6
    corrupt_retries: int = 2  # the agent's update.mqtt_corrupt_retries: ask again from chunk 0
    rerequest_s: float = 10.0  # MQTT delivery: ask again from the first missing chunk after this silence
    job_timeout_s: float = 600.0
    keepalive: int = 60
    receipts: bool = True  # the agent's mqtt.receipts
    receipt_grace_s: float = 10.0
    receipt_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.delivery not in ("http", "mqtt"):
            raise ValueError(f"delivery must be 'http' or 'mqtt', got {self.delivery!r}")


@dataclass
class _Job:
    cmd: DeployCommand
    started: float
    reasm: Reassembler | None = None
    last_frame: float = 0.0
    retries_left: int = 0


class _OidProperty(Properties):
    """The ``oid`` user property, packed once: paho's ``Properties`` costs ~30 µs to build
    and pack, the simulator sends thousands of messages a second (the bytes are the same)."""

    def __init__(self, oid: int) -> None:  # skips Properties' slow set-up and validation
        key, val = RECEIPT_PROPERTY.encode(), str(oid).encode()
        body = b"\x26" + len(key).to_bytes(2, "big") + key + len(val).to_bytes(2, "big") + val
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed  # type: ignore[no-any-return]


@dataclass
class _Held:
    topic: str
    payload: bytes
    seq: int  # drift seq, -1 for other kinds
    sent: float | None = None  # PUBACK time while awaiting the receipt
    resends: int = 0
    acked_once: bool = False


@dataclass
class _Device:
    id: str
    client: Any
    version: str
    previous: str | None = None
    seq: int = 0
    connected: bool = False
    forced_offline: bool = False
    started: bool = False
    reconnect_at: float | None = None
    backoff: float = 1.0
    sock: Any = None
    inflight: dict[int, int] = field(default_factory=dict)  # paho mid -> oid (0: not a receipted kind)
    held: dict[int, _Held] = field(default_factory=dict)  # oid -> message kept until the fleet's receipt
    next_oid: int = 1
    receipts_seen: bool = False
    watermark: float = 0.0  # newest PUBACK time among receipted messages
    acked_drift: list[int] = field(default_factory=list)
    job: _Job | None = None
    done_jobs: dict[str, str] = field(default_factory=dict)
    installed_sha: str | None = None
    bricked: bool = False
    corrupt_seen: int = 0  # corrupt transfers this device detected (a redelivered bad chunk counts again)


class _Swarm:
    """The event loop of one process: many paho clients, one selector, one thread (+ download pool)."""

    def __init__(self, spec: SwarmSpec, conn: Any) -> None:
        self.spec = spec
        self.conn = conn
        self.topics = TopicScheme(spec.prefix)
        self.sel = selectors.DefaultSelector()
        self.devices: dict[str, _Device] = {}
        self.dirty: set[str] = set()
        self.writing: set[str] = set()
        self.events: deque[tuple[Any, ...]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(conn, selectors.EVENT_READ, "pipe")
        self.pool = ThreadPoolExecutor(spec.download_threads, thread_name_prefix="dl")
        self.workdir = Path(spec.workdir or tempfile.mkdtemp(prefix="edgeloop-swarm-"))
        self.key = None
        if spec.trusted_key:
            from core.signing import load_public_key

            self.key = load_public_key(Path(spec.trusted_key))
        self.report_rate = 0.0
        self.report_until = 0.0
        self.report_t0 = 0.0
        self.report_done = 0
        self.report_rr = 0
        self.waiting_reports: list[Any] = []
        self.burst_left = 0
        self._order: list[_Device] = []
        self.counters = {"published": 0, "acked": 0, "reconnects": 0, "bundle_frame_bytes": 0, "http_bytes": 0,
                         "jobs_completed": 0, "jobs_failed": 0, "corrupt_detected": 0, "bundle_requests": 0,
                         "commands": 0, "receipts": 0, "receipted": 0, "resent": 0}
        self.stopping = False

    # ------------------------------------------------------------------ paho plumbing
    def _make_client(self, dev_id: str) -> Any:
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=dev_id, protocol=paho.MQTTv5)
        offline = DeviceState(device_id=dev_id, online=False, model_name=self.spec.model_name)
        c.will_set(self.topics.device(dev_id, "state"), offline.encode(), qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_message, c.on_publish = (
            self._on_connect, self._on_disconnect, self._on_message, self._on_publish)
        c.on_socket_open, c.on_socket_close = self._on_socket_open, self._on_socket_close
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = _SESSION_EXPIRY_S
        c._bench_props = props  # noqa: SLF001 - kept with the client for reconnects
        return c

    def _on_socket_open(self, client: Any, dev: _Device, sock: Any) -> None:
        dev.sock = sock
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: Any, dev: _Device, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        self.writing.discard(dev.id)
        dev.sock = None

    def _on_connect(self, client: Any, dev: _Device, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        dev.connected, dev.backoff = True, 1.0
        client.subscribe(self.topics.device_commands(dev.id), qos=1)
        self._publish(dev, self.topics.device(dev.id, "state"), self._state(dev).encode(), retain=True)

    def _on_disconnect(self, client: Any, dev: _Device, flags: Any, reason: Any, props: Any) -> None:
        dev.connected = False
        if not dev.forced_offline and not self.stopping:
            dev.reconnect_at = time.monotonic() + dev.backoff * (0.5 + random.random())
            dev.backoff = min(10.0, dev.backoff * 2)

    def _on_publish(self, client: Any, dev: _Device, mid: int, reason: Any, props: Any) -> None:
        oid = dev.inflight.pop(mid, None)
        if oid is None:
            return
        held = dev.held.get(oid)
        if held is None:
            self.counters["acked"] += 1  # not a receipted kind (or a receipt overtook the PUBACK)
            return
        if not held.acked_once:
            held.acked_once = True
            self.counters["acked"] += 1
            if held.seq >= 0:
                dev.acked_drift.append(held.seq)
        if dev.receipts_seen and self.spec.receipts:
            held.sent = time.monotonic()
        else:
            del dev.held[oid]  # no fleet receipts (yet): the PUBACK is the end, like the agent

    def _publish(self, dev: _Device, topic: str, payload: bytes, *, retain: bool = False, seq: int = -1) -> None:
        kind = topic.rsplit("/", 1)[-1]
        if kind in RECEIPT_KINDS:
            oid, dev.next_oid = dev.next_oid, dev.next_oid + 1
            dev.held[oid] = _Held(topic, payload, seq)
            self._send_held(dev, oid)
            return
        info = dev.client.publish(topic, payload, qos=1, retain=retain)
        dev.inflight[info.mid] = 0
        self.counters["published"] += 1
        self.dirty.add(dev.id)

    def _send_held(self, dev: _Device, oid: int) -> None:
        held = dev.held[oid]
        info = dev.client.publish(held.topic, held.payload, qos=1, properties=_OidProperty(oid))
        dev.inflight[info.mid] = oid
        self.counters["published"] += 1
        self.dirty.add(dev.id)

    def _on_receipt(self, dev: _Device, payload: bytes) -> None:
        try:
            r = decode(payload)
        except ProtocolError:
            return
        if not isinstance(r, Receipt):
            return
        self.counters["receipts"] += 1
        dev.receipts_seen = True
        for oid in r.ids:
            held = dev.held.pop(oid, None)
            if held is not None:
                self.counters["receipted"] += 1
                if held.sent is not None:
                    dev.watermark = max(dev.watermark, held.sent)

    def _requeue_overdue(self, dev: _Device, now: float) -> None:
        """The agent's ``Outbox.requeue_overdue``: send again what the fleet evidently lost."""
        for oid, held in list(dev.held.items()):
            if held.sent is None:
                continue
            if receipt_overdue(held.sent, held.resends, now, watermark=dev.watermark,
                               grace_s=self.spec.receipt_grace_s, timeout_s=self.spec.receipt_timeout_s):
                held.sent, held.resends = None, held.resends + 1
                self.counters["resent"] += 1
                self._send_held(dev, oid)

    def _state(self, dev: _Device) -> DeviceState:
        return DeviceState(device_id=dev.id, online=True, model_name=self.spec.model_name, model_version=dev.version,
                           variant="onnx-fp32", variants=("onnx-fp32",), agent_version="sim",
                           delivery=(self.spec.delivery,), previous_version=dev.previous)

    def _send(self, dev: _Device, msg: Any) -> None:
        kind = {"job": "jobs", "bundle-req": "bundle-req", "drift": "drift"}[msg.TYPE]
        self._publish(dev, self.topics.device(dev.id, kind), msg.encode())

    def _connect(self, dev: _Device) -> None:
        try:
            if not dev.started:
                dev.started = True
                dev.client.connect(self.spec.host, self.spec.port, keepalive=self.spec.keepalive, clean_start=False,
                                   properties=dev.client._bench_props)  # noqa: SLF001
            else:
                self.counters["reconnects"] += 1
                dev.client.reconnect()
            dev.reconnect_at = None
        except OSError:
            dev.reconnect_at = time.monotonic() + dev.backoff * (0.5 + random.random())
            dev.backoff = min(10.0, dev.backoff * 2)

    # ------------------------------------------------------------------ commands from the fleet
    def _on_message(self, client: Any, dev: _Device, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind == "receipt":
            self._on_receipt(dev, msg.payload)
            return
        try:
            if kind == "bundle":
                self.counters["bundle_frame_bytes"] += len(msg.payload)
                self._on_frame(dev, msg.payload)
                return
            cmd = decode(msg.payload)
        except ProtocolError:
            return
        self.counters["commands"] += 1
        if isinstance(cmd, DeployCommand):
            self._on_deploy(dev, cmd)
        elif isinstance(cmd, RollbackCommand):
            to = cmd.to_version or dev.previous or dev.version
            dev.previous, dev.version = dev.version, to
            self._job(dev, cmd.job_id, to, "rolled_back", True, "rolled back")
            self._publish(dev, self.topics.device(dev.id, "state"), self._state(dev).encode(), retain=True)

    def _job(self, dev: _Device, job_id: str, version: str, step: str, ok: bool = True, detail: str = "",
             progress: float | None = None) -> None:
        self._send(dev, JobStatus(device_id=dev.id, job_id=job_id, version=version, step=step, ok=ok,
                                  detail=detail[:200], progress=progress, previous_version=dev.version))

    def _on_deploy(self, dev: _Device, cmd: DeployCommand) -> None:
        if cmd.job_id in dev.done_jobs or (dev.job is not None and dev.job.cmd.job_id == cmd.job_id):
            return  # QoS 1 redelivery of a job already handled or under way
        if cmd.version == dev.version:
            self._job(dev, cmd.job_id, cmd.version, "completed", True, "already serving this version", 1.0)
            dev.done_jobs[cmd.job_id] = "completed"
            return
        self._job(dev, cmd.job_id, cmd.version, "received", True, f"{cmd.delivery} delivery, {cmd.size} bytes", 0.0)
        dev.job = _Job(cmd, time.monotonic(), retries_left=self.spec.corrupt_retries)
        if cmd.delivery == "http":
            self._job(dev, cmd.job_id, cmd.version, "downloading", True, str(cmd.url), 0.0)
            self.pool.submit(self._http_job, dev.id, cmd)
        else:
            self._request_chunks(dev, 0)

    def _request_chunks(self, dev: _Device, start: int) -> None:
        job = dev.job
        assert job is not None
        if start == 0 or job.reasm is None:
            job.reasm = Reassembler(max_transfers=1, max_bytes=job.cmd.size + (1 << 20), ttl_s=3600.0)
        job.last_frame = time.monotonic()
        self.counters["bundle_requests"] += 1
        self._job(dev, job.cmd.job_id, job.cmd.version, "downloading", True, f"requesting chunks from {start}")
        self._send(dev, BundleRequest(device_id=dev.id, job_id=job.cmd.job_id, version=job.cmd.version, start=start))

    def _on_frame(self, dev: _Device, payload: bytes) -> None:
        job = dev.job
        if job is None or job.reasm is None:
            return
        try:
            frame = parse_frame(payload)
            if frame.transfer_id != job.cmd.job_id:
                return
            job.last_frame = time.monotonic()
            done = job.reasm.add(frame)
        except ProtocolError as exc:
            self.counters["corrupt_detected"] += 1
            dev.corrupt_seen += 1
            if job.retries_left > 0:
                job.retries_left -= 1
                self._request_chunks(dev, 0)
            else:
                self._finish(dev, job.cmd, ok=False, detail=f"bundle transfer: {exc}")
            return
        if done is None:
            return
        if done.sha256 != job.cmd.sha256 or len(done.data) != job.cmd.size:
            self._finish(dev, job.cmd, ok=False, detail="bundle sha256 does not match the deploy command")
            return
        self.pool.submit(self._verify_job, dev.id, job.cmd, done.data)

    # worker threads: results come back through self.events
    def _post(self, *event: Any) -> None:
        self.events.append(event)
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass

    def _http_job(self, dev_id: str, cmd: DeployCommand) -> None:
        from edge_agent.updater import download_http

        dest = self.workdir / dev_id / f"{cmd.job_id}.elb"
        step = [0.0]

        def progress(have: int, total: int) -> None:
            if have / total - step[0] >= 0.25:  # a few reports per download, like the agent
                step[0] = have / total
                self._post("job", dev_id, cmd, "downloading", True, f"{have}/{total} bytes", round(have / total, 3))

        err = ""
        for attempt in range(3):  # the agent's retries: only an interrupted download is worth another try
            try:
                download_http(str(cmd.url), dest, size=cmd.size, sha256=cmd.sha256, timeout=60.0, progress=progress)
            except EdgeloopError as exc:
                err = str(exc)
                if "received" not in getattr(exc, "context", {}):
                    break
                time.sleep(1.0 * (attempt + 1))
                continue
            self._post("http_bytes", cmd.size)
            self._verify_job(dev_id, cmd, None, dest)
            return
        shutil.rmtree(dest.parent, ignore_errors=True)
        self._post("done", dev_id, cmd, False, f"download: {err}", None)

    def _verify_job(self, dev_id: str, cmd: DeployCommand, data: bytes | None, path: Path | None = None) -> None:
        from core.bundle import open_bundle

        try:
            if path is None:
                path = self.workdir / dev_id / f"{cmd.job_id}.elb"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data or b"")
            self._post("job", dev_id, cmd, "verifying", True, f"checking {path.name}", None)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            open_bundle(path, trusted_key=self.key, require_signature=self.key is not None)
            for step in ("installing", "health_check", "switched"):
                self._post("job", dev_id, cmd, step, True, "simulated", None)
            self._post("done", dev_id, cmd, True, "", sha)
        except EdgeloopError as exc:
            self._post("done", dev_id, cmd, False, f"verify: {exc}", None)
        finally:
            shutil.rmtree(self.workdir / dev_id, ignore_errors=True)

    def _finish(self, dev: _Device, cmd: DeployCommand, *, ok: bool, detail: str, sha: str | None = None) -> None:
        if dev.job is None or dev.job.cmd.job_id != cmd.job_id:
            return
        dev.job = None
        if ok:
            if sha != cmd.sha256:  # installing anything but the announced bundle would brick the device
                dev.bricked = True
            dev.previous, dev.version, dev.installed_sha = dev.version, cmd.version, sha
            self._job(dev, cmd.job_id, cmd.version, "completed", True, "", 1.0)
            self._publish(dev, self.topics.device(dev.id, "state"), self._state(dev).encode(), retain=True)
            self.counters["jobs_completed"] += 1
        else:
            self._job(dev, cmd.job_id, cmd.version, "failed", False, detail)
            self.counters["jobs_failed"] += 1
        dev.done_jobs[cmd.job_id] = "completed" if ok else "failed"

    def _drain_events(self) -> None:
        while self.events:
            ev = self.events.popleft()
            if ev[0] == "http_bytes":
                self.counters["http_bytes"] += ev[1]
                continue
            dev = self.devices[ev[1]]
            cmd: DeployCommand = ev[2]
            if ev[0] == "job":
                self._job(dev, cmd.job_id, cmd.version, ev[3], ev[4], ev[5], ev[6])
            else:
                self._finish(dev, cmd, ok=ev[3], detail=ev[4], sha=ev[5])

    # ------------------------------------------------------------------ drift reports
    def _report(self, dev: _Device) -> None:
        dev.seq += 1
        r = random.random()
        msg = DriftReportMsg(device_id=dev.id, seq=dev.seq, window=100, n=100, model_version=dev.version,
                             scores={"confidence": round(r, 4), "entropy": round(1 - r, 4), "embedding": 0.01,
                                     "input": 0.02},
                             thresholds={"confidence": 0.9, "entropy": 0.9, "embedding": 0.9, "input": 0.9},
                             flags={"confidence": False, "entropy": False, "embedding": False, "input": False},
                             risk=round(r / 2, 4), mean_confidence=0.93,
                             class_counts=(10, 11, 9, 10, 10, 12, 8, 10, 10, 10))
        self._publish(dev, self.topics.device(dev.id, "drift"), msg.encode(), seq=dev.seq)

    def _next_reporter(self) -> _Device:
        if len(self._order) != len(self.devices):
            self._order = list(self.devices.values())
        dev = self._order[self.report_rr % len(self._order)]
        self.report_rr += 1
        return dev

    def _due_reports(self, now: float) -> float | None:
        """Publish what the schedule (or a burst) says is due; returns seconds until the next one."""
        if self.burst_left > 0:  # as fast as the loop goes, a bounded slice per pass so reads are never starved
            for _ in range(min(self.burst_left, 500)):
                self._report(self._next_reporter())
                self.burst_left -= 1
            return 0.0
        if self.report_rate <= 0:
            return None
        horizon = min(now, self.report_until)
        total = int((horizon - self.report_t0) * self.report_rate)
        if now >= self.report_until:  # the whole schedule, exactly: rate x duration, rounded once
            total = round((self.report_until - self.report_t0) * self.report_rate)
        for _ in range(min(total - self.report_done, 2000)):
            self._report(self._next_reporter())
            self.report_done += 1
        if now >= self.report_until and self.report_done >= total:
            self.report_rate = 0.0
            return None
        return 1.0 / self.report_rate

    # ------------------------------------------------------------------ control
    def _control(self, cmd: tuple[Any, ...]) -> Any:
        op = cmd[0]
        if op == "reports":  # ("reports", total rate per s, duration s)
            self.report_rate, self.report_t0 = float(cmd[1]), time.monotonic()
            self.report_until, self.report_done = self.report_t0 + float(cmd[2]), 0
            return {"ok": True}
        if op == "burst":  # ("burst", n): publish n reports round-robin as fast as possible
            self.burst_left += int(cmd[1])
            return {"ok": True}
        if op == "offline":
            for d in cmd[1]:
                dev = self.devices[d]
                dev.forced_offline = True
                if dev.sock is not None:  # vanish without DISCONNECT: the broker publishes the Last Will
                    try:
                        dev.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return {"ok": True}
        if op == "online":
            for d in cmd[1]:
                dev = self.devices[d]
                dev.forced_offline = False
                dev.reconnect_at = time.monotonic()
            return {"ok": True}
        if op == "stats":
            devs = self.devices.values()
            return {"counters": dict(self.counters),
                    "connected": sum(d.connected for d in devs),
                    "acked_drift": {d.id: list(d.acked_drift) for d in devs},
                    "generated_drift": {d.id: d.seq for d in devs},
                    "versions": {d.id: d.version for d in devs},
                    "installed_sha": {d.id: d.installed_sha for d in devs},
                    "bricked": [d.id for d in devs if d.bricked],
                    "corrupt_seen": [d.id for d in devs if d.corrupt_seen],
                    "busy_jobs": sum(d.job is not None for d in devs),
                    "unacked": sum(len(d.inflight) for d in devs),
                    "reporting": int(self.report_rate > 0 or self.burst_left > 0),
                    "awaiting_receipt": sum(1 for d in devs for h in d.held.values() if h.sent is not None),
                    "held": sum(len(d.held) for d in devs)}
        raise ValueError(f"unknown swarm command {op!r}")

    def _reply(self, value: Any) -> None:
        self.conn.send(value)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        ids = self.spec.device_ids
        for i in ids:
            dev = _Device(i, None, self.spec.version)
            dev.client = self._make_client(i)
            dev.client.user_data_set(dev)
            self.devices[i] = dev
        pending = list(ids)
        last_misc = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            for _ in range(min(50, len(pending))):  # connect in small batches: the accept backlog is finite
                self._connect(self.devices[pending.pop(0)])
            wait = 0.05
            nxt = self._due_reports(now)
            if nxt is not None:
                wait = min(wait, nxt if nxt == 0.0 else max(0.0005, nxt))
            for key, mask in self.sel.select(wait if not pending else 0):
                obj = key.data
                if obj == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                elif obj == "pipe":
                    self._on_pipe()
                else:
                    dev = obj
                    if mask & selectors.EVENT_READ:
                        dev.client.loop_read(20)
                    if mask & selectors.EVENT_WRITE:
                        dev.client.loop_write()
                    self.dirty.add(dev.id)
            self._drain_events()
            self._flush()
            now = time.monotonic()
            if now - last_misc >= 0.5:
                last_misc = now
                self._misc(now)
        self._shutdown()

    def _on_pipe(self) -> None:
        while self.conn.poll():
            cmd = self.conn.recv()
            if cmd[0] == "stop":
                self.stopping = True
                return
            try:
                self._reply(self._control(cmd))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, the loop keeps going
                self._reply({"error": repr(exc)})

    def _flush(self) -> None:
        for dev_id in self.dirty:
            dev = self.devices[dev_id]
            c = dev.client
            if dev.sock is None:
                continue
            if c.want_write():
                c.loop_write()
            want = c.want_write()
            if want and dev_id not in self.writing:
                self.sel.modify(dev.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)
                self.writing.add(dev_id)
            elif not want and dev_id in self.writing:
                self.sel.modify(dev.sock, selectors.EVENT_READ, dev)
                self.writing.discard(dev_id)
        self.dirty.clear()

    def _misc(self, now: float) -> None:
        for dev in self.devices.values():
            if dev.sock is not None:
                dev.client.loop_misc()
                if dev.held and dev.connected:
                    self._requeue_overdue(dev, now)
            elif dev.reconnect_at is not None and now >= dev.reconnect_at and not dev.forced_offline:
                self._connect(dev)
            job = dev.job
            if job is not None and job.cmd.delivery == "mqtt" and dev.connected:
                if now - job.started > self.spec.job_timeout_s:
                    self._finish(dev, job.cmd, ok=False, detail="bundle did not arrive in time")
                elif job.reasm is not None and now - job.last_frame > self.spec.rerequest_s:
                    missing = job.reasm.missing(job.cmd.job_id)
                    self._request_chunks(dev, missing[0] if missing else 0)
        self._flush()

    def _shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for dev in self.devices.values():
            if dev.sock is not None:
                dev.client.disconnect()
                try:
                    dev.client.loop_write()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_swarm(spec: SwarmSpec, conn: Any) -> None:
    """Child-process entry point."""
    try:
        _Swarm(spec, conn).run()
    finally:
        conn.close()


class SwarmHandle:
    """A swarm in a child process ("spawn": no inherited threads or sockets)."""

    def __init__(self, spec: SwarmSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_swarm, args=(spec, child), name="fleet-swarm", daemon=True)
        self.proc.start()
        child.close()
        self._lock = threading.Lock()

    def call(self, *cmd: Any, timeout: float = 60.0) -> Any:
        with self._lock:
            self.conn.send(cmd)
            if not self.conn.poll(timeout):
                raise EdgeloopError(f"swarm did not answer {cmd[0]!r} within {timeout:g} s")
            out = self.conn.recv()
        if isinstance(out, dict) and "error" in out:
            raise EdgeloopError(f"swarm error on {cmd[0]!r}: {out['error']}")
        return out

    def stop(self, timeout: float = 15.0) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def start_swarms(port: int, ids: Sequence[str], processes: int, **spec: Any) -> list[SwarmHandle]:
    """Split ``ids`` over ``processes`` child processes."""
    n = max(1, processes)
    parts = [tuple(ids[i::n]) for i in range(n)]
    return [SwarmHandle(SwarmSpec(port=port, device_ids=p, **spec)) for p in parts if p]
