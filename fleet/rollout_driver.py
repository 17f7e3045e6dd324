"""The I/O side of rollouts: commands over MQTT, job statuses and health from the registry.

:class:`RolloutDriver` owns no state of its own: every rollout lives in the registry
(``rollouts.state`` holds :class:`~fleet.rollout.RolloutState` as JSON, and the
``rollout_targets`` rows mirror each device's progress for ``edgeloop fleet rollouts``).
Each :meth:`RolloutDriver.tick` loads the active rollouts, feeds the pure machine in
:mod:`fleet.rollout` with the job outcomes and, after a soak, the wave's canary analysis
(:mod:`fleet.canary`: telemetry, drift reports and feedback labels of the wave against
devices still on the old version, :mod:`fleet.canary_data`); it persists the new state
*before* it publishes the commands, so a fleet restarted in between resends them (the
job id is deterministic and the agent treats a repeated job id as the same job).

Commands get lost (a broker restart drops what it queued for a device), so every tick
also asks :func:`fleet.rollout.resend` which unanswered commands to send again: after
``resend_after_s`` with a doubling back-off, at once when the device reconnected, and
all of them once after the fleet itself restarted.  Per tick that is one query for the
open jobs' latest steps and, while some are unanswered, one for those devices.

Bundle delivery is the device's choice (``DeviceState.delivery``): an HTTP URL on the
fleet API with range requests, or MQTT chunk frames sent in answer to ``BundleRequest``
(:meth:`RolloutDriver.handle_bundle_request`).  Building and publishing the commands is
:class:`fleet.rollout_commands.RolloutCommands` (``RolloutDriver.commands``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

from core.errors import RolloutError
from core.protocol import DEFAULT_CHUNK_SIZE, BundleRequest, TopicScheme

from . import rollout as rm
from .canary import CanaryPolicy, Verdict
from .canary_data import analyse_shadow, analyse_wave
from .config import FleetConfig
from .registry import ModelVersion, Registry
from .rollout_commands import Publisher, RolloutCommands

__all__ = ["Publisher", "RolloutDriver", "plan_from_config", "analysis_from_config", "resend_from_config",
           "REGISTRY_STATUS"]

log = logging.getLogger(__name__)

# The machine's statuses as the registry's ``rollouts.status`` column spells them.
REGISTRY_STATUS = {"scheduled": "scheduled", "pending": "pending", "running": "running", "paused": "paused",
                   "completed": "completed", "aborted": "aborted", "rolling_back": "halted",
                   "rolled_back": "rolled_back"}
_TARGET_STATUS = {"pending": "pending", "sent": "sent", "updated": "updated", "failed": "failed",
                  "shadowing": "updating",  # installed beside the serving model (detail: shadowing)
                  "timed_out": "failed", "unhealthy": "failed", "rolling_back": "rolling_back",
                  "rolled_back": "rolled_back", "rollback_failed": "failed"}


_ACTIVE = ("scheduled", "pending", "running", "paused", "halted")  # registry statuses of unfinished rollouts


def resend_from_config(cfg: Any) -> rm.ResendPolicy:
    """A :class:`~fleet.rollout.ResendPolicy` from fleet.toml's ``[rollout]`` table."""
    return rm.ResendPolicy(after_s=cfg.resend_after_s)


def analysis_from_config(cfg: Any) -> CanaryPolicy:
    """The canary analysis' thresholds: fleet.toml's ``[rollout]`` keys named ``canary_<field>``."""
    fields = CanaryPolicy.__dataclass_fields__
    return CanaryPolicy(**{name: getattr(cfg, f"canary_{name}") for name in fields
                           if hasattr(cfg, f"canary_{name}")})


def plan_from_config(cfg: Any, *, job_timeout_s: float | None = None, shadow: bool = True) -> rm.RolloutPlan:
    """A :class:`~fleet.rollout.RolloutPlan` from fleet.toml's ``[rollout]`` table.

    ``shadow``: with the ``shadow_s`` stage (automatic rollouts of retrained models);
    manual rollouts ask for it with ``--shadow``.
    """
    extra: dict[str, Any] = {"job_timeout_s": job_timeout_s} if job_timeout_s else {}
    if shadow:
        extra.update(shadow_s=getattr(cfg, "shadow_s", 0.0), shadow_every=getattr(cfg, "shadow_every", 0))
    return rm.RolloutPlan(canary=cfg.canary, waves=tuple(cfg.waves), soak_s=cfg.soak_s,
                          max_failures=cfg.max_failures, analysis=analysis_from_config(cfg), **extra)


def _named(devices: Sequence[str]) -> str:
    more = f" +{len(devices) - 5}" if len(devices) > 5 else ""
    return f"devices {','.join(devices[:5])}{more}"


class RolloutDriver:
    """Runs every active rollout of one registry.  Thread-safe (one lock around ticks)."""

    def __init__(self, registry: Registry, publisher: Publisher, *, topics: TopicScheme | None = None,
                 api_base_url: str | None = None, delivery: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE,
                 clock: Callable[[], float] = time.time,
                 bundle_url: Callable[[ModelVersion], str] | None = None,
                 resend: rm.ResendPolicy | None = None) -> None:
        self.registry = registry
        self.publisher = publisher
        self.topics = topics or TopicScheme()
        self.clock = clock
        self.commands = RolloutCommands(registry, publisher, self.topics, api_base_url=api_base_url,
                                        delivery=delivery, chunk_size=chunk_size, clock=clock,
                                        bundle_url=bundle_url, active=self.active)
        self.resend = resend or rm.ResendPolicy()
        self._lock = threading.RLock()
        self._resent: set[str] = set()  # rollouts whose unanswered commands were resent after a restart

    @classmethod
    def from_config(cls, cfg: FleetConfig, registry: Registry, publisher: Publisher, *,
                    api_base_url: str | None = None, delivery: str | None = None,
                    clock: Callable[[], float] = time.time) -> RolloutDriver:
        """The driver fleet.toml describes: its topic prefix and every ``[rollout]`` setting.

        ``api_base_url``: where devices download bundles (default ``[api]`` public_url, else
        host:port); ``delivery`` overrides ``[rollout].delivery`` (the CLI's ``--delivery``).
        """
        return cls(registry, publisher, topics=TopicScheme(cfg.prefix),
                   api_base_url=api_base_url or cfg.api.base_url, delivery=delivery or cfg.rollout.delivery,
                   resend=resend_from_config(cfg.rollout), clock=clock)

    # ------------------------------------------------------------------ starting
    def start(self, name: str, version: str, plan: rm.RolloutPlan, *, devices: Sequence[str] | None = None,
              rollout_id: str | None = None, target: str | rm.TargetSelector | None = None,
              start_at: float | None = None) -> rm.RolloutState:
        """Create a rollout of a registered, signed model version over ``devices``.

        ``start_at`` (epoch seconds) after now: the rollout is stored ``scheduled`` at once (it
        blocks another rollout of the model) and :meth:`tick` starts it at that time.

        Default targets: every online device running another version, sorted by id, so
        the canary is deterministic; ``target`` (``group=cams-north``, see
        :class:`fleet.rollout.TargetSelector`) keeps only the devices whose tags match.
        """
        selector = target if isinstance(target, rm.TargetSelector) else rm.parse_target(target)
        if devices is not None and not selector.everything:
            raise RolloutError("name either devices or a target, not both",
                               hint="--devices cam-01,cam-02 or --target group=cams-north")
        model = self.registry.model(name, version)
        if model is None or not model.bundle_path:
            raise RolloutError(f"model {name} {version} is not in the registry",
                               hint="register the bundle first (the fleet only pushes signed, registered bundles)")
        if model.status == "rejected":
            raise RolloutError(f"model {name} {version} was rejected: {model.reason}", version=version)
        for r in self.active():
            if r.name == name:
                raise RolloutError(f"rollout {r.rollout_id} of {name} {r.version} is still {r.status}",
                                   hint="pause/abort it first", rollout=r.rollout_id)
        if devices is None:
            recs = [d for d in self.registry.devices(online=True) if d.model_version != version
                    and (d.model_name in (None, name)) and selector.matches(d.tags, d.hardware)]
        else:
            recs = []
            for dev in devices:
                rec = self.registry.device(dev)
                if rec is None:
                    raise RolloutError(f"unknown device {dev}", device_id=dev, hint="see `edgeloop fleet devices`")
                recs.append(rec)
        now = self.clock()
        rid = rollout_id or f"ro-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:6]}"
        state = rm.new_rollout(rid, name, version, [(d.id, d.model_version) for d in recs], plan, now=now,
                               target=str(selector) if devices is None else _named(devices), start_at=start_at)
        self.registry.create_rollout(rid, name, version, {d.device_id: d.wave for d in state.devices},
                                     state=state.to_dict(), status=REGISTRY_STATUS[state.status],
                                     reason=state.reason or None)
        for d in state.devices:
            self.registry.update_targets(rid, [d.device_id], status="pending",
                                         previous_version=d.previous_version)
        log.info("rollout %s of %s %s created: %d devices (%s)%s", rid, name, version, len(state.devices),
                 state.target, f", {state.reason}" if state.status == "scheduled" else "")
        return self.tick_one(rid)

    # ------------------------------------------------------------------ reading
    def load(self, rollout_id: str) -> rm.RolloutState:
        rec = self.registry.rollout(rollout_id)
        if rec is None:
            raise RolloutError(f"no rollout {rollout_id}", rollout=rollout_id, hint="see `edgeloop fleet rollouts`")
        return rm.RolloutState.from_dict(rec.state)

    def active(self) -> list[rm.RolloutState]:
        """Rollouts that are not finished (the registry's ``halted`` is the machine's rolling back)."""
        recs = self.registry.rollouts(statuses=_ACTIVE)
        return [rm.RolloutState.from_dict(r.state) for r in recs if r.state]

    # ------------------------------------------------------------------ driving
    def tick(self) -> list[rm.RolloutState]:
        """Advance every active rollout once; returns their new states."""
        out = []
        for rollout_id in self.registry.rollout_ids(statuses=_ACTIVE):
            try:
                out.append(self.tick_one(rollout_id))
            except RolloutError as exc:  # one broken rollout must not stop the others
                log.error("rollout %s: %s", rollout_id, exc)
        return out

    def tick_one(self, rollout_id: str) -> rm.RolloutState:
        with self._lock:
            state = self.load(rollout_id)
            if state.terminal:
                return state
            now = self.clock()
            jobs = self._job_outcomes(state)
            verdict = self._verdict(state, now) if state.wants_health(now) else None
            new, actions = rm.advance(state, now, jobs, verdict=verdict)
            # This process may have missed what happened while it was down: resend all unanswered once.
            restarted = rollout_id not in self._resent
            settled = jobs.keys() | {a.job_id for a in actions}  # answered, or sent just now
            new, again = self._resends(new, now, answered=settled, everything=restarted)
            self._resent.add(rollout_id)
            if new != state:
                self._save(new, state)
            if again:
                log.info("rollout %s: resending %d unanswered commands", rollout_id, len(again))
            self._send(new, [*actions, *again])
            return new

    def run_until_done(self, rollout_id: str, *, stop: threading.Event | None = None,
                       interval_s: float = 0.2, timeout_s: float | None = None) -> rm.RolloutState:
        """Tick one rollout until it ends (used by the demo and tests; the worker ticks on its own)."""
        stop = stop or threading.Event()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.tick_one(rollout_id)
            if state.terminal or (deadline is not None and time.monotonic() > deadline):
                return state
            if stop.wait(interval_s):
                return state

    # ------------------------------------------------------------------ operator commands
    def pause(self, rollout_id: str) -> rm.RolloutState:
        return self._command(rollout_id, lambda s, now: (rm.pause(s, now), []))

    def resume(self, rollout_id: str) -> rm.RolloutState:
        self._command(rollout_id, lambda s, now: (rm.resume(s, now), []))
        return self.tick_one(rollout_id)

    def abort(self, rollout_id: str, reason: str = "aborted by operator") -> rm.RolloutState:
        return self._command(rollout_id, lambda s, now: (rm.abort(s, now, reason), []))

    def rollback(self, rollout_id: str, reason: str = "rolled back by operator") -> rm.RolloutState:
        return self._command(rollout_id, lambda s, now: rm.rollback(s, now, reason))

    def _command(self, rollout_id: str, fn: Callable[[rm.RolloutState, float], tuple[rm.RolloutState, list[rm.Action]]]
                 ) -> rm.RolloutState:
        with self._lock:
            state = self.load(rollout_id)
            new, actions = fn(state, self.clock())
            if new != state:
                self._save(new, state)
            self._send(new, actions)
            return new

    # ------------------------------------------------------------------ persistence
    def _save(self, new: rm.RolloutState, old: rm.RolloutState) -> None:
        self.registry.replace_rollout_state(new.rollout_id, status=REGISTRY_STATUS[new.status],
                                            # a reason the state dropped ("scheduled for ...", a hold) is cleared
                                            reason=new.reason or ("" if old.reason else None), state=new.to_dict())
        # One transaction per (status, detail) group, not per device: a wave of 1,000 devices
        # changing state in one tick was 1,000 commits (~10 s on PostgreSQL, measured).
        before = {d.device_id: (d.status, d.detail, d.job_id) for d in old.devices}
        groups: dict[tuple[str, str], dict[str, str | None]] = {}
        for d in new.devices:
            if before.get(d.device_id) != (d.status, d.detail, d.job_id):  # what a target row shows
                groups.setdefault((_TARGET_STATUS[d.status], d.detail or d.status), {})[d.device_id] = d.job_id
        for (status, detail), jobs in groups.items():
            self.registry.update_targets(new.rollout_id, list(jobs), status=status, detail=detail,
                                         job_ids={k: v for k, v in jobs.items() if v is not None})
        for e in new.events[len(old.events):]:
            log.info("rollout %s: %s %s", new.rollout_id, e.kind, e.detail)

    # ------------------------------------------------------------------ observations
    def _job_outcomes(self, state: rm.RolloutState) -> dict[str, rm.JobOutcome]:
        open_jobs = state.open_jobs()
        if not open_jobs:
            return {}
        latest = self.registry.latest_job_steps(list(open_jobs))
        out: dict[str, rm.JobOutcome] = {}
        for (job_id, device_id), rec in latest.items():
            if open_jobs.get(job_id) == device_id:
                out[job_id] = rm.JobOutcome(rec.step, rec.ok, rec.detail)
        return out

    def _resends(self, state: rm.RolloutState, now: float, *, answered: Collection[str],
                 everything: bool) -> tuple[rm.RolloutState, list[rm.Action]]:
        """Commands to send again (see :func:`fleet.rollout.resend`), with the devices' liveness."""
        waiting = rm.unanswered(state, answered)
        if not waiting:
            return state, []
        records = self.registry.devices_by_id([d.device_id for d in waiting])
        liveness = {dev: rm.Liveness(rec.online, rec.state_seen) for dev, rec in records.items()}
        return rm.resend(state, now, answered, liveness, self.resend, everything=everything)

    def _verdict(self, state: rm.RolloutState, now: float) -> Verdict:
        """The canary analysis of the current wave (see :mod:`fleet.canary`)."""
        analyse = analyse_shadow if state.phase == "shadowing" else analyse_wave
        verdict = analyse(self.registry, state, now)
        log.info("rollout %s wave %d: %s", state.rollout_id, state.wave, verdict.summary())
        return verdict

    # ------------------------------------------------------------------ commands (fleet.rollout_commands)
    @property
    def api_base_url(self) -> str | None:
        return self.commands.api_base_url

    @property
    def delivery(self) -> str:
        return self.commands.delivery

    @property
    def chunk_size(self) -> int:
        return self.commands.chunk_size

    def bundle_url(self, model: ModelVersion) -> str:
        """Where a device downloads the bundle over HTTP (the fleet API serves it with Range)."""
        return self.commands.bundle_url(model)

    def handle_bundle_request(self, req: BundleRequest) -> int:
        """Answer a device's :class:`BundleRequest` with chunk frames from chunk ``req.start`` on
        (:meth:`fleet.rollout_commands.RolloutCommands.handle_bundle_request`); the number sent."""
        return self.commands.handle_bundle_request(req)

    def _send(self, state: rm.RolloutState, actions: Sequence[rm.Action]) -> None:
        self.commands.send(state, actions)
