"""The fleet's background loop: check the retraining trigger, run jobs, drive rollouts.

:class:`fleet.app.FleetApp` builds and starts one :class:`FleetWorker` (the decision to
retrain itself is :func:`fleet.policy.decide`).  Its thread

* ticks every active rollout (job statuses arriving through ingestion wake it at once),
* every ``[trigger].check_interval_s`` reads a :class:`~fleet.policy.FleetSnapshot` from
  the registry and asks :func:`fleet.policy.decide` whether to retrain,
* runs a retraining job in its own thread (training takes minutes; rollouts must keep
  moving meanwhile) and, when the candidate is accepted and ``[rollout].auto`` is on,
  starts a staged rollout of it,
* answers ``BundleRequest`` messages (MQTT delivery) from the ingestion hook.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core.errors import EdgeloopError
from core.protocol import BundleRequest, JobStatus, Message

from .config import FleetConfig
from .policy import (
    Decision,
    DriftPoint,
    FleetSnapshot,
    RetrainPolicyConfig,
    check_due,
    decide,
    policy_from_fleet_config,
)
from .registry import Registry
from .retrain import RetrainOutcome, RetrainSettings, run_retrain
from .rollout import RolloutPlan
from .rollout_driver import RolloutDriver

__all__ = ["FleetWorker", "settings_from_config"]

log = logging.getLogger(__name__)


def settings_from_config(cfg: FleetConfig, policy: RetrainPolicyConfig | None = None,
                         **overrides: Any) -> RetrainSettings:
    """Retraining locations from a :class:`fleet.config.FleetConfig` (runs under ``data_dir/runs``)."""
    values = dict(runs_dir=Path(cfg.data_dir) / "runs", bundles_dir=cfg.bundles_dir, samples_dir=cfg.samples_dir,
                  signing_key=cfg.signing_key_path, public_key=cfg.public_key_path,
                  policy=policy or policy_from_fleet_config(cfg))
    values.update(overrides)
    return RetrainSettings(**values)


class FleetWorker:
    """Trigger checks, retraining jobs and rollout ticks for one fleet."""

    def __init__(self, registry: Registry, driver: RolloutDriver, settings: RetrainSettings, *,
                 plan: RolloutPlan, model_name: str | None = None, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.registry = registry
        self.driver = driver
        self.settings = settings
        self.policy = settings.policy
        self.plan = plan
        self.model_name = model_name
        self.tick_s = tick_s
        self.clock = clock
        self.on_event = on_event or (lambda kind, data: None)
        self.outcomes: list[RetrainOutcome] = []
        self.last_decision: Decision | None = None
        self._last_check: float | None = None
        self._job: threading.Thread | None = None
        self._job_started: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ policy
    def served_model(self) -> tuple[str, Any] | None:
        """``(name, newest accepted ModelVersion)`` of the model this fleet serves."""
        name = self.model_name or self.registry.devices.most_common_model_name()
        if name is None:
            return None
        model = self.registry.models.latest(name, status="accepted")
        return (name, model) if model else None

    def snapshot(self, now: float) -> FleetSnapshot | None:
        served = self.served_model()
        if served is None:
            return None
        _name, model = served
        reports: dict[str, list[DriftPoint]] = {}
        for r in self.registry.drift(since=model.created):
            # alarms raised against another model version say nothing about this one
            if r.model_version in (None, model.version):
                reports.setdefault(r.device_id, []).append(DriftPoint(r.ts, r.alarm))
        labelled = self.registry.samples.count(labelled=True, since=model.created)
        during = 0
        for dev, pts in reports.items():
            if pts and pts[-1].alarm:
                start = pts[-1].ts
                for p in reversed(pts):  # the start of the current unbroken alarm
                    if not p.alarm:
                        break
                    start = p.ts
                during += self.registry.samples.count(labelled=True, device_ids=[dev], since=start)
        snap = FleetSnapshot(now=now, reports=reports, labelled_since_model=labelled,
                             last_job_at=self._last_job_at(), job_running=self.job_running,
                             labelled_during_alarm=during)
        if not (self.policy.concept_drift and self.policy.concept.enabled):
            return snap
        from .concept_drift import with_concept_drift  # feedback labels replayed per slice (O(labels))

        return with_concept_drift(snap, self.registry, self.policy.concept, model_version=model.version,
                                  since=model.created)

    def _last_job_at(self) -> float | None:
        """Start of the newest retraining job: in memory, else from the registry (survives restarts)."""
        times = [m.lineage.get("job_started", m.created) for m in self.registry.models()
                 if m.lineage and m.lineage.get("trigger")]
        if self._job_started is not None:
            times.append(self._job_started)
        return max(times) if times else None

    @property
    def job_running(self) -> bool:
        return self._job is not None and self._job.is_alive()

    def check(self, now: float | None = None) -> Decision | None:
        """Run the trigger check now; start a job when the policy says so."""
        t = self.clock() if now is None else now
        self._last_check = t
        snap = self.snapshot(t)
        if snap is None:
            return None
        decision = decide(self.policy, snap)
        last = self.last_decision
        if last is None or (last.retrain, last.trigger, len(last.alarmed_devices)) != \
                (decision.retrain, decision.trigger, len(decision.alarmed_devices)):
            log.info("retrain trigger: %s", decision.reason)
        self.last_decision = decision
        if decision.retrain:
            self.on_event("trigger", {"reason": decision.reason, "trigger": decision.trigger,
                                      "alarmed": list(decision.alarmed_devices), "labelled": decision.labelled,
                                      "concept": list(decision.concept_alarms)})
            self.start_job(decision.trigger or "manual")
        return decision

    # ------------------------------------------------------------------ jobs
    def start_job(self, trigger: str = "manual") -> threading.Thread:
        """Run a retraining job in its own thread (one at a time)."""
        if self.job_running:
            assert self._job is not None
            return self._job
        served = self.served_model()
        if served is None:
            raise EdgeloopError("no accepted model to retrain", hint="register the model in service first")
        name = served[0]
        self._job_started = self.clock()
        self._job = threading.Thread(target=self._job_main, args=(name, trigger), name="fleet-retrain", daemon=True)
        self._job.start()
        return self._job

    def _job_main(self, name: str, trigger: str) -> None:
        try:
            outcome = run_retrain(self.registry, self.settings, name, trigger=trigger, clock=self.clock)
        except EdgeloopError as exc:
            log.error("retraining %s failed: %s", name, exc)
            self.on_event("retrain_failed", {"error": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - a crashed job must not kill the fleet
            log.exception("retraining %s crashed", name)
            self.on_event("retrain_failed", {"error": repr(exc)})
            return
        self.outcomes.append(outcome)
        self.on_event("retrain_done", {"status": outcome.status, "reason": outcome.reason,
                                       "version": outcome.version, "outcome": outcome})
        if outcome.accepted and self.policy.auto_rollout and outcome.version:
            try:
                state = self.driver.start(name, outcome.version, self.plan)
            except EdgeloopError as exc:
                log.error("automatic rollout of %s %s failed to start: %s", name, outcome.version, exc)
                self.on_event("rollout_failed", {"error": str(exc)})
                return
            self.on_event("rollout_started", {"rollout_id": state.rollout_id, "version": outcome.version})
            self._wake.set()

    # ------------------------------------------------------------------ loop
    def on_messages(self, msgs: list[Message]) -> None:
        """Ingestion hook: answer bundle requests, wake the loop on job statuses."""
        for m in msgs:
            if isinstance(m, BundleRequest):
                try:
                    self.driver.handle_bundle_request(m)
                except (EdgeloopError, OSError) as exc:
                    log.error("bundle request from %s: %s", m.device_id, exc)
            elif isinstance(m, JobStatus):
                self._wake.set()

    def step(self) -> None:
        """One loop iteration: drive rollouts, then the trigger check when due."""
        # A busy database ("database is locked" past busy_timeout on a loaded machine) fails one
        # tick, not the worker: the next tick retries from the stored state.
        try:
            self.driver.tick()
        except (EdgeloopError, SQLAlchemyError) as exc:
            log.error("rollout tick: %s", exc)
        if check_due(self._last_check, self.clock(), self.policy):
            try:
                self.check()
            except (EdgeloopError, SQLAlchemyError) as exc:
                log.error("trigger check: %s", exc)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self._stop
        while not stop.is_set():
            self.step()
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def start(self) -> FleetWorker:
        self._thread = threading.Thread(target=self.run, name="fleet-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._job is not None:
            self._job.join(timeout)

