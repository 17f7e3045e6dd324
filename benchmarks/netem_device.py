"""One simulated device of the network-fault benchmark, run inside its own network namespace.

    ip netns exec NS python -m benchmarks.netem_device SPEC.json

What is real: the agent's MQTT link and on-disk outbox (:class:`edge_agent.link.AgentLink`,
:class:`edge_agent.outbox.Outbox`: retained birth and Last Will, at-least-once delivery,
end-to-end receipts, reconnect back-off), the protocol messages, the agent's HTTP bundle
download (:func:`edge_agent.updater.download_http`: Range resume, sha256) with the agent's
retry policy (:class:`edge_agent.deploy.CommandWorker`'s defaults), and the bundle signature
check (:func:`core.bundle.open_bundle`).  What is simulated: the model -- each version
has a :class:`Profile` (latency, errors, confidence) that shapes the telemetry -- and the
install (no slot, no ONNX health check; the fleet benchmark and the agent tests cover those).

The device writes its state to ``status.json`` (atomically, every period and on exit) and
obeys ``control.json``: ``{"report": false}`` stops its reports, ``{"stop": true}`` ends it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EdgeloopError, UpdateError
from core.protocol import (
    DeployCommand,
    DeviceState,
    DriftReportMsg,
    JobStatus,
    RollbackCommand,
    Telemetry,
    TopicScheme,
    latency_bucket,
)

__all__ = ["Profile", "DeviceSpec", "SimulatedDevice", "main"]

log = logging.getLogger("netem-device")


@dataclass(frozen=True)
class Profile:
    """How one model version behaves on the device."""

    latency_ms: float = 2.0  # median inference latency
    error_rate: float = 0.0
    confidence: float = 0.9
    inferences: int = 100  # per telemetry interval


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    host: str
    port: int
    workdir: str
    profiles: dict[str, Profile]
    version: str = "1"
    model_name: str = "netem-model"
    prefix: str = TopicScheme().prefix
    period_s: float = 1.0
    trusted_key: str | None = None
    seed: int = 0
    keepalive: int = 30  # the agent's default
    receipt_grace_s: float = 10.0
    receipt_timeout_s: float = 60.0

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        d = json.loads(text)
        d["profiles"] = {k: Profile(**v) for k, v in d["profiles"].items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _agent_download_policy() -> tuple[int, float, float]:
    """The agent's HTTP retries, back-off and socket timeout (its defaults, read from its code)."""
    from core.agent_config import UpdateSection
    from edge_agent.deploy import CommandWorker

    params = inspect.signature(CommandWorker.__init__).parameters
    return int(params["retries"].default), float(params["retry_wait_s"].default), UpdateSection().download_timeout_s


@dataclass
class _Installed:
    version: str
    sha256: str | None = None  # None: the version it was provisioned with
    verified: bool = True


@dataclass
class _Counters:
    generated: int = 0  # telemetry and drift reports each carry seq 1..generated
    jobs_sent: int = 0
    download_attempts: int = 0
    downloads_failed: int = 0
    commands: int = 0
    redeliveries: int = 0
    job_outcomes: dict[str, str] = field(default_factory=dict)


class SimulatedDevice:
    """The agent's link and outbox around a simulated model (see the module docstring)."""

    def __init__(self, spec: DeviceSpec) -> None:
        from edge_agent.link import AgentLink
        from edge_agent.outbox import Outbox

        self.spec = spec
        self.dir = Path(spec.workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng(spec.seed)
        self.lock = threading.Lock()
        self.current = _Installed(spec.version)
        self.previous: _Installed | None = None
        self.c = _Counters()
        self.busy = False
        self.retries, self.retry_wait_s, self.timeout_s = _agent_download_policy()
        self.stop = threading.Event()
        self.outbox = Outbox(self.dir / "outbox.db")
        self.link = AgentLink(host=spec.host, port=spec.port, device_id=spec.device_id, outbox=self.outbox,
                              keepalive=spec.keepalive, protocol="5", topics=TopicScheme(spec.prefix),
                              on_command=self.on_command, state=self._state(),
                              receipt_grace_s=spec.receipt_grace_s, receipt_timeout_s=spec.receipt_timeout_s)

    def _state(self) -> DeviceState:
        return DeviceState(self.spec.device_id, True, model_name=self.spec.model_name,
                           model_version=self.current.version,
                           previous_version=self.previous.version if self.previous else None,
                           delivery=("http",), agent_version="netem-sim")

    # ------------------------------------------------------------------ commands (the link's command thread)
    def on_command(self, cmd: Any) -> None:
        self.c.commands += 1
        if isinstance(cmd, DeployCommand):
            self._deploy(cmd)
        elif isinstance(cmd, RollbackCommand):
            self._rollback(cmd)

    def _job(self, cmd: Any, version: str, step: str, ok: bool = True, detail: str = "",
             progress: float | None = None) -> None:
        self.c.jobs_sent += 1
        self.link.send(JobStatus(self.spec.device_id, cmd.job_id, version, step, ok=ok, detail=detail[:500],
                                 progress=progress, previous_version=self.current.version))

    def _deploy(self, cmd: DeployCommand) -> None:
        if cmd.job_id in self.c.job_outcomes:
            self.c.redeliveries += 1  # the agent ignores a job it has handled
            return
        if cmd.version == self.current.version:
            self._job(cmd, cmd.version, "completed", detail="already serving this version", progress=1.0)
            self.c.job_outcomes[cmd.job_id] = "completed"
            return
        self.busy = True
        try:
            self._job(cmd, cmd.version, "received", detail=f"{cmd.delivery} delivery, {cmd.size} bytes", progress=0.0)
            path = self._download(cmd)
            self._job(cmd, cmd.version, "verifying")
            from core.bundle import open_bundle
            from core.signing import load_public_key

            key = load_public_key(Path(self.spec.trusted_key)) if self.spec.trusted_key else None
            open_bundle(path, trusted_key=key, require_signature=key is not None)
            for step in ("installing", "health_check", "switched"):
                self._job(cmd, cmd.version, step, detail="simulated")
            with self.lock:
                self.previous, self.current = self.current, _Installed(cmd.version, cmd.sha256, True)
            self._job(cmd, cmd.version, "completed", progress=1.0)
            self.link.update_state(self._state())
            self.c.job_outcomes[cmd.job_id] = "completed"
        except EdgeloopError as exc:
            self._job(cmd, cmd.version, "failed", ok=False, detail=str(exc))
            self.c.job_outcomes[cmd.job_id] = "failed"
        finally:
            self.busy = False

    def _download(self, cmd: DeployCommand) -> Path:
        """The agent's ``CommandWorker._download_http``: retry only interrupted downloads, resuming."""
        from edge_agent.updater import download_http

        dest = self.dir / "downloads" / f"{cmd.job_id}.elb"
        self._job(cmd, cmd.version, "downloading", detail=str(cmd.url), progress=0.0)
        last: UpdateError | None = None
        for attempt in range(1, self.retries + 1):
            self.c.download_attempts += 1
            try:
                return download_http(str(cmd.url), dest, size=cmd.size, sha256=cmd.sha256, timeout=self.timeout_s)
            except UpdateError as exc:
                last = exc
                if "received" not in exc.context:
                    break
                self._job(cmd, cmd.version, "downloading", detail=f"attempt {attempt}: {exc}"[:300])
                self.stop.wait(self.retry_wait_s * attempt)
        self.c.downloads_failed += 1
        assert last is not None
        raise last

    def _rollback(self, cmd: RollbackCommand) -> None:
        if cmd.job_id in self.c.job_outcomes:
            self.c.redeliveries += 1
            return
        with self.lock:
            target = cmd.to_version or (self.previous.version if self.previous else self.current.version)
            if target != self.current.version:
                back = self.previous if self.previous and self.previous.version == target else _Installed(target)
                self.previous, self.current = self.current, back
        self._job(cmd, target, "rolled_back", detail=cmd.reason[:200])
        self.link.update_state(self._state())
        self.c.job_outcomes[cmd.job_id] = "rolled_back"

    # ------------------------------------------------------------------ reports (main thread)
    def report(self) -> None:
        with self.lock:
            version = self.current.version
        p = self.spec.profiles[version]
        self.c.generated += 1
        seq = self.c.generated
        errors = int(round(p.inferences * p.error_rate))
        ok = p.inferences - errors
        load = float(self.rng.choice([1.0, 1.0, 1.0, 1.5, 2.0]))  # the device's own background load
        lat = self.rng.lognormal(math.log(p.latency_ms * load), 0.25, ok)
        hist: dict[str, int] = {}
        for ms in lat:
            k = str(latency_bucket(float(ms)))
            hist[k] = hist.get(k, 0) + 1
        conf = float(np.clip(self.rng.normal(p.confidence, 0.01), 0, 1)) if ok else None
        ts = time.time()
        self.link.send(Telemetry(self.spec.device_id, seq, ts=ts, model_version=version, inferences=seq * ok,
                                 inferences_interval=ok, errors=seq * errors,
                                 latency_p50_ms=float(np.median(lat)) if ok else None,
                                 latency_p99_ms=float(np.percentile(lat, 99)) if ok else None,
                                 mean_confidence=conf, latency_hist=hist, errors_interval=errors))
        self.link.send(DriftReportMsg(self.spec.device_id, seq, window=50, n=50, ts=ts, model_version=version,
                                      alarm=False, mean_confidence=conf))

    def status(self) -> dict[str, Any]:
        st = self.outbox.stats()
        with self.lock:
            cur, prev = self.current, self.previous
        return {"device_id": self.spec.device_id, "version": cur.version, "sha256": cur.sha256,
                "verified": cur.verified, "previous": prev.version if prev else None, "busy": self.busy,
                "connected": self.link.connected, "outbox_depth": st.depth, "awaiting_receipt": st.awaiting_receipt,
                "outbox_resent": st.resent, "dropped_messages": st.dropped_messages, **asdict(self.c),
                "ts": time.time()}

    def _write_status(self) -> None:
        tmp = self.dir / "status.json.tmp"
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, self.dir / "status.json")

    def _control(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "control.json").read_text()))
        except (OSError, ValueError):
            return {}

    def run(self) -> None:
        self.link.start()
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                ctl = self._control()
                if ctl.get("stop"):
                    break
                now = time.monotonic()
                if now >= next_at:
                    next_at = now + self.spec.period_s
                    if ctl.get("report", True):
                        self.report()
                    self._write_status()
                self.stop.wait(min(0.2, max(0.0, next_at - time.monotonic())))
        finally:
            self.link.close(timeout=2.0)
            self._write_status()
            self.outbox.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = DeviceSpec.from_json(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {spec.device_id} %(name)s: %(message)s")
    dev = SimulatedDevice(spec)
    signal.signal(signal.SIGTERM, lambda *_: dev.stop.set())
    dev.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
