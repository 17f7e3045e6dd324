"""The staged rollout as a pure state machine: no clock, no MQTT, no database.

A rollout sends one bundle version to a canary group, then to growing waves of the
fleet.  Per wave: deploy, wait for every device's job to end (or time out), soak, then
judge the wave with the canary analysis (:mod:`fleet.canary`: the wave against devices
still on the old version over the same window).  A failed update counts against
``max_failures``; a failed analysis, or more than ``max_failures`` of the wave failing,
halts the rollout and rolls every device it updated back to its previous version.  An
analysis without enough data extends the soak by ``analysis.step_s`` up to
``analysis.max_extension_s``, then follows ``analysis.on_inconclusive``: ``hold`` pauses
the rollout (an operator's resume then accepts the wave), ``proceed`` goes on with a
warning event.  Every verdict is kept in ``RolloutState.verdicts`` with its evidence.

:func:`advance` takes the state, the time and what was observed (job outcomes, and
health verdicts once a soak is over) and returns the next state plus the commands to
send.  The I/O lives in :mod:`fleet.rollout_driver`, which persists the state after
every transition, so a fleet restarted mid-rollout carries on from its database.

Statuses: ``pending`` → ``running`` (phase ``deploying`` / ``soaking``) ⇄ ``paused``;
ends in ``completed``, ``aborted`` or, through ``rolling_back``, ``rolled_back``.

Commands can be lost on the way (a broker restarted without persistence drops the
queued ones).  :func:`resend` picks the devices that never answered their command with
any job step and sends the same command (same job id: agents ignore a job they have or
are handling) again, with a per-device back-off (:class:`ResendPolicy`), and at once
when the device reconnected after the command went out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError, RolloutError

from .canary import CanaryPolicy, Verdict

__all__ = [
    "CanaryPolicy",
    "Verdict",
    "RolloutPlan",
    "DeviceProgress",
    "RolloutEvent",
    "RolloutState",
    "JobOutcome",
    "ResendPolicy",
    "Liveness",
    "Deploy",
    "Rollback",
    "Action",
    "new_rollout",
    "wave_sizes",
    "advance",
    "unanswered",
    "due_resends",
    "resend",
    "pause",
    "resume",
    "abort",
    "rollback",
    "TERMINAL",
]

ROLLOUT_SCHEMA_VERSION = 1
TERMINAL = frozenset({"completed", "aborted", "rolled_back"})
_FAILED = frozenset({"failed", "timed_out", "unhealthy"})
# Devices that run, or may run, the new version: what a rollback has to revert.
_MAY_RUN_NEW = frozenset({"updated", "sent", "timed_out", "unhealthy"})


@dataclass(frozen=True)
class RolloutPlan:
    """How to stage a rollout; fractions are of the target devices (0.1 = 10 %)."""

    canary: float = 0.10
    waves: tuple[float, ...] = (0.25, 0.5, 1.0)  # cumulative shares after the canary
    soak_s: float = 60.0
    max_failures: float = 0.05  # share of a wave that may fail
    job_timeout_s: float = 300.0  # a device that has not finished by then failed
    analysis: CanaryPolicy = field(default_factory=CanaryPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", tuple(float(w) for w in self.waves))
        if isinstance(self.analysis, Mapping):
            object.__setattr__(self, "analysis", CanaryPolicy(**self.analysis))
        if not 0.0 < self.canary <= 1.0:
            raise ConfigError(f"canary {self.canary:g} must be a share in (0, 1]", hint="e.g. --canary 10%")
        if any(not 0.0 < w <= 1.0 for w in self.waves) or list(self.waves) != sorted(set(self.waves)):
            raise ConfigError(f"waves {self.waves} must be increasing shares in (0, 1]", hint="e.g. --waves 25,50,100")
        if self.soak_s < 0 or self.job_timeout_s <= 0:
            raise ConfigError("soak must be >= 0 s and the job timeout > 0 s", hint="e.g. --soak 60s")
        if not 0.0 <= self.max_failures < 1.0:
            raise ConfigError(f"max_failures {self.max_failures:g} must be a share in [0, 1)", hint="e.g. --max-failures 5%")


def wave_sizes(n: int, plan: RolloutPlan) -> list[int]:
    """Device counts per stage (canary first); empty stages are dropped."""
    if n <= 0:
        return []
    cumulative = [max(1, math.ceil(plan.canary * n - 1e-9))]
    for share in plan.waves:
        cumulative.append(max(cumulative[-1], min(n, math.ceil(share * n - 1e-9))))
    sizes, prev = [], 0
    for c in cumulative:
        if c > prev:
            sizes.append(c - prev)
        prev = c
    return sizes


@dataclass(frozen=True)
class DeviceProgress:
    """One device in a rollout.

    status: ``pending`` → ``sent`` → ``updated`` | ``failed`` (the device reported a
    failure and kept its old version) | ``timed_out``; ``updated`` → ``unhealthy`` after a
    bad soak; when rolled back: ``rolling_back`` → ``rolled_back`` | ``rollback_failed``.
    """

    device_id: str
    wave: int
    previous_version: str | None = None
    status: str = "pending"
    job_id: str | None = None
    detail: str = ""
    sent_at: float | None = None  # when the current command (job) first went out
    done_at: float | None = None  # when its outcome was recorded (start of the soak window)
    resends: int = 0  # times the current command was sent again, unanswered
    resent_at: float | None = None  # when it was last sent again


def _shallow(obj: Any) -> dict[str, Any]:
    """A flat dataclass (fields of JSON scalars) as a dict."""
    return {name: getattr(obj, name) for name in _field_names(type(obj))}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RolloutEvent:
    ts: float
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class JobOutcome:
    """The last step a device reported for one job."""

    step: str
    ok: bool = True
    detail: str = ""


@dataclass(frozen=True)
class ResendPolicy:
    """When to send a command again that no job step has answered.

    The n-th re-send waits ``after_s * 2**n`` seconds after the previous send, at most
    ``max_s`` (30, 60, 120, 240, 300, 300 ... with the defaults).
    """

    after_s: float = 30.0
    max_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.after_s > 0 or not self.max_s > 0:
            raise ConfigError(f"resend intervals must be > 0 s (after {self.after_s:g}, max {self.max_s:g})",
                              key="rollout.resend_after_s")

    def interval(self, resends: int) -> float:
        """Seconds to wait after the previous send, when the command was re-sent ``resends`` times."""
        cap = max(self.max_s, self.after_s)
        return min(cap, self.after_s * 2.0 ** min(resends, 32))


@dataclass(frozen=True)
class Liveness:
    """What the registry knows of a device's connection (fleet clock)."""

    online: bool
    state_seen: float | None = None  # when its latest state message (a birth on reconnect) arrived


@dataclass(frozen=True)
class Deploy:
    device_id: str
    job_id: str


@dataclass(frozen=True)
class Rollback:
    device_id: str
    job_id: str
    to_version: str | None
    reason: str


Action = Deploy | Rollback


@dataclass(frozen=True)
class RolloutState:
    """Everything a driver needs to carry on; JSON round-trips with to_dict/from_dict."""

    rollout_id: str
    name: str
    version: str
    plan: RolloutPlan
    devices: tuple[DeviceProgress, ...]
    created_at: float
    status: str = "pending"
    phase: str = ""
    wave: int = 0
    n_waves: int = 0
    phase_started_at: float | None = None
    paused_at: float | None = None
    reason: str = ""
    events: tuple[RolloutEvent, ...] = ()
    schema_version: int = ROLLOUT_SCHEMA_VERSION
    soak_extended_s: float = 0.0  # the current soak's extensions while the analysis lacked data
    verdicts: tuple[dict[str, Any], ...] = ()  # every canary analysis (Verdict.to_dict + wave, ts)
    held: bool = False  # paused by on_inconclusive = "hold" (a resume accepts the wave)
    accepted_wave: int = -1  # a held wave an operator resumed: an inconclusive verdict passes

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def device(self, device_id: str) -> DeviceProgress:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise RolloutError(f"device {device_id} is not part of rollout {self.rollout_id}", device_id=device_id)

    def in_wave(self, wave: int) -> list[DeviceProgress]:
        return [d for d in self.devices if d.wave == wave]

    def open_jobs(self) -> dict[str, str]:
        """job id -> device id for every job whose outcome the machine still waits on."""
        return {d.job_id: d.device_id for d in self.devices if d.job_id and d.status in ("sent", "rolling_back")}

    def wants_health(self, now: float) -> bool:
        """True when the current wave's soak is over and :func:`advance` needs health verdicts."""
        return (self.status == "running" and self.phase == "soaking" and self.phase_started_at is not None
                and now - self.phase_started_at >= self.plan.soak_s + self.soak_extended_s)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            out[d.status] = out.get(d.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives, ~10x faster: it deep-copies recursively, and a
        # 1,000-device rollout is serialised on every tick.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["plan"] = dataclasses.asdict(self.plan)
        d["devices"] = tuple(_shallow(x) for x in self.devices)
        d["events"] = tuple(_shallow(x) for x in self.events)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        try:
            d = dict(data)
            plan = dict(d["plan"])
            plan.pop("health", None)  # the before/after policy of rollouts stored before the canary analysis
            analysis = dict(plan.get("analysis", {}))
            for key in ("required", "critical"):
                if key in analysis:
                    analysis[key] = tuple(analysis[key])
            plan["analysis"] = CanaryPolicy(**analysis)
            d["plan"] = RolloutPlan(**plan)
            d["verdicts"] = tuple(d.get("verdicts", ()))
            d["devices"] = tuple(DeviceProgress(**x) for x in d["devices"])
            d["events"] = tuple(RolloutEvent(**x) for x in d.get("events", ()))
            if d.get("schema_version", ROLLOUT_SCHEMA_VERSION) != ROLLOUT_SCHEMA_VERSION:
                raise RolloutError(f"rollout state schema {d['schema_version']} is not supported")
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise RolloutError(f"corrupt rollout state: {exc}", hint="abort the rollout and start a new one") from exc


# --------------------------------------------------------------------------- building


def new_rollout(rollout_id: str, name: str, version: str, devices: Sequence[tuple[str, str | None]],
                plan: RolloutPlan, *, now: float) -> RolloutState:
    """A pending rollout of ``version`` over ``devices`` (``(device_id, current_version)``, in wave order)."""
    if not devices:
        raise RolloutError(f"no device to roll {name} {version} out to",
                           hint="check `edgeloop fleet devices`: targets must be online and on another version")
    sizes = wave_sizes(len(devices), plan)
    progress, i = [], 0
    for wave, size in enumerate(sizes):
        for dev, current in devices[i:i + size]:
            progress.append(DeviceProgress(dev, wave, previous_version=current))
        i += size
    return RolloutState(rollout_id, name, version, plan, tuple(progress), created_at=now, n_waves=len(sizes),
                        events=(RolloutEvent(now, "created", f"{len(devices)} devices in waves {sizes}"),))


def _with(state: RolloutState, now: float, kind: str, detail: str = "", **changes: Any) -> RolloutState:
    return dataclasses.replace(state, events=state.events + (RolloutEvent(now, kind, detail),), **changes)


def _set_devices(state: RolloutState, updates: Mapping[str, DeviceProgress]) -> RolloutState:
    return dataclasses.replace(state, devices=tuple(updates.get(d.device_id, d) for d in state.devices))


def _start_wave(state: RolloutState, wave: int, now: float) -> tuple[RolloutState, list[Action]]:
    actions: list[Action] = []
    updates = {}
    for d in state.in_wave(wave):
        job_id = f"{state.rollout_id}-w{wave}-{d.device_id}"
        updates[d.device_id] = dataclasses.replace(d, status="sent", job_id=job_id, sent_at=now, done_at=None,
                                                   resends=0, resent_at=None)
        actions.append(Deploy(d.device_id, job_id))
    state = _set_devices(state, updates)
    label = "canary" if wave == 0 else f"wave {wave}"
    state = _with(state, now, "wave_started", f"{label}: {len(actions)} devices", status="running",
                  phase="deploying", wave=wave, phase_started_at=now)
    return state, actions


def _start_rollback(state: RolloutState, now: float, reason: str) -> tuple[RolloutState, list[Action]]:
    """Roll back every device the rollout touched that may now run the new version."""
    actions: list[Action] = []
    updates = {}
    for d in state.devices:
        if d.status in _MAY_RUN_NEW:
            job_id = f"{state.rollout_id}-rb-{d.device_id}"
            updates[d.device_id] = dataclasses.replace(d, status="rolling_back", job_id=job_id, sent_at=now,
                                                       done_at=None, resends=0, resent_at=None)
            actions.append(Rollback(d.device_id, job_id, d.previous_version, reason))
    state = _set_devices(state, updates)
    if not actions:
        return _with(state, now, "rolled_back", f"{reason}; no device to roll back",
                     status="rolled_back", phase="", reason=reason), []
    return _with(state, now, "rolling_back", f"{reason}; {len(actions)} devices", status="rolling_back",
                 phase="", reason=reason, phase_started_at=now), actions


# --------------------------------------------------------------------------- transitions


def _record_jobs(state: RolloutState, jobs: Mapping[str, JobOutcome], now: float) -> RolloutState:
    updates = {}
    for d in state.devices:
        out = jobs.get(d.job_id) if d.job_id else None
        if out is None:
            continue
        done = functools.partial(dataclasses.replace, d, done_at=now)
        if d.status == "sent":
            if out.step == "completed" and out.ok:
                updates[d.device_id] = done(status="updated", detail="")
            elif out.step in ("failed", "rolled_back") or not out.ok:
                # rolled_back here means the device's own health check reverted it.
                updates[d.device_id] = done(status="failed", detail=f"{out.step}: {out.detail}".strip(": "))
        elif d.status == "rolling_back":
            if out.step in ("completed", "rolled_back") and out.ok:
                updates[d.device_id] = done(status="rolled_back", detail="")
            elif out.step == "failed" or not out.ok:
                updates[d.device_id] = done(status="rollback_failed", detail=out.detail)
    return _set_devices(state, updates) if updates else state


def advance(state: RolloutState, now: float, jobs: Mapping[str, JobOutcome] | None = None,
            health: Mapping[str, Sequence[str]] | None = None,
            verdict: Verdict | None = None) -> tuple[RolloutState, list[Action]]:
    """One step: record job outcomes, then move on if the current phase is over.

    ``jobs`` maps job ids to their latest outcome.  Once :meth:`RolloutState.wants_health`
    is true the soak needs a judgement: ``verdict``, the wave's canary analysis, and/or
    ``health``, reasons per updated device of the wave that it is unhealthy (empty:
    healthy).  Without either the machine waits.
    """
    state = _record_jobs(state, jobs or {}, now)
    if state.terminal or state.status == "paused":
        return state, []
    if state.status == "pending":
        return _start_wave(state, 0, now)
    if state.status == "rolling_back":
        waiting = [d for d in state.devices if d.status == "rolling_back"]
        assert state.phase_started_at is not None
        if waiting and now - state.phase_started_at < state.plan.job_timeout_s:
            return state, []
        if waiting:
            state = _set_devices(state, {d.device_id: dataclasses.replace(d, status="rollback_failed",
                                                                         detail="no answer before the timeout")
                                         for d in waiting})
        c = state.counts()
        return _with(state, now, "rolled_back", f"{c.get('rolled_back', 0)} rolled back, "
                     f"{c.get('rollback_failed', 0)} failed to", status="rolled_back"), []
    assert state.phase_started_at is not None
    wave = state.in_wave(state.wave)
    if state.phase == "deploying":
        waiting = [d for d in wave if d.status == "sent"]
        if waiting and now - state.phase_started_at < state.plan.job_timeout_s:
            return state, []
        if waiting:
            state = _set_devices(state, {d.device_id: dataclasses.replace(d, status="timed_out", detail="no outcome before the timeout")
                                         for d in waiting})
            wave = state.in_wave(state.wave)
        failed = [d for d in wave if d.status in _FAILED]
        if len(failed) / len(wave) > state.plan.max_failures:
            return _start_rollback(state, now, f"wave {state.wave}: {len(failed)}/{len(wave)} updates failed "
                                               f"({', '.join(d.device_id for d in failed)})")
        return _with(state, now, "soaking", f"wave {state.wave}: {len(wave) - len(failed)}/{len(wave)} updated",
                     phase="soaking", phase_started_at=now, soak_extended_s=0.0), []
    # soaking
    if not state.wants_health(now):
        return state, []
    if health is None and verdict is None:
        return state, []  # the driver has to compute the verdicts first
    health = health or {}
    updates = {}
    for d in wave:
        reasons = tuple(health.get(d.device_id, ()))
        if d.status == "updated" and reasons:
            updates[d.device_id] = dataclasses.replace(d, status="unhealthy", detail="; ".join(reasons))
    state = _set_devices(state, updates)
    wave = state.in_wave(state.wave)
    failed = [d for d in wave if d.status in _FAILED]
    if len(failed) / len(wave) > state.plan.max_failures:
        return _start_rollback(state, now, f"wave {state.wave} unhealthy: {len(failed)}/{len(wave)} devices failed "
                                           f"({'; '.join(f'{d.device_id}: {d.detail}' for d in failed)})")
    healthy = f"wave {state.wave}: {len(wave) - len(failed)}/{len(wave)} healthy"
    if verdict is not None:
        state, actions, go_on = _judged(state, now, verdict)
        if not go_on:
            return state, actions
        healthy += f"; canary analysis {verdict.decision}"
    state = _with(state, now, "wave_healthy", healthy)
    if state.wave + 1 < state.n_waves:
        return _start_wave(state, state.wave + 1, now)
    c = state.counts()
    return _with(state, now, "completed", f"{c.get('updated', 0)} devices on {state.version}",
                 status="completed", phase=""), []


def _judged(state: RolloutState, now: float, verdict: Verdict) -> tuple[RolloutState, list[Action], bool]:
    """Act on a wave's canary analysis: ``(state, actions, go on with the next wave)``."""
    label = "canary" if state.wave == 0 else f"wave {state.wave}"
    pol = state.plan.analysis
    record = verdict.to_dict(wave=state.wave, ts=now, extended_s=state.soak_extended_s)
    state = dataclasses.replace(state, verdicts=state.verdicts + (record,))
    summary = verdict.summary()
    if verdict.decision == "fail":
        s, acts = _start_rollback(state, now, f"{label} failed the canary analysis: {summary}")
        return s, acts, False
    if verdict.decision == "pass":
        return _with(state, now, "verdict", f"{label}: {summary}"), [], True
    # marginal or inconclusive: wait for more data while the budget lasts
    step = pol.step_s(state.plan.soak_s)
    if state.soak_extended_s + step <= pol.max_extension_s + 1e-9:
        extended = state.soak_extended_s + step
        return _with(state, now, "soak_extended", f"{label}: +{step:g} s (extended {extended:g} of "
                     f"{pol.max_extension_s:g} s): {summary}", soak_extended_s=extended), [], False
    if state.accepted_wave == state.wave:
        return _with(state, now, "warning", f"{label}: accepted by the operator despite: {summary}"), [], True
    if pol.on_inconclusive == "proceed":
        return _with(state, now, "warning", f"{label}: proceeding (on_inconclusive = proceed) despite: "
                     f"{summary}"), [], True
    reason = f"held: {label} {verdict.decision} after {state.soak_extended_s:g} s of extra soak; resume to accept it"
    return _with(state, now, "held", f"{reason}: {summary}", status="paused", paused_at=now, held=True,
                 reason=reason), [], False


# --------------------------------------------------------------------------- lost commands

_AWAITING = frozenset({"sent", "rolling_back"})


def unanswered(state: RolloutState, answered: Collection[str]) -> list[DeviceProgress]:
    """Devices waiting on a command whose job id is not in ``answered``.

    ``answered``: the job ids some job step has answered, and those sent in this very
    step (:func:`advance`'s actions), which cannot have been answered yet.
    """
    if state.terminal:
        return []
    return [d for d in state.devices if d.status in _AWAITING and d.job_id and d.job_id not in answered]


def due_resends(state: RolloutState, now: float, answered: Collection[str], liveness: Mapping[str, Liveness],
                policy: ResendPolicy, *, everything: bool = False) -> list[DeviceProgress]:
    """Devices whose unanswered command should go out again now.

    Due: a device that reconnected (its state message arrived) after the last send, at
    once; an online device (or one the registry does not know) once
    ``policy.interval(resends)`` has passed since the last send.  An offline device
    waits: the broker queues the command in its session, and its birth makes it due.
    ``everything``: every unanswered command (a fleet that restarted cannot know what
    was lost while it was down).  Paused rollouts still deliver the commands they
    already issued.  ``answered`` as in :func:`unanswered`.
    """
    due = []
    for d in unanswered(state, answered):
        last = d.resent_at if d.resent_at is not None else d.sent_at
        if last is None:
            continue
        live = liveness.get(d.device_id)
        if everything:
            due.append(d)
        elif live is not None and not live.online:
            continue
        elif live is not None and live.state_seen is not None and live.state_seen > last:
            due.append(d)  # reconnected since: what its broker session held may be gone
        elif now - last >= policy.interval(d.resends):
            due.append(d)
    return due


def resend(state: RolloutState, now: float, answered: Collection[str], liveness: Mapping[str, Liveness],
           policy: ResendPolicy, *, everything: bool = False) -> tuple[RolloutState, list[Action]]:
    """The commands :func:`due_resends` picks, again (same job ids), and the state counting them."""
    due = due_resends(state, now, answered, liveness, policy, everything=everything)
    if not due:
        return state, []
    actions: list[Action] = []
    for d in due:
        assert d.job_id is not None  # unanswered() only yields devices with a job
        actions.append(Deploy(d.device_id, d.job_id) if d.status == "sent"
                       else Rollback(d.device_id, d.job_id, d.previous_version, state.reason))
    state = _set_devices(state, {d.device_id: dataclasses.replace(d, resends=d.resends + 1, resent_at=now)
                                 for d in due})
    names = ", ".join(d.device_id for d in due[:5]) + (f" and {len(due) - 5} more" if len(due) > 5 else "")
    return _with(state, now, "resent", f"{len(due)} unanswered commands: {names}"), actions


# --------------------------------------------------------------------------- operator commands


def _require_live(state: RolloutState, verb: str) -> None:
    if state.terminal:
        raise RolloutError(f"rollout {state.rollout_id} is {state.status}; cannot {verb} it",
                           rollout_id=state.rollout_id)


def pause(state: RolloutState, now: float) -> RolloutState:
    """Stop sending new waves; outcomes are still recorded.  Pausing twice is a no-op."""
    _require_live(state, "pause")
    if state.status == "paused":
        return state
    if state.status == "rolling_back":
        raise RolloutError(f"rollout {state.rollout_id} is rolling back; it cannot be paused")
    return _with(state, now, "paused", status="paused", paused_at=now)


def resume(state: RolloutState, now: float) -> RolloutState:
    """Carry on where :func:`pause` stopped; the phase's clock does not run while paused."""
    _require_live(state, "resume")
    if state.status != "paused":
        return state
    started = state.phase_started_at
    if started is not None and state.paused_at is not None:
        started += now - state.paused_at
    status = "pending" if state.phase == "" else "running"
    accepted = state.wave if state.held else state.accepted_wave  # resuming a hold accepts the wave
    return _with(state, now, "resumed", status=status, paused_at=None, phase_started_at=started, held=False,
                 accepted_wave=accepted, reason="" if state.held else state.reason)


def abort(state: RolloutState, now: float, reason: str = "aborted by operator") -> RolloutState:
    """Stop for good; updated devices keep the new version (use :func:`rollback` to revert)."""
    _require_live(state, "abort")
    return _with(state, now, "aborted", reason, status="aborted", phase="", reason=reason)


def rollback(state: RolloutState, now: float, reason: str = "rolled back by operator") -> tuple[RolloutState, list[Action]]:
    """Roll every updated device back to its previous version (also after completion)."""
    if state.status in ("rolled_back", "rolling_back"):
        return state, []
    return _start_rollback(state, now, reason)
