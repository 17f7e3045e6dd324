"""The edge agent: serves predictions, watches them for drift, installs and rolls back models.

>>> agent = Agent(load_config("agent.toml")).start()
>>> agent.predict(image)          # Prediction(label, confidence, ..., drift_alarm)
>>> agent.install(Path("model-1.2.0.elb"))
>>> agent.close()

``start()`` applies the boot counter (a model that keeps the agent from running for
``[update].boot_window_min`` after a switch is rolled back after ``max_boots`` starts),
loads the current slot, opens the outbox and, when a broker is configured, the MQTT
link.  All outbound messages go through the outbox; with no broker they still queue
(bounded) so nothing is lost when one is configured later.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import chunks
from core.drift import DriftReport
from core.errors import EdgeloopError, QueueError, UpdateError
from core.manifest import Manifest
from core.protocol import (
    PRIORITY_SAMPLES,
    SAMPLES_KIND,
    DeviceState,
    DriftReportMsg,
    JobStatus,
    Message,
    Telemetry,
    TopicScheme,
    route,
)
from core.sampling import DriftSample, SampleSelector, encode_sample

from core.agent_config import AgentConfig
from .deploy import CommandWorker
from .inference import FolderSource, InferencePipeline, LoadedModel, Prediction
from .outbox import Outbox
from .select import VariantChoice
from .slots import Pointer, SlotStore
from .telemetry import InferenceStats, ProcessSampler
from .updater import Installer, InstallResult, read_slot_manifest, slot_choice

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

    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": os.cpu_count() or 1}


class Agent:
    """One device's agent.  Thread-safe: HTTP threads predict while an update installs."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.device_id = config.agent.device_id
        self._clock = clock
        self.slots = SlotStore(config.state_dir, clock=clock)
        self.topics = TopicScheme(config.broker.topic_prefix)
        self.stats = InferenceStats(config.telemetry.latency_window)
        self.pipeline = InferencePipeline(None, stats=self.stats, strict_size=config.model.strict_size,
                                          on_report=self._on_report, on_sample=self._on_sample)
        self.installer = Installer(config, self.slots, trusted_key=self._trusted_key())
        self.outbox: Outbox | None = None
        self.link: Any = None  # edge_agent.link.AgentLink when a broker is configured
        self.http: Any = None
        self.worker: CommandWorker | None = None  # runs fleet commands (deploy, rollback)
        self.selector: SampleSelector | None = None
        self.jobs: deque[JobStatus] = deque(maxlen=200)  # recent job steps (status, tests)
        self.reports: deque[DriftReport] = deque(maxlen=50)
        self._update_lock = threading.Lock()
        self._seq = {"drift": 0, "telemetry": 0}
        self._started_at = clock()
        self._sampler = ProcessSampler()
        self._last_reservoir = time.monotonic()
        self.boot_rollback: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def _trusted_key(self) -> Any:
        path = self.config.trusted_key_path
        if path is None:
            return None
        from core.signing import load_public_key

        try:
            return load_public_key(path)
        except EdgeloopError as exc:
            from core.errors import ConfigError

            raise ConfigError(f"{Path(self.config.source).name}: [agent].trusted_key cannot be loaded: {exc.message}",
                              hint=exc.hint, key="agent.trusted_key") from exc

    def start(self, *, connect: bool = True, serve_http: bool | None = None, service: bool = True,
              count_boot: bool = True) -> Agent:
        """Boot counter, load the serving slot, open the outbox, connect, serve HTTP; returns self.

        ``service=False`` (one-shot CLI commands such as ``agent predict``) loads the model
        without counting a boot and without an outbox, MQTT or HTTP; ``count_boot=False``
        (``agent install`` / ``agent rollback`` from the shell) opens the outbox but is not a boot.
        """
        self._started_at = self._clock()
        if not service:
            self._load_serving()
            return self
        self.outbox = Outbox(self.config.state_dir / "outbox.sqlite", max_bytes=self.config.outbox.max_bytes)
        if count_boot:
            self._boot()
        else:
            self._load_serving()
        self.worker = CommandWorker(self)
        if connect and self.config.broker.enabled:
            self.link = self._make_link()
            self.link.start()
        if serve_http if serve_http is not None else self.config.http.enabled:
            from .http import serve

            self.http = serve(self, self.config.http.bind, self.config.http.port)
        self.publish_state()
        return self

    def _make_link(self) -> Any:
        from core.mqtt import TlsConfig

        from .link import AgentLink

        b = self.config.broker
        tls = TlsConfig(ca_file=Path(b.ca_file) if b.ca_file else None) if b.tls else None
        protocol = {"auto": "auto", "mqtt5": "5", "mqtt311": "3.1.1"}[b.protocol]
        return AgentLink(host=b.host, port=b.port, device_id=self.device_id, outbox=self.outbox,  # type: ignore[arg-type]
                         username=b.username or None, password=b.secret(), tls=tls, keepalive=b.keepalive,
                         protocol=protocol, topics=self.topics, on_command=self.worker.on_command,  # type: ignore[union-attr]
                         state=self.device_state(online=True), receipts=b.receipts,
                         receipt_grace_s=b.receipt_grace_s, receipt_timeout_s=b.receipt_timeout_s)

    def _boot(self) -> None:
        window_s = self.config.update.boot_window_min * 60.0
        boots = self.slots.record_boot(window_s)
        ptr = self.slots.pointer()
        if ptr is not None and boots >= self.config.update.max_boots and ptr.previous:
            reason = f"{boots} starts within {self.config.update.boot_window_min:g} min of the switch"
            log.warning("boot counter: rolling back from %s (%s)", ptr.slot, reason)
            bad = read_slot_manifest(self.slots, ptr.slot)
            self.slots.rollback(reason)
            self.boot_rollback = ptr.slot
            self._job(f"boot-{uuid.uuid4().hex[:8]}", bad.version if bad else ptr.slot, "rolled_back", False, reason)
        self._load_serving()

    def _load_serving(self) -> None:
        """Open the serving slot; if it will not load and a previous one exists, roll back to that."""
        name = self.slots.serving_slot()
        if name is None:
            log.warning("no model installed yet; install one with `edgeloop agent install BUNDLE`")
            return
        try:
            self._swap_in(name)
        except EdgeloopError as exc:
            ptr = self.slots.pointer()
            if ptr is None or not ptr.previous or ptr.previous == name:
                raise
            log.error("slot %s does not load (%s); rolling back to %s", name, exc, ptr.previous)
            self.slots.rollback(f"current slot does not load: {exc}")
            self._swap_in(self.slots.pointer().slot)  # type: ignore[union-attr]

    def _swap_in(self, name: str) -> LoadedModel:
        info = self.slots.read_info(name)
        manifest = read_slot_manifest(self.slots, name)
        if manifest is None:
            raise UpdateError(f"slot {name} has no readable manifest", path=str(self.slots.slot_path(name)))
        variant = info.get("variant") or manifest.variants[0].id
        m = self.config.model
        model = LoadedModel(self.slots.slot_path(name), variant, threads=m.threads,
                            drift=self.config.drift.enabled, drift_window=self.config.drift.window)
        self._make_selector(model)
        old = self.pipeline.swap(model)
        if old is not None:
            old.close()
        log.info("serving %s %s (%s) from slot %s", manifest.name, manifest.version, variant, name)
        return model

    def _make_selector(self, model: LoadedModel) -> None:
        s = self.config.sampling
        if not s.enabled:
            self.selector = None
            return
        thr = model.baseline.sample_score_q99 if model.baseline is not None else float("inf")
        self.selector = SampleSelector(self.device_id, model.version, low_confidence=s.low_confidence,
                                       drift_threshold=thr, reservoir_size=s.reservoir_size,
                                       rate=s.max_per_minute / 60.0, burst=s.burst)

    def close(self) -> None:
        """Stop HTTP and MQTT (publishing ``online=false`` first), close the model and the outbox."""
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

    def _on_report(self, rep: DriftReport, model: LoadedModel) -> None:
        self.reports.append(rep)
        self._seq["drift"] += 1
        msg = DriftReportMsg(
            device_id=self.device_id, seq=self._seq["drift"], window=rep.window_index, n=rep.n,
            model_version=model.version,
            scores={t.name: float(t.score) for t in rep.tests} | {"risk": rep.risk, "input": rep.input_score},
            thresholds={t.name: float(t.threshold) for t in rep.tests} | {"risk": rep.risk_threshold,
                                                                          "input": rep.input_threshold},
            flags={t.name: bool(t.flag) for t in rep.tests} | {"risk": rep.risk_flag, "class_shift": rep.class_shift},
            risk=float(rep.risk), input_shift=bool(rep.input_shift), alarm=bool(rep.alarm),
            mean_confidence=float(rep.mean_confidence))
        self.send(msg)
        if rep.alarm_changed:
            log.warning("drift alarm %s (risk %.2f, threshold %.2f)", "ON" if rep.alarm else "off", rep.risk,
                        rep.risk_threshold)

    def _on_sample(self, image: np.ndarray, pred: Prediction, scores: dict[str, float]) -> None:
        sel = self.selector
        if sel is None:
            return
        img = np.asarray(image)
        if img.dtype != np.uint8:
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        captured = sel.offer([img], np.array([pred.index]), np.array([pred.confidence]),
                             np.array([scores.get("sample_score", 0.0)]))
        if time.monotonic() - self._last_reservoir >= self.config.sampling.reservoir_interval_s:
            self._last_reservoir = time.monotonic()
            captured += sel.take_reservoir()
        for sample in captured:
            self.send_sample(sample)

    def send_sample(self, sample: DriftSample) -> None:
        """Queue one captured sample as compressed chunk frames (each within ``[sampling].chunk_size``)."""
        if self.outbox is None:
            return
        frames = chunks.split(sample.sample_id, encode_sample(sample), chunk_size=self.config.sampling.chunk_size,
                              kind=SAMPLES_KIND, meta={"reason": sample.reason, "model_version": sample.model_version})
        topic = self.topics.device(self.device_id, "samples")
        for frame in frames:
            self.outbox.put(topic, frame, PRIORITY_SAMPLES, 1)

    def flush_reservoir(self) -> int:
        """Upload the reservoir now (also done every ``reservoir_interval_s``); returns how many."""
        if self.selector is None:
            return 0
        samples = self.selector.take_reservoir()
        for s in samples:
            self.send_sample(s)
        return len(samples)

    # ------------------------------------------------------------------ messages
    def send(self, msg: Message) -> None:
        """Queue a device -> fleet message on its topic with its priority (never raises for a full queue)."""
        if self.outbox is None:
            return
        r = route(msg)
        try:
            self.outbox.put(self.topics.device(self.device_id, r.kind), msg.encode(), r.priority, 1, retain=r.retain)
        except QueueError as exc:
            log.error("outbox refused a %s message: %s", msg.TYPE, exc)

    def device_state(self, *, online: bool = True) -> DeviceState:
        model = self.pipeline.model
        ptr = self.slots.pointer()
        choice = slot_choice(self.slots, ptr.slot) if ptr else None
        prev = read_slot_manifest(self.slots, ptr.previous) if ptr and ptr.previous else None
        return DeviceState(
            device_id=self.device_id, online=online, model_name=model.manifest.name if model else None,
            model_version=model.version if model else None, variant=model.variant.id if model else None,
            variants=tuple(v.id for v in model.manifest.variants) if model else (),
            variant_latency_ms=dict(choice.latency_ms) if choice else {}, hardware=_hardware(),
            agent_version=AGENT_VERSION, previous_version=prev.version if prev else None)

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
        self._seq["telemetry"] += 1
        model = self.pipeline.model
        return Telemetry(
            device_id=self.device_id, seq=self._seq["telemetry"], model_version=model.version if model else None,
            inferences=snap.inferences, inferences_interval=snap.inferences_interval, errors=snap.errors,
            latency_p50_ms=snap.latency_p50_ms, latency_p99_ms=snap.latency_p99_ms,
            mean_confidence=snap.mean_confidence, cpu_percent=self._sampler.cpu_percent(),
            memory_mb=self._sampler.memory_mb(), queue_depth=q.depth if q else 0, queue_bytes=q.bytes if q else 0,
            dropped_samples=q.dropped_samples if q else 0, drift_alarm=self.drift_alarm,
            latency_hist=snap.latency_hist or {}, errors_interval=snap.errors_interval)

    def _job(self, job_id: str, version: str, step: str, ok: bool = True, detail: str = "",
             progress: float | None = None, previous: str | None = None) -> None:
        msg = JobStatus(device_id=self.device_id, job_id=job_id, version=version, step=step, ok=ok,
                        detail=detail[:2000], progress=progress, previous_version=previous)
        self.jobs.append(msg)
        (log.info if ok else log.warning)("job %s %s: %s %s", job_id, version, step, detail)
        self.send(msg)

    # ------------------------------------------------------------------ updates
    def current_manifest(self) -> Manifest | None:
        model = self.pipeline.model
        return model.manifest if model is not None else None

    def install(self, bundle_path: str | Path, *, job_id: str | None = None, force: bool = False) -> InstallResult:
        """Install a bundle file: verify, unpack, choose variant, health check, switch, serve.

        Every step goes out as a ``JobStatus``; on any failure the old model keeps
        serving and :class:`UpdateError` / :class:`BundleError` is raised.
        """
        job = job_id or f"local-{uuid.uuid4().hex[:8]}"
        path = Path(bundle_path)
        with self._update_lock:
            current = self.current_manifest()
            prev_version = current.version if current else None
            version = path.name

            def report(step: str, ok: bool, detail: str, progress: float | None) -> None:
                self._job(job, version, step, ok, detail, progress, prev_version)

            try:
                from core.bundle import read_manifest_unverified

                try:
                    version = read_manifest_unverified(path).version  # for the reports only; verified next
                except EdgeloopError:
                    pass
                result = self.installer.install(path, current=current, force=force, report=report)
            except EdgeloopError as exc:
                self._job(job, version, "failed", False, str(exc), None, prev_version)
                if exc.context.get("reason") == "health-check":
                    self._job(job, version, "rolled_back", True, f"still serving {prev_version}", None, prev_version)
                raise
            version = result.version
            # the first model has nothing to roll back to: no probation for it
            self.slots.switch(result.slot, confirmed=current is None)
            try:
                self._swap_in(result.slot)
            except EdgeloopError as exc:  # loaded in the health check, so this is rare: go back
                if current is not None:
                    self.slots.rollback(f"new slot does not load: {exc}")
                    self._swap_in(self.slots.pointer().slot)  # type: ignore[union-attr]
                self._job(job, version, "rolled_back", False, str(exc), None, prev_version)
                raise UpdateError(f"model {version} installed but does not serve: {exc}", version=version) from exc
            self._job(job, version, "switched", True, f"serving {result.choice.variant} from slot {result.slot}",
                      None, prev_version)
            removed = self.slots.gc(self.config.update.keep_slots)
            self._job(job, version, "completed", True, result.health.detail, 1.0, prev_version)
            self.publish_state()
            return InstallResult(result.version, result.slot, result.choice, result.health, prev_version,
                                 tuple(removed))

    def rollback(self, reason: str = "requested", *, job_id: str | None = None) -> Pointer:
        """Switch back to the previous slot now (RollbackCommand or `edgeloop agent rollback`)."""
        job = job_id or f"rollback-{uuid.uuid4().hex[:8]}"
        with self._update_lock:
            current = self.current_manifest()
            ptr = self.slots.rollback(reason)
            self._swap_in(ptr.slot)
            now = self.current_manifest()
            self._job(job, now.version if now else ptr.slot, "rolled_back", True,
                      f"{reason}; was {current.version if current else ptr.rolled_back_from}", None,
                      current.version if current else None)
            self.publish_state()
            return ptr

    def maybe_confirm(self) -> bool:
        """Mark the current slot good once the agent has run ``boot_window_min`` since starting."""
        ptr = self.slots.pointer()
        if ptr is None or ptr.confirmed:
            return False
        if self._clock() - max(self._started_at, ptr.switched_at) >= self.config.update.boot_window_min * 60.0:
            self.slots.confirm()
            log.info("slot %s confirmed after a healthy boot window", ptr.slot)
            return True
        return False

    def follow_pointer(self) -> bool:
        """Serve the slot ``current`` names if another process (``edgeloop agent install``) switched it."""
        name = self.slots.serving_slot()
        model = self.pipeline.model
        if name is None or (model is not None and model.slot_dir.name == name):
            return False
        if not self._update_lock.acquire(blocking=False):
            return False  # an update of our own is switching right now
        try:
            self._swap_in(name)
            self.publish_state()
            return True
        except EdgeloopError as exc:
            log.error("cannot serve slot %s: %s", name, exc)
            return False
        finally:
            self._update_lock.release()

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
        while not stop.is_set():
            if folder is not None:
                for path, image in folder.new_images():
                    if stop.is_set():
                        break
                    try:
                        pred = self.predict(image)
                        log.info("%s -> %s (%.3f)%s", path.name, pred.label, pred.confidence,
                                 " DRIFT ALARM" if pred.drift_alarm else "")
                    except EdgeloopError as exc:
                        log.warning("%s: %s", path.name, exc)
            self.maybe_confirm()
            self.follow_pointer()
            if time.monotonic() >= next_tele:
                self.send(self.telemetry())
                next_tele = time.monotonic() + self.config.telemetry.interval_s
            stop.wait(min(poll_s, max(0.0, next_tele - time.monotonic())))
