"""The edge agent: serves predictions, watches them for drift, installs and rolls back models.

>>> agent = Agent(load_config("agent.toml")).start()
>>> agent.predict(image)          # Prediction(label, confidence, ..., drift_alarm)
>>> agent.install(Path("model-1.2.0.elb"))
>>> agent.close()

``start()`` applies the boot counter, loads the current slot, opens the outbox and, when
a broker is configured, the MQTT link.  All outbound messages go through the outbox; with
no broker they still queue (bounded) so nothing is lost when one is configured later.
``close()`` is a clean stop: the next start is not counted by the boot counter.

The agent only wires the parts together.  Every update and rollback decision (boot
counter, load fallback, install, rollback, confirm) is in :mod:`edge_agent.updates`;
fleet commands run in :mod:`edge_agent.deploy`; drift reports and samples go out through
:mod:`edge_agent.reports`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.agent_config import AgentConfig
from core.drift import DriftReport
from core.errors import EdgeloopError, QueueError
from core.protocol import DeviceState, JobStatus, LogsRequest, Message, Telemetry, TopicScheme, route

from . import sdnotify
from .deploy import CommandWorker
from .inference import FolderSource, InferencePipeline, LoadedModel, Prediction
from .jobs import JobLog
from .logring import LogRing
from .logring import install as install_log_ring
from .outbox import Outbox
from .reports import DriftReporter
from .select import VariantChoice
from .slots import Pointer, SlotStore
from .telemetry import InferenceStats, ProcessSampler
from .updater import Installer, InstallResult, read_slot_manifest, slot_choice
from .updates import Updates

__all__ = ["Agent", "AgentStatus"]

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _pkg_version

    AGENT_VERSION = _pkg_version("edgeloop")
except Exception:  # noqa: BLE001 - a source checkout without metadata
    AGENT_VERSION = "0.0.0+src"


@dataclass(frozen=True)
class AgentStatus:
    """What ``edgeloop agent status`` shows."""

    device_id: str
    model_name: str | None
    model_version: str | None
    variant: str | None
    choice: VariantChoice | None
    slot: str | None
    previous_version: str | None
    confirmed: bool
    boot_count: int
    rolled_back_from: str | None
    drift_alarm: bool
    inferences: int
    errors: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    queue_depth: int
    dropped_samples: int
    state_dir: str


def _hardware() -> dict[str, Any]:
    import os
    import platform

    from .accel import available

    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": os.cpu_count() or 1, "accelerators": [f"{a.format}:{a.id}" for a in available(loaded_only=True)]}


def _score_interval(rate: float) -> float:
    """``[sampling] score_rate`` (inputs per second, 0: all) as the pipeline's seconds between scored inputs."""
    return 1.0 / rate if rate > 0 else 0.0


def _trusted_key(config: AgentConfig) -> Any:
    path = config.trusted_key_path
    if path is None:
        return None
    from core.signing import load_public_key

    try:
        return load_public_key(path)
    except EdgeloopError as exc:
        from core.errors import ConfigError

        raise ConfigError(f"{Path(config.source).name}: [agent].trusted_key cannot be loaded: {exc.message}",
                          hint=exc.hint, key="agent.trusted_key") from exc


def _make_link(config: AgentConfig, outbox: Outbox, topics: TopicScheme, on_command: Callable[[Any], None],
               state: DeviceState) -> Any:
    from core.mqtt import TlsConfig

    from .link import AgentLink

    b = config.broker
    tls = TlsConfig(ca_file=config.path(b.ca_file) if b.ca_file else None) if b.tls else None
    protocol = b.protocol  # one spelling ("auto" | "5" | "3.1.1"): core.protocol.MqttVersion
    return AgentLink(host=b.host, port=b.port, device_id=config.agent.device_id, outbox=outbox,
                     username=b.username or None, password=config.broker_password(), tls=tls, keepalive=b.keepalive,
                     protocol=protocol, topics=topics, on_command=on_command, state=state, receipts=b.receipts,
                     receipt_grace_s=b.receipt_grace_s, receipt_timeout_s=b.receipt_timeout_s)


class _Summary:
    """The agent's periodic INFO line: predictions since the last one (per-prediction lines are DEBUG)."""

    def __init__(self, inferences: int, now: float) -> None:
        self._count, self._since = inferences, now

    def log(self, snap: Any, drift_alarm: bool) -> None:
        now = time.monotonic()
        n, self._count = snap.inferences - self._count, snap.inferences
        span, self._since = now - self._since, now
        if n == 0 and not drift_alarm:
            return
        p50 = "-" if snap.latency_p50_ms is None else f"{snap.latency_p50_ms:.1f} ms"
        log.info("%d predictions in the last %.0f s (latency p50 %s, %d errors in all)%s", n, span, p50,
                 snap.errors, "; DRIFT ALARM" if drift_alarm else "")


def device_state(device_id: str, slots: SlotStore, model: LoadedModel | None, *, online: bool) -> DeviceState:
    """What the device serves (and from which slot, with the variant timings and the previous version)."""
    ptr = slots.pointer()
    choice = slot_choice(slots, ptr.slot) if ptr else None
    prev = read_slot_manifest(slots, ptr.previous) if ptr and ptr.previous else None
    return DeviceState(
        device_id=device_id, online=online, model_name=model.manifest.name if model else None,
        model_version=model.version if model else None, variant=model.variant.id if model else None,
        variants=tuple(v.id for v in model.manifest.variants) if model else (),
        variant_latency_ms=dict(choice.latency_ms) if choice else {}, hardware=_hardware(),
        agent_version=AGENT_VERSION, previous_version=prev.version if prev else None)


class Agent:
    """One device's agent.  Thread-safe: HTTP threads predict while an update installs."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.device_id = config.agent.device_id
        self.slots = SlotStore(config.state_dir, clock=clock)
        self.topics = TopicScheme(config.broker.topic_prefix)
        self.stats = InferenceStats(config.telemetry.latency_window)
        self.drift = DriftReporter(config, self.device_id, self.topics, self.send, self._put_sample)
        self.pipeline = InferencePipeline(None, stats=self.stats, strict_size=config.model.strict_size,
                                          on_report=self.drift.on_report, on_sample=self.drift.on_sample,
                                          score_interval_s=_score_interval(config.sampling.score_rate))
        self.installer = Installer(config, self.slots, trusted_key=_trusted_key(config))
        self.job_log = JobLog(self.device_id, self.send)
        self.updates = Updates(config, self.slots, self.installer, self.job_log, serve=self._serve,
                               serving=lambda: self.pipeline.model, changed=self.publish_state, clock=clock,
                               on_shadow=lambda runner: setattr(self.pipeline, "shadow", runner))
        self.outbox: Outbox | None = None
        self.link: Any = None  # edge_agent.link.AgentLink when a broker is configured
        self.http: Any = None
        self.stream: Any = None  # edge_agent.pipeline.StreamPipeline while `agent run` has sources
        self.results: Any = None  # edge_agent.sinks.ResultHub behind GET /results/*
        self.worker: CommandWorker | None = None  # runs fleet commands (deploy, rollback)
        self.logring: LogRing | None = None  # the process's recent log lines, for cmd/logs
        self._telemetry_seq = 0
        self._sampler = ProcessSampler()

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, connect: bool = True, serve_http: bool | None = None, service: bool = True,
              count_boot: bool = True) -> Agent:
        """Boot counter, load the serving slot, open the outbox, connect, serve HTTP; returns self.

        ``service=False`` (one-shot CLI commands such as ``agent predict``) loads the model
        without counting a boot and without an outbox, MQTT or HTTP; ``count_boot=False``
        (``agent install`` / ``agent rollback`` from the shell) opens the outbox but is not a boot.
        """
        if not service:
            self.updates.load_serving()
            return self
        self.logring = install_log_ring()  # first: the boot counter's and the model load's lines matter most
        self.outbox = Outbox(self.config.state_dir / "outbox.sqlite", max_bytes=self.config.outbox.max_bytes)
        if count_boot:
            self.updates.boot()
        else:
            self.updates.load_serving()
        self.worker = CommandWorker(self.updates, self.job_log, self.send, device_id=self.device_id)
        if connect and self.config.broker.enabled:
            self.logring.add_secret(self.config.broker_password())  # never in a line the fleet reads
            self.link = _make_link(self.config, self.outbox, self.topics, self.worker.on_command,
                                   self.device_state(online=True))
            self.link.commands.on_logs = self._answer_logs
            self.link.start()
        if serve_http if serve_http is not None else self.config.http.enabled:
            from .http import serve

            self.http = serve(self, self.config.http.bind, self.config.http.port)
        self.publish_state()
        return self

    def _serve(self, model: LoadedModel) -> None:
        """Put ``model`` into service (``Updates`` loaded it), closing the one it replaces."""
        self.drift.use_model(model)
        old = self.pipeline.swap(model)
        if old is not None:
            old.close()

    def close(self, *, clean: bool = True) -> None:
        """Stop HTTP and MQTT (publishing ``online=false`` first), close the model and the outbox.

        ``clean=False`` when the agent stops because something failed: the next start then
        counts for the boot counter, as after a crash.
        """
        if self.stream is not None:
            self.stream.stop()
            self.stream = None
        if self.http is not None:
            self.http.shutdown()
            self.http = None
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.link is not None:
            try:
                self.link.close()
            finally:
                self.link = None
        old = self.pipeline.swap(None)
        if old is not None:
            old.close()
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if clean:  # last: a stop that dies half-way is not clean
            self.updates.mark_clean_shutdown()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ inference
    def predict(self, image: Any) -> Prediction:
        """Predict one raw image (uint8 (H, W) or (H, W, C)); raises InputError for a wrong input."""
        return self.pipeline.predict(image)

    @property
    def model(self) -> LoadedModel | None:
        return self.pipeline.model

    @property
    def drift_alarm(self) -> bool:
        m = self.pipeline.model
        return bool(m is not None and m.monitor is not None and m.monitor.alarm)

    # ------------------------------------------------------------------ messages
    @property
    def jobs(self) -> deque[JobStatus]:
        """Recent job steps (status, tests)."""
        return self.job_log.recent

    @property
    def reports(self) -> deque[DriftReport]:
        """Recent drift windows."""
        return self.drift.reports

    def _put_sample(self, topic: str, frame: bytes, priority: int) -> None:
        if self.outbox is not None:
            self.outbox.put(topic, frame, priority, 1)

    def send(self, msg: Message) -> None:
        """Queue a device -> fleet message on its topic with its priority (never raises for a full queue)."""
        if self.outbox is None:
            return
        r = route(msg)
        try:
            self.outbox.put(self.topics.device(self.device_id, r.kind), msg.encode(), r.priority, 1, retain=r.retain)
        except QueueError as exc:
            log.error("outbox refused a %s message: %s", msg.TYPE, exc)

    def _answer_logs(self, req: LogsRequest) -> None:
        """``cmd/logs``: the ring's lines after the fleet's last one, as LogLines on the logs topic."""
        if self.logring is not None:
            for msg in self.logring.answer(self.device_id, req):
                self.send(msg)

    def device_state(self, *, online: bool = True) -> DeviceState:
        return device_state(self.device_id, self.slots, self.pipeline.model, online=online)

    def publish_state(self) -> None:
        """Queue the retained state; the link also makes it its birth message and Last Will."""
        state = self.device_state(online=True)
        if self.link is not None:
            self.link.update_state(state)
        else:
            self.send(state)

    def telemetry(self) -> Telemetry:
        """A telemetry message for the interval since the previous one."""
        snap = self.stats.snapshot(reset_interval=True)
        q = self.outbox.stats() if self.outbox is not None else None
        self._telemetry_seq += 1
        model = self.pipeline.model
        return Telemetry(
            device_id=self.device_id, seq=self._telemetry_seq, model_version=model.version if model else None,
            inferences=snap.inferences, inferences_interval=snap.inferences_interval, errors=snap.errors,
            latency_p50_ms=snap.latency_p50_ms, latency_p99_ms=snap.latency_p99_ms,
            mean_confidence=snap.mean_confidence, cpu_percent=self._sampler.cpu_percent(),
            memory_mb=self._sampler.memory_mb(), queue_depth=q.depth if q else 0, queue_bytes=q.bytes if q else 0,
            dropped_samples=q.dropped_samples if q else 0, drift_alarm=self.drift_alarm,
            latency_hist=snap.latency_hist or {}, errors_interval=snap.errors_interval,
            **(self.stream.telemetry_fields() if self.stream is not None else {}),
            **(self.pipeline.shadow.telemetry_fields() if self.pipeline.shadow is not None else {}))

    # ------------------------------------------------------------------ updates (decided in updates.py)
    @property
    def boot_rollback(self) -> str | None:
        """The slot the boot counter rolled back from at this start, if it did."""
        return self.updates.boot_rollback

    def install(self, bundle_path: str | Path, *, job_id: str | None = None, force: bool = False) -> InstallResult:
        """Verify, unpack, choose variant, health check, switch, serve (:meth:`Updates.install`).

        Every step goes out as a ``JobStatus``; on any failure the old model keeps
        serving and :class:`UpdateError` / :class:`BundleError` is raised.
        """
        return self.updates.install(bundle_path, job_id=job_id, force=force)

    def rollback(self, reason: str = "requested", *, job_id: str | None = None) -> Pointer:
        """Switch back to the previous slot now (RollbackCommand or `edgeloop agent rollback`)."""
        return self.updates.rollback(reason, job_id=job_id)

    def maybe_confirm(self) -> bool:
        """Mark the current slot good once the agent has run ``boot_window_min`` since starting."""
        return self.updates.maybe_confirm()

    def follow_pointer(self) -> bool:
        """Serve the slot ``current`` names if another process (``edgeloop agent install``) switched it."""
        return self.updates.follow_pointer()

    # ------------------------------------------------------------------ status
    def status(self) -> AgentStatus:
        ptr = self.slots.pointer()
        model = self.pipeline.model
        snap = self.stats.snapshot()
        q = self.outbox.stats() if self.outbox is not None else None
        prev = read_slot_manifest(self.slots, ptr.previous) if ptr and ptr.previous else None
        return AgentStatus(
            device_id=self.device_id, model_name=model.manifest.name if model else None,
            model_version=model.version if model else None, variant=model.variant.id if model else None,
            choice=slot_choice(self.slots, ptr.slot) if ptr else None, slot=ptr.slot if ptr else None,
            previous_version=prev.version if prev else None, confirmed=ptr.confirmed if ptr else True,
            boot_count=self.slots.boot_count(), rolled_back_from=ptr.rolled_back_from if ptr else None,
            drift_alarm=self.drift_alarm, inferences=snap.inferences, errors=snap.errors,
            latency_p50_ms=snap.latency_p50_ms, latency_p99_ms=snap.latency_p99_ms,
            queue_depth=q.depth if q else 0, dropped_samples=q.dropped_samples if q else 0,
            state_dir=str(self.config.state_dir))

    # ------------------------------------------------------------------ run loop
    def run(self, stop: threading.Event, *, source: Path | None = None, poll_s: float = 1.0) -> None:
        """Serve until ``stop`` is set: telemetry every interval, boot confirmation, optional folder source."""
        folder = FolderSource(source) if source is not None else None
        next_tele = time.monotonic() + self.config.telemetry.interval_s
        summary = _Summary(self.stats.snapshot().inferences, time.monotonic())
        # systemd (Type=notify, WatchdogSec): ready once serving; the loop itself pings, so a hung
        # loop stops pinging and systemd restarts the agent.  No-ops outside systemd.
        sdnotify.notify("READY=1")
        ping_every, next_ping = sdnotify.watchdog_interval_s(), 0.0
        while not stop.is_set():
            if ping_every is not None and time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
            if folder is not None:
                for path, image in folder.new_images():
                    if stop.is_set():
                        break
                    try:
                        pred = self.predict(image)
                        log.debug("%s -> %s (%.3f)%s", path.name, pred.label, pred.confidence,
                                  " DRIFT ALARM" if pred.drift_alarm else "")
                    except EdgeloopError as exc:
                        log.warning("%s: %s", path.name, exc)
            self.maybe_confirm()
            self.follow_pointer()
            if time.monotonic() >= next_tele:
                self.send(self.telemetry())
                summary.log(self.stats.snapshot(), self.drift_alarm)  # one line per interval, not per prediction
                next_tele = time.monotonic() + self.config.telemetry.interval_s
            stop.wait(min(poll_s, max(0.0, next_tele - time.monotonic())))
        sdnotify.notify("STOPPING=1")
