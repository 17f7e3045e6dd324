"""Fleet scale and fault benchmark: simulated devices against the real fleet on a real Mosquitto.

    python -m benchmarks.fleet_bench [--devices 1000] [--db sqlite|postgresql://...] [--bundle-mb 1,10]
                                     [--rates 2000,5000,8000] [--faults] [--out DIR] [--json]

The fleet is the real one, in this process, built by :class:`fleet.app.FleetApp` as
``edgeloop fleet serve`` builds it: :class:`fleet.ingest.IngestService` (batched writes into
:class:`fleet.registry.Registry` on SQLite/WAL or PostgreSQL), the HTTP API (bundles with
Range), and :class:`fleet.rollout_driver.RolloutDriver` ticked the way
:class:`fleet.worker.FleetWorker` ticks it (job statuses wake it; bundle requests are
answered from the ingest hook); only the retraining worker is left out.  Devices are :mod:`benchmarks.fleet_sim`
swarms in child processes.  Everything binds to 127.0.0.1 and stops by itself.

Phases: (1) registry write rate, direct ``Registry.apply`` of decoded batches; (2) drift
ingestion at each offered rate: committed reports/s, end-to-end latency (device ``ts`` ->
the ingest hook after the batch committed), drain time, loss; (3) a staged rollout per
bundle size: time to every device, job outcomes, bytes; (4) with ``--faults``: a rollout
over MQTT chunks with the broker restarted mid-rollout, 5 % of the devices offline and
back later, and corrupted chunks; convergence, bricked devices, lost messages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .fleet_sim import Broker, SwarmHandle, device_ids, free_port, make_sized_bundle, start_swarms
from .stats import summarize

__all__ = ["FleetBenchConfig", "BenchFleet", "run_fleet_bench", "main"]

MODEL = "bench-model"


@dataclass(frozen=True)
class FleetBenchConfig:
    devices: int = 1000
    processes: int = 1  # swarm processes (each one event loop); the fleet is another process
    rates: tuple[float, ...] = (2000.0, 5000.0, 8000.0)  # offered drift reports/s
    drain: int = 0  # reports queued at the broker, then drained by the fleet (0: skip; the CLI's default 50,000)
    ingest_workers: int = 1  # fleet ingest processes (fleet.toml [ingest] workers)
    receipt_timeout_s: float = 60.0  # the devices' [broker] receipt_timeout_s (the agent's default)
    phase_s: float = 10.0
    db: str = "sqlite"
    bundle_mb: tuple[float, ...] = (1.0, 10.0)
    delivery: str = "http"
    faults: bool = False
    offline_share: float = 0.05
    offline_s: float = 20.0
    corrupt_share: float = 0.02
    corrupt_retries: int = 2
    broker_crash: bool = False  # faults: SIGKILL the broker (it loses every session) instead of SIGTERM
    background_rate: float = 200.0  # drift reports/s while rolling out
    job_timeout_s: float = 180.0
    rollout_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.processes < 1 or self.phase_s <= 0:
            raise ValueError("devices, processes and phase_s must be positive")
        if self.delivery not in ("http", "mqtt"):
            raise ValueError("delivery must be http or mqtt")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMeter:
    """CPU seconds spent by the fleet (this process), the device swarms and the broker over a phase."""

    def __init__(self, swarms: list[SwarmHandle], broker: Broker, fleet_pids: list[int] | None = None) -> None:
        self.swarms, self.broker = swarms, broker
        self.fleet_pids = [os.getpid(), *(fleet_pids or [])]  # this process + extra ingest processes
        self.t0, self.start = time.monotonic(), self._now()

    def _now(self) -> dict[str, float]:
        b = self.broker.proc.pid if self.broker.proc is not None else 0
        return {"fleet": sum(_cpu_s(p) for p in self.fleet_pids),
                "devices": sum(_cpu_s(s.proc.pid) for s in self.swarms), "broker": _cpu_s(b) if b else 0.0}

    def result(self) -> dict[str, float]:
        """CPU seconds per side and, as ``*_cores``, the average cores each kept busy."""
        wall = max(1e-9, time.monotonic() - self.t0)
        end = self._now()
        out = {k: round(max(0.0, end[k] - self.start[k]), 2) for k in end}  # the broker's counter resets on restart
        out.update({f"{k}_cores": round(v / wall, 2) for k, v in list(out.items())})
        return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- database
class _Database:
    """A SQLite file in the work dir, or a fresh PostgreSQL schema dropped afterwards."""

    def __init__(self, spec: str, workdir: Path) -> None:
        self.schema: str | None = None
        self.base = spec
        if spec == "sqlite":
            self.url = f"sqlite:///{workdir / 'fleet.db'}"
        elif spec.startswith("postgresql"):
            from sqlalchemy import create_engine, text

            self.schema = f"bench_{uuid.uuid4().hex[:10]}"
            base = spec.replace("postgresql://", "postgresql+psycopg://", 1)
            self.base = base
            with create_engine(base).begin() as c:
                c.execute(text(f"CREATE SCHEMA {self.schema}"))
            sep = "&" if "?" in base else "?"
            self.url = f"{base}{sep}options=-csearch_path%3D{self.schema}"
        else:
            raise ValueError(f"--db must be sqlite or a postgresql:// URL, got {spec!r}")

    def drop(self) -> None:
        if self.schema:
            from sqlalchemy import create_engine, text

            eng = create_engine(self.base)
            with eng.begin() as c:
                c.execute(text(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"))
            eng.dispose()


# --------------------------------------------------------------------------- fleet side
class CorruptingPublisher:
    """Wraps the fleet's MQTT publisher: flips one byte in the first bundle chunk sent to chosen devices."""

    def __init__(self, inner: Any, share: float, seed: int = 0) -> None:
        self.inner, self.share, self.seed = inner, share, seed
        self.corrupted: set[str] = set()

    def chosen(self, device_id: str) -> bool:
        h = int(hashlib.sha256(f"{self.seed}:{device_id}".encode()).hexdigest()[:8], 16)
        return h / 0xFFFFFFFF < self.share

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        if topic.endswith("/cmd/bundle") and self.share > 0:
            dev = topic.split("/")[-3]
            if dev not in self.corrupted and self.chosen(dev):
                self.corrupted.add(dev)
                data = bytearray(payload)
                data[-1] ^= 0xFF  # the last byte is chunk data, never the frame header
                payload = bytes(data)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)


class BenchFleet:
    """The real fleet (:class:`fleet.app.FleetApp`) in this process, instrumented through an ingest hook.

    Its retraining worker is left out: this class ticks the rollout driver the way the worker
    does (job statuses wake it, bundle requests are answered from the ingest hook) and times
    each tick.  The driver publishes through a :class:`CorruptingPublisher`.
    """

    def __init__(self, workdir: Path, broker_port: int, db_url: str, *, corrupt_share: float = 0.0,
                 seed: int = 0, ingest_workers: int = 1) -> None:
        from fleet.app import FleetApp
        from fleet.config import ApiConfig, BrokerConfig, DatabaseConfig, FleetConfig, IngestConfig

        cfg = FleetConfig(data_dir=workdir / "fleet", database=DatabaseConfig(url=db_url),
                          broker=BrokerConfig(port=broker_port, client_id="bench-fleet"),
                          api=ApiConfig(port=free_port()), ingest=IngestConfig(workers=ingest_workers))
        self.publisher: CorruptingPublisher | None = None

        def corrupting(inner: Any) -> CorruptingPublisher:
            self.publisher = CorruptingPublisher(inner, corrupt_share, seed)
            return self.publisher

        self.app = FleetApp.from_config(cfg, workers=False, publisher=corrupting)
        self.cfg, self.registry, self.ingest = cfg, self.app.registry, self.app.ingest
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.commits: list[tuple[float, int]] = []  # (commit time, drift reports in the batch)
        self.ingest.add_hook(self._hook)
        self.app.start()
        self.driver = self.app.driver
        self._wake, self._stop = threading.Event(), threading.Event()
        self.tick_errors = 0
        self.tick_s: list[float] = []  # how long each driver tick took (the rollout engine's own cost)
        self._ticker = threading.Thread(target=self._tick_loop, name="bench-rollout-ticker", daemon=True)
        self._ticker.start()

    def extra_ingest_pids(self) -> list[int]:
        """The extra ingest processes' pids (their CPU counts as the fleet's)."""
        extra = self.app.ingest_workers
        return extra.cpu_pids() if extra is not None else []

    def _hook(self, msgs: list[Any]) -> None:
        """After each committed batch (the ingest writer thread): latency, bundle requests, job wake-ups."""
        from core.protocol import BundleRequest, DriftReportMsg, JobStatus

        now = time.time()
        lat = [now - m.ts for m in msgs if isinstance(m, DriftReportMsg)]
        with self.lock:
            self.latencies.extend(lat)
            self.commits.append((now, len(lat)))
        for m in msgs:
            if isinstance(m, BundleRequest):  # what FleetWorker.on_messages does
                try:
                    self.driver.handle_bundle_request(m)
                except Exception:  # noqa: BLE001 - counted like the worker logs it
                    self.tick_errors += 1
            elif isinstance(m, JobStatus):
                self._wake.set()

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                active = self.driver.tick()
            except Exception:  # noqa: BLE001 - a failing tick is retried, and counted
                self.tick_errors += 1
                active = [None]
            if active:
                self.tick_s.append(time.perf_counter() - t)
            self._wake.wait(0.5)
            self._wake.clear()

    def take_measurements(self) -> tuple[list[float], list[tuple[float, int]]]:
        with self.lock:
            lat, com = self.latencies, self.commits
            self.latencies, self.commits = [], []
        return lat, com

    def ingested_drift(self) -> set[tuple[str, int]]:
        return self.registry.drift.identities()

    def wait_idle(self, timeout: float) -> bool:
        return self.ingest.wait_idle(timeout)

    def pause_ingest(self) -> None:
        """Disconnect the ingest subscribers cleanly; their persistent sessions make the broker queue for them."""
        if self.app.ingest_workers is not None:
            self.app.ingest_workers.stop()
        self.ingest.stop()

    def resume_ingest(self) -> None:
        self.ingest.start()  # the rollout driver publishes through whatever connection ingestion has
        if self.app.ingest_workers is not None:
            self.app.ingest_workers.start()

    def drift_rows(self) -> int:
        """Drift reports of simulated devices in the registry (every ingest process writes there)."""
        return self.registry.drift.count(device_prefix="sim-")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._ticker.join(10)
        self.app.stop()


class _SysBytes:
    """Mosquitto's ``$SYS/broker/bytes/{sent,received}`` totals, summed across broker restarts."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho

        self.last: dict[str, int] = {}
        self.offset: dict[str, int] = {}
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{uuid.uuid4().hex[:6]}")
        self.c.on_connect = lambda c, u, f, r, p: c.subscribe("$SYS/broker/bytes/+")
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.2, 2)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        k = msg.topic.rsplit("/", 1)[-1]
        v = int(msg.payload)
        if v < self.last.get(k, 0):  # the broker restarted: its counters start again at zero
            self.offset[k] = self.offset.get(k, 0) + self.last[k]
        self.last[k] = v

    def total(self) -> int:
        return sum(self.last.get(k, 0) + self.offset.get(k, 0) for k in ("sent", "received"))

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --------------------------------------------------------------------------- phases
def _swarm_stats(swarms: list[SwarmHandle]) -> dict[str, Any]:
    out: dict[str, Any] = {"counters": {}, "acked_drift": {}, "versions": {}, "installed_sha": {}, "bricked": [],
                           "corrupt_seen": [],
                           "connected": 0, "unacked": 0, "busy_jobs": 0, "awaiting_receipt": 0, "held": 0,
                           "reporting": 0}
    for s in swarms:
        st = s.call("stats")
        for k, v in st["counters"].items():
            out["counters"][k] = out["counters"].get(k, 0) + v
        for k in ("acked_drift", "versions", "installed_sha"):
            out[k].update(st[k])
        out["bricked"] += st["bricked"]
        out["corrupt_seen"] += st["corrupt_seen"]
        for k in ("connected", "unacked", "busy_jobs", "awaiting_receipt", "held", "reporting"):
            out[k] += st[k]
    return out


def _wait(cond: Any, timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)  # polling other processes and the database: nothing to wait on
    return bool(cond())


def _median(v: list[float]) -> float | None:
    return sorted(v)[len(v) // 2] if v else None


def _acked_ids(stats: dict[str, Any]) -> set[tuple[str, int]]:
    return {(d, q) for d, seqs in stats["acked_drift"].items() for q in seqs}


def measure_registry_writes(registry: Any, devices: int, *, batches: int = 10, batch_size: int = 2000) -> dict[str, Any]:
    """Rows/s of ``Registry.apply`` on decoded drift batches (no MQTT, no decoding): the write ceiling."""
    from core.protocol import DriftReportMsg, decode
    from fleet.registry import IngestBatch

    ids = device_ids(devices, offset=90000 - devices)  # a disjoint id range: the measured runs stay clean
    msgs = [DriftReportMsg(device_id=ids[i % devices], seq=10_000 + i, window=100, n=100, model_version="1.0.0",
                           scores={"confidence": 0.1, "entropy": 0.2}, thresholds={"confidence": 0.9},
                           flags={"confidence": False}, risk=0.1, mean_confidence=0.9, class_counts=(10,) * 10)
            for i in range(batch_size)]
    raw = [m.encode() for m in msgs]
    t = time.perf_counter()
    for p in raw:
        decode(p)
    decode_us = (time.perf_counter() - t) / len(raw) * 1e6
    times = []
    for _b in range(batches):
        batch = IngestBatch()
        now = time.time()
        for m in msgs:
            batch.drift.append((m, now))
            batch.seen[m.device_id] = now
        t = time.perf_counter()
        registry.apply(batch)
        times.append(time.perf_counter() - t)
    registry.drift.delete(ids)  # leave no trace of the probe rows
    registry.devices.delete(ids)
    per = sorted(times)[len(times) // 2]
    return {"batch_size": batch_size, "batches": batches, "median_batch_s": per, "rows_per_s": batch_size / per,
            "decode_us_per_msg": decode_us, "load_avg": _load()}


def ingestion_phase(fleet: BenchFleet, swarms: list[SwarmHandle], rate: float, seconds: float,
                    broker: Broker) -> dict[str, Any]:
    """Offer ``rate`` reports/s for ``seconds``; measure what the fleet commits and how late."""
    load0 = _load()
    cpu = CpuMeter(swarms, broker, fleet.extra_ingest_pids())
    before = _swarm_stats(swarms)["counters"]["acked"]
    rows0 = fleet.drift_rows()
    fleet.take_measurements()
    t0 = time.time()
    for s in swarms:
        s.call("reports", rate / len(swarms), seconds)
    time.sleep(seconds)
    t_end = time.time()
    in_window = fleet.drift_rows() - rows0
    cpu_window = cpu.result()
    # drain: until every report was published and acknowledged by the broker, and is in the registry
    _wait(lambda: (lambda st: st["unacked"] == 0 and not st["reporting"])(_swarm_stats(swarms)), 60)
    offered = _swarm_stats(swarms)["counters"]["acked"] - before
    drained = _wait(lambda: fleet.drift_rows() - rows0 >= offered, 120, poll=0.05)
    t_drained = time.time()
    fleet.wait_idle(30)
    lat, _commits = fleet.take_measurements()
    total = fleet.drift_rows() - rows0
    lat_stats = summarize([x * 1000 for x in lat]) if lat else None
    return {"offered_per_s": rate, "published": offered, "published_per_s": offered / seconds,
            "committed_in_window_per_s": in_window / seconds, "committed": total,
            "drain_s": round(max(0.0, t_drained - t_end), 2), "overall_per_s": total / max(1e-9, t_drained - t0),
            "idle_after_s": round(t_drained - t_end, 2), "drained": drained,
            "latency_ms": asdict(lat_stats) if lat_stats else None, "cpu": cpu_window,
            "load_avg": [load0, _load()]}


def drain_phase(fleet: BenchFleet, swarms: list[SwarmHandle], count: int, broker: Broker) -> dict[str, Any]:
    """The fleet's own ingestion capacity, with the device swarm out of the way.

    On 2 shared cores the swarm's 1,000 MQTT clients compete with the fleet for CPU, so
    the concurrent phases measure the box, not the fleet.  Here the fleet's subscriber
    disconnects (its persistent session stays), the devices publish ``count`` reports that
    the broker queues for that session, and the fleet reconnects and drains the queue:
    reports committed per second from its reconnect to the last commit.
    """
    fleet.wait_idle(60)
    fleet.pause_ingest()
    st0 = _swarm_stats(swarms)["counters"]["acked"]
    t_pub = time.time()
    for i, s in enumerate(swarms):
        s.call("burst", count // len(swarms) + (1 if i < count % len(swarms) else 0))
    queued = _wait(lambda: _swarm_stats(swarms)["counters"]["acked"] - st0 >= count, 300)
    publish_s = time.time() - t_pub
    rows0 = fleet.drift_rows()
    load0 = _load()
    t0 = time.time()
    fleet.resume_ingest()
    cpu = CpuMeter(swarms, broker, fleet.extra_ingest_pids())  # after the workers (re)started
    _wait(lambda: fleet.drift_rows() - rows0 >= count, 300, poll=0.05)
    last = time.time()
    cpu_result = cpu.result()
    got = fleet.drift_rows() - rows0
    fleet.wait_idle(60)
    fleet.take_measurements()
    return {"queued": count, "all_queued": queued, "publish_s": round(publish_s, 2), "committed": got,
            "ingest_processes": fleet.app.ingest_processes,
            "drain_s": round(last - t0, 2), "drain_per_s": got / max(1e-9, last - t0), "cpu": cpu_result,
            "load_avg": [load0, _load()]}


def rollout_phase(fleet: BenchFleet, swarms: list[SwarmHandle], bundle: Path, version: str, cfg: FleetBenchConfig,
                  sysbytes: _SysBytes, *, broker: Broker | None = None, faults: bool = False) -> dict[str, Any]:
    """Register and roll ``bundle`` out in waves (canary 10 %, 25/50/100 %, no soak); time it to the last device."""
    from core.signing import load_public_key
    from fleet.canary import CanaryPolicy
    from fleet.rollout import RolloutPlan

    load0 = _load()
    n = cfg.devices
    cpu = CpuMeter(swarms, broker) if broker is not None else None
    fleet.registry.register_model(bundle, trusted_key=load_public_key(bundle.with_name("bench.pub")),
                                  status="accepted")
    # Delivery and convergence are measured here, not the model: the simulated devices send no
    # latency histograms, so the canary analysis would only extend each soak before proceeding.
    plan = RolloutPlan(canary=0.1, waves=(0.25, 0.5, 1.0), soak_s=0.0, max_failures=0.05,
                       job_timeout_s=cfg.job_timeout_s,
                       analysis=CanaryPolicy(max_extension_s=0.0, on_inconclusive="proceed"))
    st0 = _swarm_stats(swarms)
    bytes0 = sysbytes.total()
    if cfg.background_rate > 0:
        for s in swarms:
            s.call("reports", cfg.background_rate / len(swarms), cfg.rollout_timeout_s)
    events: list[dict[str, Any]] = []
    offline: list[str] = []
    rng = random.Random(cfg.seed)
    t0 = time.time()
    fleet.tick_s.clear()
    state = fleet.driver.start(MODEL, version, plan)
    rid = state.rollout_id
    if faults:
        offline = sorted(rng.sample(list(st0["versions"]), max(1, int(cfg.offline_share * n))))
        for s in swarms:
            s.call("offline", [d for d in offline if d in s.spec.device_ids])
        events.append({"t": round(time.time() - t0, 2), "event": f"{len(offline)} devices offline"})
    restarted = back = False
    while time.time() - t0 < cfg.rollout_timeout_s:
        state = fleet.driver.load(rid)
        if state.terminal:
            break
        done = sum(1 for d in state.devices if d.status in ("updated", "failed", "timed_out"))
        if faults and broker is not None and not restarted and done >= 0.25 * n:
            down = broker.restart_for(2.0, crash=cfg.broker_crash)
            restarted = True
            how = "killed (SIGKILL, sessions lost) and restarted" if cfg.broker_crash else "restarted"
            events.append({"t": round(time.time() - t0, 2), "event": f"broker {how} ({down:.1f} s down)"})
        if faults and not back and time.time() - t0 >= cfg.offline_s:
            for s in swarms:
                s.call("online", [d for d in offline if d in s.spec.device_ids])
            back = True
            events.append({"t": round(time.time() - t0, 2), "event": f"{len(offline)} devices back online"})
        time.sleep(0.25)
    elapsed = time.time() - t0
    for s in swarms:
        s.call("reports", 0, 0)
    if faults and not back:
        for s in swarms:
            s.call("online", [d for d in offline if d in s.spec.device_ids])
    st = _swarm_stats(swarms)
    counts = state.counts()
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    on_new = sum(1 for v in st["versions"].values() if v == version)
    waves = [{"t": round(e.ts - state.created_at, 2), "kind": e.kind, "detail": e.detail} for e in state.events]
    return {"bundle_bytes": bundle.stat().st_size, "version": version, "rollout_id": rid, "status": state.status,
            "seconds": round(elapsed, 2), "counts": counts, "devices": n, "on_new_version": on_new,
            "convergence_pct": round(100.0 * on_new / n, 2),
            # a device that installed anything but the announced bundle (the swarm checks each install)
            "bricked": len(st["bricked"]) + sum(1 for d, v in st["versions"].items()
                                                if v == version and st["installed_sha"].get(d) != sha),
            "http_payload_bytes": st["counters"]["http_bytes"] - st0["counters"]["http_bytes"],
            "mqtt_bundle_frame_bytes": st["counters"]["bundle_frame_bytes"] - st0["counters"]["bundle_frame_bytes"],
            "mqtt_wire_bytes": sysbytes.total() - bytes0,
            "corrupted_transfers": len(fleet.publisher.corrupted),
            "corrupt_detected": st["counters"]["corrupt_detected"] - st0["counters"]["corrupt_detected"],
            # per device: QoS 1 may deliver a corrupted chunk again (after a broker restart), and the
            # device then detects the same corruption twice; what must hold is that every corrupted
            # device detected it and no other device saw corruption
            "corrupt_undetected": sorted(fleet.publisher.corrupted - set(st["corrupt_seen"])),
            "corrupt_false": sorted(set(st["corrupt_seen"]) - set(st0["corrupt_seen"]) - fleet.publisher.corrupted),
            "ticks": len(fleet.tick_s), "tick_s_median": _median(fleet.tick_s), "tick_s_max": max(fleet.tick_s, default=0.0),
            "tick_s_total": round(sum(fleet.tick_s), 2),
            "cpu": cpu.result() if cpu is not None else None,
            "timeline": waves, "faults": events,
            "failures": [f"{d.device_id}: {d.status} {d.detail}"[:300] for d in state.devices
                         if d.status not in ("updated", "pending")][:5], "load_avg": [load0, _load()]}


def loss_check(fleet: BenchFleet, swarms: list[SwarmHandle], timeout: float = 240.0) -> dict[str, Any]:
    """Acknowledged drift reports vs the unique (device, seq) rows in the registry.

    Waits until nothing is in flight and nothing awaits a receipt (a message the fleet
    lost is re-sent after the receipt timeout), then compares.
    """
    t0 = time.monotonic()
    _wait(lambda: (lambda st: st["unacked"] == 0 and st["held"] == 0)(_swarm_stats(swarms)), timeout)
    fleet.wait_idle(timeout)
    st = _swarm_stats(swarms)
    sent, got = _acked_ids(st), fleet.ingested_drift()
    got_sim = {x for x in got if x[0].startswith("sim-")}
    c = st["counters"]
    return {"acked": len(sent), "ingested_unique": len(got_sim), "lost": len(sent - got_sim),
            "unacked_left": st["unacked"], "awaiting_receipt_left": st["held"], "resent": c.get("resent", 0),
            "receipts": c.get("receipts", 0), "waited_s": round(time.monotonic() - t0, 1),
            "lost_examples": sorted(sent - got_sim)[:5]}


# --------------------------------------------------------------------------- driver
def run_fleet_bench(cfg: FleetBenchConfig, workdir: Path, *, say: Any = print) -> dict[str, Any]:
    from core.signing import generate_keypair, save_keypair

    db = _Database(cfg.db, workdir)
    broker = Broker(workdir / "broker").start()
    swarms: list[SwarmHandle] = []
    fleet: BenchFleet | None = None
    sysb: _SysBytes | None = None
    result: dict[str, Any] = {"config": asdict(cfg), "db": "sqlite" if cfg.db == "sqlite" else "postgresql"}
    try:
        fleet = BenchFleet(workdir, broker.port, db.url, corrupt_share=cfg.corrupt_share if cfg.faults else 0.0,
                           seed=cfg.seed, ingest_workers=cfg.ingest_workers)
        sysb = _SysBytes(broker.port)
        say("registry write rate ...")
        result["registry_write"] = measure_registry_writes(fleet.registry, cfg.devices)
        ids = device_ids(cfg.devices)
        (workdir / "keys").mkdir(parents=True, exist_ok=True)
        keys = save_keypair(workdir / "keys" / "bench", generate_keypair()[0])
        t = time.time()
        swarms = start_swarms(broker.port, ids, cfg.processes, delivery="mqtt" if cfg.faults else cfg.delivery,
                              workdir=str(workdir / "swarm"), trusted_key=str(keys.public),
                              corrupt_retries=cfg.corrupt_retries, job_timeout_s=cfg.job_timeout_s,
                              receipt_timeout_s=cfg.receipt_timeout_s,
                              receipt_grace_s=min(10.0, cfg.receipt_timeout_s / 2))
        ok = _wait(lambda: fleet is not None and fleet.registry.status().online >= cfg.devices, 120)
        result["connect"] = {"devices": cfg.devices, "seconds_to_all_online_in_registry": round(time.time() - t, 2),
                             "all_online": ok, "load_avg": _load()}
        say(f"{cfg.devices} devices online after {time.time() - t:.1f} s")
        result["ingestion"] = []
        for rate in cfg.rates:
            say(f"ingestion at {rate:g} reports/s offered ...")
            result["ingestion"].append(ingestion_phase(fleet, swarms, rate, cfg.phase_s, broker))
        if cfg.drain > 0:
            say(f"fleet capacity: draining {cfg.drain:,} queued reports ...")
            result["drain"] = drain_phase(fleet, swarms, cfg.drain, broker)
            say(f"  {result['drain']['drain_per_s']:,.0f} reports/s")
        result["ingestion_loss"] = loss_check(fleet, swarms)
        result["rollouts"] = []
        sizes = cfg.bundle_mb[:1] if cfg.faults else cfg.bundle_mb
        for i, mb in enumerate(sizes):
            version = f"1.{i + 1}.0"
            bundle = make_sized_bundle(keys.private.parent / f"{MODEL}-{version}.elb", name=MODEL, version=version,
                                       size_bytes=int(mb * 1e6), signing_key=_private(keys.private))
            say(f"rollout of {bundle.stat().st_size / 1e6:.1f} MB to {cfg.devices} devices"
                f"{' under faults' if cfg.faults else ''} ...")
            result["rollouts"].append(rollout_phase(fleet, swarms, bundle, version, cfg, sysb, broker=broker,
                                                    faults=cfg.faults))
            say(f"  {result['rollouts'][-1]['status']} in {result['rollouts'][-1]['seconds']:.1f} s")
        result["final_loss"] = loss_check(fleet, swarms)
        result["fleet_tick_errors"] = fleet.tick_errors
        result["ingest_stats"] = asdict(fleet.ingest.stats)
    finally:
        for s in swarms:
            s.stop()
        if sysb is not None:
            sysb.stop()
        if fleet is not None:
            fleet.stop()
        broker.stop()
        db.drop()
    return result


def _private(path: Path) -> Any:
    from core.signing import load_private_key

    return load_private_key(path)


# --------------------------------------------------------------------------- report
def _f(v: Any, nd: int = 1) -> str:
    return "–" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else str(v))


def _cores(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "–"
    return f"{cpu['fleet_cores']:.2f} / {cpu['devices_cores']:.2f} / {cpu['broker_cores']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """Tables of one fleet benchmark result."""
    lines = [f"### Fleet benchmark: {result['config']['devices']} devices, {result['db']}"
             f"{' (faults)' if result['config']['faults'] else ''}", ""]
    rw = result.get("registry_write")
    if rw:
        lines.append(f"Registry write rate (`Registry.apply`, {rw['batch_size']}-row drift batches): "
                     f"**{rw['rows_per_s']:,.0f} rows/s**; `protocol.decode`: {rw['decode_us_per_msg']:.1f} µs/msg "
                     f"(load avg {rw['load_avg']}).")
        lines.append("")
    if result.get("ingestion"):
        lines += ["| offered/s | published/s | committed in window/s | overall/s | drain s | p50 ms | p99 ms "
                  "| cores busy: fleet / devices / broker | load avg (start → end) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in result["ingestion"]:
            lat = p.get("latency_ms") or {}
            lines.append(f"| {p['offered_per_s']:,.0f} | {p['published_per_s']:,.0f} | {p['committed_in_window_per_s']:,.0f} "
                         f"| {p['overall_per_s']:,.0f} | {_f(p['drain_s'], 2)} | {_f(lat.get('p50_ms'))} "
                         f"| {_f(lat.get('p99_ms'))} | {_cores(p.get('cpu'))} | {p['load_avg'][0][0]} → {p['load_avg'][1][0]} |")
        d = result.get("drain")
        if d:
            lines += ["", f"Fleet capacity (the swarm idle, {d.get('ingest_processes', 1)} ingest process(es)): "
                          f"{d['committed']:,} reports queued at the broker while the "
                          f"fleet was away drained in {d['drain_s']:.1f} s = **{d['drain_per_s']:,.0f} reports/s** "
                          f"(cores busy: fleet / devices / broker {_cores(d.get('cpu'))})."]
        loss = result.get("ingestion_loss", {})
        lines += ["", f"Loss over the ingestion phases: {loss.get('lost')} of {loss.get('acked')} acknowledged "
                      f"reports ({loss.get('ingested_unique')} unique rows).", ""]
    if result.get("rollouts"):
        lines += ["| bundle MB | status | seconds | updated | failed | convergence | bricked | HTTP MB | MQTT wire MB "
                  "| corrupted / detected | cores busy: fleet / devices / broker | driver ticks (total s) | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["rollouts"]:
            c = r["counts"]
            failed = sum(v for k, v in c.items() if k in ("failed", "timed_out", "unhealthy", "rollback_failed"))
            lines.append(f"| {r['bundle_bytes'] / 1e6:.2f} | {r['status']} | {r['seconds']:.1f} | {c.get('updated', 0)} "
                         f"| {failed} | {r['convergence_pct']:.1f} % | {r['bricked']} "
                         f"| {r['http_payload_bytes'] / 1e6:,.0f} | {r['mqtt_wire_bytes'] / 1e6:,.0f} "
                         f"| {r['corrupted_transfers']} / {r['corrupt_detected']} | {_cores(r.get('cpu'))} "
                         f"| {r.get('ticks')} ({r.get('tick_s_total')}) | {r['load_avg'][0][0]} → "
                         f"{r['load_avg'][1][0]} |")
        for r in result["rollouts"]:
            stages = "; ".join(f"{e['t']:.1f} s {e['kind']}" for e in r["timeline"] if e["kind"] != "created")
            lines.append(f"\n{r['version']}: {stages}")
            if r["faults"]:
                lines.append("faults: " + "; ".join(f"{e['t']:.1f} s {e['event']}" for e in r["faults"]))
    fl = result.get("final_loss")
    if fl:
        lines += ["", f"Lost drift reports over the whole run: **{fl['lost']}** of {fl['acked']} acknowledged "
                      f"(unacknowledged at the end: {fl['unacked_left']}; awaiting a receipt: "
                      f"{fl.get('awaiting_receipt_left', 0)}; messages re-sent for want of a receipt: "
                      f"{fl.get('resent', 0)})."]
    sysinfo = result.get("system", {})
    lines += ["", f"Machine: {sysinfo.get('cpu')} ({sysinfo.get('cores')} cores), load avg at start "
                  f"{result.get('load_avg_start')}. Command: `{sysinfo.get('command', '')}`"]
    return "\n".join(lines) + "\n"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--processes", type=int, default=1, help="device-swarm processes (default 1)")
    p.add_argument("--rates", type=_floats, default=(2000.0, 5000.0, 8000.0), help="offered drift reports/s")
    p.add_argument("--phase-s", type=float, default=10.0, help="seconds per ingestion rate")
    p.add_argument("--ingest-workers", type=int, default=1,
                   help="fleet ingest processes ([ingest] workers; >1 splits the drift/telemetry load)")
    p.add_argument("--drain", type=int, default=50_000,
                   help="reports queued while the fleet is away, then drained: its capacity (0: skip)")
    p.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL URL (a fresh schema is used and dropped)")
    p.add_argument("--bundle-mb", type=_floats, default=(1.0, 10.0), help="bundle sizes to roll out")
    p.add_argument("--delivery", choices=("http", "mqtt"), default="http")
    p.add_argument("--faults", action="store_true", help="broker restart, 5%% offline, corrupted chunks (MQTT)")
    p.add_argument("--corrupt-share", type=float, default=0.02)
    p.add_argument("--broker-crash", action="store_true",
                   help="with --faults: SIGKILL the broker, losing its sessions and queues, instead of SIGTERM")
    p.add_argument("--corrupt-retries", type=int, default=2, help="device re-requests after a corrupt transfer "
                                                                   "(2 = the agent's update.mqtt_corrupt_retries)")
    p.add_argument("--job-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=Path("bench-results/fleet"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    from .report import RESULT_SCHEMA_VERSION
    from .sysinfo import system_info

    args = build_parser().parse_args(argv)
    cfg = FleetBenchConfig(devices=args.devices, processes=args.processes, rates=args.rates, phase_s=args.phase_s,
                           drain=args.drain, ingest_workers=args.ingest_workers,
                           db=args.db, bundle_mb=args.bundle_mb, delivery=args.delivery, faults=args.faults,
                           corrupt_share=args.corrupt_share, corrupt_retries=args.corrupt_retries,
                           broker_crash=args.broker_crash,
                           job_timeout_s=args.job_timeout)
    load = _load()
    def say(m: str) -> None:
        print(f"  {m}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="edgeloop-fleet-bench-") as tmp:
        result = run_fleet_bench(cfg, Path(tmp), say=say)
    argv_used = ["python", "-m", "benchmarks.fleet_bench", *(argv if argv is not None else sys.argv[1:])]
    result = {"schema_version": RESULT_SCHEMA_VERSION, "kind": "fleet", "system": system_info(argv_used),
              "load_avg_start": load, "load_avg_end": _load(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{result['db']}-{cfg.devices}{'-faults' if cfg.faults else ''}{'-crash' if cfg.broker_crash else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(json.dumps(result, indent=2, default=str) if args.json else md + f"\nwrote {args.out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
