"""A fleet (real Mosquitto, IngestService, registry, RolloutDriver) and simulated devices
that speak the real protocol, for the canary-analysis tests.

Each :class:`SimDevice` is its own MQTT 5 paho client with a retained birth and a Last
Will; it answers deploy and rollback commands with job steps (no bundle download: the
fleet's delivery is tested elsewhere) and, per :class:`Profile` of the version it runs,
reports telemetry with a latency histogram, drift reports, and samples whose label
arrived with them (labelled on the device).  A :class:`Swarm` thread makes every device
report once per ``period_s``, with a load factor shared by all devices (a busy machine
slows every model alike).  Accuracy is deterministic (every k-th answer wrong, starting
with the first), so a "20 % less accurate" model is exactly that.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import chunks
from core.protocol import (
    SAMPLES_KIND,
    DeployCommand,
    DeviceState,
    DriftReportMsg,
    JobStatus,
    RollbackCommand,
    Telemetry,
    TopicScheme,
    decode,
    latency_bucket,
)
from core.sampling import DriftSample, encode_sample

__all__ = ["Profile", "SimDevice", "Swarm", "CanaryFleet", "canary_fleet", "wait_for"]


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (an event the fleet's database shows), or fail."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick.wait(0.05)


@dataclass(frozen=True)
class Profile:
    """How a model version behaves on a simulated device."""

    latency_ms: float = 2.0  # median at load 1
    error_rate: float = 0.0  # share of inferences that fail
    accuracy: float = 0.95
    confidence: float = 0.9
    inferences: int = 100  # per report
    labels_every: int = 1  # one labelled sample every n reports (0: none)
    labels: int = 2  # labelled samples per labelled report
    agreement: float = 0.97  # as a shadowed candidate: share of inputs answered as the serving model does
    drift_alarm: bool = False  # serving this version, the device's inputs have drifted from its baseline


class SimDevice:
    """One device: a paho client of its own, the real messages, a version and its profile."""

    def __init__(self, device_id: str, host: str, port: int, prefix: str, *, version: str,
                 profiles: Mapping[str, Profile], name: str = "m", seed: int = 0) -> None:
        import paho.mqtt.client as mqtt

        self.device_id, self.name, self.version, self.previous = device_id, name, version, None
        self.profiles = dict(profiles)
        self.topics = TopicScheme(prefix)
        self.rng = np.random.default_rng(seed)
        self.seq = itertools.count(1)
        self.answers: dict[str, int] = {}  # labelled answers per version, for the deterministic accuracy
        self.deploys: list[str] = []  # job ids of deploy commands received (to serve)
        self.shadow: tuple[str, int] | None = None  # (candidate version, every n-th input) while shadowing
        self.shadowed: list[str] = []  # job ids of shadow commands received
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.will_set(self.topics.device(device_id, "state"), DeviceState(device_id, False).encode(),
                             qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.topics.device_commands(device_id), qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        self._birth()

    @property
    def profile(self) -> Profile:
        return self.profiles[self.version]

    def _pub(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(self.topics.device(self.device_id, kind), payload, qos=1, retain=retain)

    def _birth(self) -> None:
        self._pub("state", DeviceState(self.device_id, True, model_name=self.name, model_version=self.version,
                                       previous_version=self.previous, delivery=("http", "mqtt")).encode(),
                  retain=True)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        cmd = decode(msg.payload)
        if isinstance(cmd, DeployCommand) and cmd.shadow:  # install, do not switch, shadow (edge_agent.shadow)
            with self.lock:
                self.shadowed.append(cmd.job_id)
                self.shadow = (cmd.version, cmd.shadow_every or 10)
            self._job(cmd.job_id, cmd.version, "received", self.version)
            self._job(cmd.job_id, cmd.version, "completed", self.version)
        elif isinstance(cmd, DeployCommand):
            with self.lock:
                self.shadow = None
                self.deploys.append(cmd.job_id)
                old, self.previous, self.version = self.version, self.version, cmd.version
            self._job(cmd.job_id, cmd.version, "received", old)
            self._birth()
            self._job(cmd.job_id, cmd.version, "completed", old)
        elif isinstance(cmd, RollbackCommand):
            with self.lock:
                self.shadow = None
                new, self.version = self.version, cmd.to_version or self.previous or self.version
            self._birth()
            self._job(cmd.job_id, self.version, "rolled_back", new)

    def _job(self, job_id: str, version: str, step: str, previous: str | None) -> None:
        self._pub("jobs", JobStatus(self.device_id, job_id, version, step, previous_version=previous).encode())

    def report(self, load: float, n: int) -> None:
        """One telemetry interval (and drift window, and labelled samples) at ``load``."""
        with self.lock:
            version, p, shadow = self.version, self.profile, self.shadow
        errors = int(round(p.inferences * p.error_rate))
        ok = p.inferences - errors
        hist: dict[str, int] = {}
        lat = self.rng.lognormal(math.log(p.latency_ms * load), 0.25, ok)
        for ms in lat:
            k = str(latency_bucket(float(ms)))
            hist[k] = hist.get(k, 0) + 1
        ts = time.time()
        seq = next(self.seq)
        conf = float(np.clip(self.rng.normal(p.confidence, 0.01), 0, 1)) if ok else None
        self._pub("telemetry", Telemetry(
            self.device_id, seq, ts=ts, model_version=version, inferences=seq * ok, inferences_interval=ok,
            errors=seq * errors, latency_p50_ms=float(np.median(lat)) if ok else None,
            latency_p99_ms=float(np.percentile(lat, 99)) if ok else None, mean_confidence=conf,
            latency_hist=hist, errors_interval=errors, **self._shadow_fields(shadow, lat, conf, load)).encode())
        self._pub("drift", DriftReportMsg(self.device_id, seq, window=50, n=50, ts=ts, model_version=version,
                                          alarm=p.drift_alarm, mean_confidence=conf).encode())
        if ok and p.labels_every and n % p.labels_every == 0:
            for _ in range(p.labels):
                self._labelled_sample(version, p, ts)

    def _shadow_fields(self, shadow: tuple[str, int] | None, lat: np.ndarray, conf: float | None,
                       load: float) -> dict[str, Any]:
        """What edge_agent.shadow reports: the candidate on every n-th served input."""
        if shadow is None:
            return {}
        version, every = shadow
        c = self.profiles[version]
        served = lat[::every]
        n = len(served)
        cand = self.rng.lognormal(math.log(c.latency_ms * load), 0.25, n)
        fails = int(round(n * c.error_rate))
        agree = int(round((n - fails) * c.agreement))
        def hist(values: np.ndarray) -> dict[str, int]:
            out: dict[str, int] = {}
            for ms in values:
                k = str(latency_bucket(float(ms)))
                out[k] = out.get(k, 0) + 1
            return out
        ok = n - fails
        return {"shadow_version": version, "shadow_inputs": n, "shadow_agree": agree, "shadow_errors": fails,
                "shadow_latency_hist": hist(cand[:ok]), "shadow_serving_hist": hist(served),
                "shadow_confidence": float(np.clip(self.rng.normal(c.confidence, 0.01), 0, 1)) if ok else None,
                "shadow_serving_confidence": conf if ok else None, "shadow_cost_ms": float(cand.sum())}

    def _labelled_sample(self, version: str, p: Profile, ts: float) -> None:
        i = self.answers.get(version, 0)
        self.answers[version] = i + 1
        # exactly 1 - accuracy of the answers are wrong, the first of each version among them
        wrong = math.ceil((i + 1) * (1 - p.accuracy) - 1e-9) > math.ceil(i * (1 - p.accuracy) - 1e-9)
        truth = int(self.rng.integers(0, 10))
        pred = (truth + 1) % 10 if wrong else truth
        sid = uuid.uuid4().hex
        data = encode_sample(DriftSample(sid, self.device_id, ts, version, pred, p.confidence, 0.0, "reservoir",
                                         np.zeros((2, 2), np.uint8)))
        for frame in chunks.split(sid, data, chunk_size=64 * 1024, kind=SAMPLES_KIND,
                                  meta={"reason": "reservoir", "model_version": version, "label": str(truth)}):
            self._pub("samples", frame)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Swarm:
    """Makes every device report once per ``period_s`` with a shared load factor."""

    def __init__(self, devices: list[SimDevice], *, period_s: float = 0.1,
                 load: Callable[[int, list[SimDevice]], float] = lambda n, devs: 1.0) -> None:
        self.devices, self.period_s, self.load = devices, period_s, load
        self.reports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="canary-swarm")

    def start(self) -> Swarm:
        self._thread.start()
        return self

    def _run(self) -> None:
        for n in itertools.count():
            load = self.load(n, self.devices)
            for d in self.devices:
                d.report(load, n)
            self.reports = n + 1
            if self._stop.wait(self.period_s):  # the devices' reporting cadence, not a wait for the fleet
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class CanaryFleet:
    """The fleet side: registry, ingest, driver; and the simulated devices."""

    reg: Any
    driver: Any
    devices: dict[str, SimDevice] = field(default_factory=dict)
    swarm: Swarm | None = None

    def telemetry_count(self, device_ids: list[str] | None = None) -> int:
        return len(self.reg.telemetry(device_ids=device_ids))

    def run(self, rollout_id: str, until: Callable[[Any], bool], timeout: float = 300.0) -> Any:
        """Tick the rollout until ``until(state)`` (or it ends)."""
        state = wait_for(lambda: (lambda s: s if (s.terminal or until(s)) else None)(self.driver.tick_one(rollout_id)),
                         timeout, f"rollout {rollout_id}")
        return state


@pytest.fixture
def canary_fleet(tmp_path: Path, broker: Any) -> Iterator[Callable[..., CanaryFleet]]:
    """``make(groups={"a": 3, "b": 3}, profiles={"1": Profile(), "2": Profile()}, load=...)``."""
    from fleet.config import BrokerConfig, default_config
    from fleet.ingest import IngestService, connect_client
    from fleet.registry import Registry
    from fleet.rollout_driver import RolloutDriver

    cleanup: list[Callable[[], Any]] = []

    def make(groups: Mapping[str, int], profiles: Mapping[str, Profile], *, period_s: float = 0.25,
             load: Callable[[int, list[SimDevice]], float] = lambda n, devs: 1.0) -> CanaryFleet:
        cfg = default_config(tmp_path / "fleet", broker=BrokerConfig(host=broker.host, port=broker.port,
                                                                      protocol="5"))
        reg = Registry.open(cfg.database_url)
        cleanup.append(reg.close)
        bundle = tmp_path / "m-2.elb"
        bundle.write_bytes(b"simulated devices do not download it")
        reg.add_model_version("m", "2", status="accepted", bundle_path=str(bundle), sha256="ab" * 32,
                              size=bundle.stat().st_size)
        ingest = IngestService(cfg, reg)
        ingest.start()
        cleanup.append(ingest.stop)
        client, _ = connect_client(cfg.broker, client_id="canary-test-fleet")
        cleanup.append(lambda: (client.disconnect(), client.loop_stop()))
        driver = RolloutDriver(reg, client, topics=TopicScheme(cfg.prefix), api_base_url="http://fleet.invalid")
        fleet = CanaryFleet(reg, driver)
        for g, n in groups.items():
            for i in range(n):
                dev_id = f"cam-{g}{i}"
                fleet.devices[dev_id] = SimDevice(dev_id, broker.host, broker.port, cfg.prefix, version="1",
                                                  profiles=profiles, seed=len(fleet.devices))
                cleanup.append(fleet.devices[dev_id].close)
        wait_for(lambda: len(reg.devices(online=True)) == len(fleet.devices), 120, "every device's birth")
        for dev_id in fleet.devices:
            reg.upsert_device(dev_id, tags={"group": dev_id[4]})
        fleet.swarm = Swarm(list(fleet.devices.values()), period_s=period_s, load=load).start()
        cleanup.append(fleet.swarm.stop)
        return fleet

    try:
        yield make
    finally:
        for fn in reversed(cleanup):
            fn()
