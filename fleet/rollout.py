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
warning event.  While the judged devices' reports reach the fleet late (``Verdict.transit_s``
above a step: a backlog, not silence), an extension is counted apart, against a second
``max_extension_s``.  Every verdict is kept in ``RolloutState.verdicts`` with its evidence.

:func:`advance` takes the state, the time and what was observed (job outcomes, and
health verdicts once a soak is over) and returns the next state plus the commands to
send.  The I/O lives in :mod:`fleet.rollout_driver`, which persists the state after
every transition, so a fleet restarted mid-rollout carries on from its database.

With ``plan.shadow_s`` > 0 the canary devices first *shadow* the candidate (phases
``shadow_deploying`` / ``shadowing``): installed, not switched to, run beside the serving
model on the same inputs (``Deploy.shadow``); after ``shadow_s`` the shadow verdict
(:func:`fleet.canary.judge_shadow`) lets the canary serve it, or rolls the rollout back
before any device served it.  Devices that never answer the shadow command (agents
without shadowing reject it) go on to the canary as usual; without any shadowing device
the stage is skipped and the events say so.

A rollout created with ``start_at`` in the future is ``scheduled``: it sends nothing
until :func:`advance` sees ``now >= start_at``, then goes on as a ``pending`` one;
:func:`abort` cancels it before it started.  With ``plan.window`` (``"01:00-05:00"``, UTC)
the rollout and each later wave start only inside that maintenance window: a wave due
outside it waits (phase ``window``); job outcomes, soaks and rollbacks do not wait.

Statuses: (``scheduled`` →) ``pending`` → ``running`` (phase ``deploying`` / ``soaking``) ⇄ ``paused``;
ends in ``completed``, ``aborted`` or, through ``rolling_back``, ``rolled_back``.
Lost commands are re-sent by :mod:`fleet.rollout_resend`; the plan and state types live
in :mod:`fleet.rollout_state`.  Both are re-exported here: ``fleet.rollout`` stays the
one name to import.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

from core.errors import RolloutError

from .canary import CanaryPolicy, Verdict
from .rollout_resend import Liveness, ResendPolicy, due_resends, resend, unanswered
from .rollout_state import (
    FAILED,
    MAY_RUN_NEW,
    ROLLOUT_SCHEMA_VERSION,
    TERMINAL,
    Action,
    Deploy,
    DeviceProgress,
    JobOutcome,
    Rollback,
    RolloutEvent,
    RolloutPlan,
    RolloutState,
    TargetSelector,
    in_window,
    iso_utc,
    parse_target,
    wave_sizes,
)
from .rollout_state import set_devices as _set_devices
from .rollout_state import with_event as _with

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
    "TargetSelector",
    "parse_target",
    "wave_sizes",
    "iso_utc",
    "advance",
    "unanswered",
    "due_resends",
    "resend",
    "pause",
    "resume",
    "abort",
    "rollback",
    "TERMINAL",
    "ROLLOUT_SCHEMA_VERSION",
]


# --------------------------------------------------------------------------- building


def new_rollout(rollout_id: str, name: str, version: str, devices: Sequence[tuple[str, str | None]],
                plan: RolloutPlan, *, now: float, target: str = "all", start_at: float | None = None) -> RolloutState:
    """A pending rollout of ``version`` over ``devices`` (``(device_id, current_version)``, in wave order);
    ``target`` says how they were chosen (``all``, or a tag selector such as ``group=cams-north``).
    ``start_at`` after ``now``: a ``scheduled`` rollout that starts at that time (epoch seconds)."""
    if not devices:
        where = "" if target == "all" else f" in target {target}"
        raise RolloutError(f"no device{where} to roll {name} {version} out to",
                           hint="check `edgeloop fleet devices`: targets must be online and on another version")
    sizes = wave_sizes(len(devices), plan)
    progress, i = [], 0
    for wave, size in enumerate(sizes):
        for dev, current in devices[i:i + size]:
            progress.append(DeviceProgress(dev, wave, previous_version=current))
        i += size
    state = RolloutState(rollout_id, name, version, plan, tuple(progress), created_at=now, n_waves=len(sizes),
                         target=target, events=(RolloutEvent(now, "created", f"{len(devices)} devices "
                                                             f"({target}) in waves {sizes}"),))
    if start_at is None or start_at <= now:
        return state
    when = f"scheduled for {iso_utc(start_at)}"
    return _with(state, now, "scheduled", when, status="scheduled", start_at=start_at, reason=when)



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


def _start_shadow(state: RolloutState, now: float) -> tuple[RolloutState, list[Action]]:
    """The shadow stage: the canary devices install the candidate without serving it."""
    actions: list[Action] = []
    updates = {}
    for d in state.in_wave(0):
        job_id = f"{state.rollout_id}-s0-{d.device_id}"
        updates[d.device_id] = dataclasses.replace(d, status="sent", job_id=job_id, sent_at=now, done_at=None,
                                                   resends=0, resent_at=None)
        actions.append(Deploy(d.device_id, job_id, shadow=True))
    state = _set_devices(state, updates)
    state = _with(state, now, "shadow_started", f"{len(actions)} canary devices shadow {state.version} for "
                  f"{state.plan.shadow_s:g} s (not serving it)", status="running", phase="shadow_deploying", wave=0,
                  phase_started_at=now)
    return state, actions


def _shadow_deployed(state: RolloutState, now: float) -> tuple[RolloutState, list[Action]]:
    """Every shadow install answered (or timed out): shadow, skip the stage, or roll back."""
    assert state.phase_started_at is not None
    wave = state.in_wave(0)
    waiting = [d for d in wave if d.status == "sent"]
    if waiting and now - state.phase_started_at < state.plan.job_timeout_s:
        return state, []
    if waiting:  # not a model failure: an agent without shadowing, or offline; it joins the canary as usual
        state = _set_devices(state, {d.device_id: dataclasses.replace(
            d, status="pending", job_id=None, detail="no answer to the shadow command") for d in waiting})
        wave = state.in_wave(0)
    failed = [d for d in wave if d.status in FAILED]
    if len(failed) / len(wave) > state.plan.max_failures:
        return _start_rollback(state, now, f"shadow stage: {len(failed)}/{len(wave)} installs failed "
                                           f"({'; '.join(f'{d.device_id}: {d.detail}' for d in failed)})")
    shadowing = [d for d in wave if d.status == "shadowing"]
    if not shadowing:
        state = _with(state, now, "shadow_skipped", "no canary device shadows (agents without shadowing?)")
        return _start_wave(state, 0, now)
    return _with(state, now, "shadowing", f"{len(shadowing)}/{len(wave)} canary devices shadow {state.version}",
                 phase="shadowing", phase_started_at=now, soak_extended_s=0.0, transit_waited_s=0.0), []


def _start_rollback(state: RolloutState, now: float, reason: str) -> tuple[RolloutState, list[Action]]:
    """Roll back every device the rollout touched that may now run the new version."""
    actions: list[Action] = []
    updates = {}
    for d in state.devices:
        if d.status in MAY_RUN_NEW:
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
                updates[d.device_id] = done(status="shadowing" if state.phase == "shadow_deploying" else "updated",
                                            detail="")
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
    if state.status == "scheduled":
        if state.start_at is not None and now < state.start_at:
            return state, []  # nothing is sent before the start time
        state = _with(state, now, "schedule_due", f"start time {iso_utc(state.start_at or now)} reached",
                      status="pending", reason="")
    if state.status == "pending":
        if not in_window(state.plan.window, now):
            return _wait_window(state, now, "the rollout"), []
        return _start_shadow(state, now) if state.plan.shadow_s > 0 else _start_wave(state, 0, now)
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
    if state.phase == "shadow_deploying":
        return _shadow_deployed(state, now)
    if state.phase == "shadowing":
        if not state.wants_health(now) or verdict is None:
            return state, []
        state, actions, go_on = _judged(state, now, verdict)
        return _start_wave(_with(state, now, "shadow_passed", verdict.summary()[:300], accepted_wave=-1), 0, now) if go_on \
            else (state, actions)
    if state.phase == "window":  # the previous wave was healthy; the next one waits for the window
        return _start_wave(state, state.wave + 1, now) if in_window(state.plan.window, now) else (state, [])
    wave = state.in_wave(state.wave)
    if state.phase == "deploying":
        waiting = [d for d in wave if d.status == "sent"]
        if waiting and now - state.phase_started_at < state.plan.job_timeout_s:
            return state, []
        if waiting:
            state = _set_devices(state, {d.device_id: dataclasses.replace(d, status="timed_out", detail="no outcome before the timeout")
                                         for d in waiting})
            wave = state.in_wave(state.wave)
        failed = [d for d in wave if d.status in FAILED]
        if len(failed) / len(wave) > state.plan.max_failures:
            return _start_rollback(state, now, f"wave {state.wave}: {len(failed)}/{len(wave)} updates failed "
                                               f"({', '.join(d.device_id for d in failed)})")
        return _with(state, now, "soaking", f"wave {state.wave}: {len(wave) - len(failed)}/{len(wave)} updated",
                     phase="soaking", phase_started_at=now, soak_extended_s=0.0, transit_waited_s=0.0), []
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
    failed = [d for d in wave if d.status in FAILED]
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
        if not in_window(state.plan.window, now):
            return _wait_window(state, now, f"wave {state.wave + 1}", phase="window", phase_started_at=now), []
        return _start_wave(state, state.wave + 1, now)
    c = state.counts()
    return _with(state, now, "completed", f"{c.get('updated', 0)} devices on {state.version}",
                 status="completed", phase=""), []


def _wait_window(state: RolloutState, now: float, what: str, **changes: object) -> RolloutState:
    """One ``window_wait`` event (not one per tick) while ``what`` waits for the maintenance window."""
    if state.events and state.events[-1].kind == "window_wait":
        return state
    return _with(state, now, "window_wait", f"{what} waits for the maintenance window {state.plan.window} UTC",
                 **changes)


def _judged(state: RolloutState, now: float, verdict: Verdict) -> tuple[RolloutState, list[Action], bool]:
    """Act on a wave's canary analysis: ``(state, actions, go on with the next wave)``."""
    label = "shadow stage" if state.phase == "shadowing" else "canary" if state.wave == 0 else f"wave {state.wave}"
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
    step = pol.step_s(state.plan.shadow_s if state.phase == "shadowing" else state.plan.soak_s)
    if verdict.transit_s > step and state.transit_waited_s + step <= pol.max_extension_s + 1e-9:
        # the devices' reports reach the fleet late (a backlog at the broker or the ingest): the data is on its
        # way, so this wait does not use up the budget for missing data; it has a budget as large of its own
        waited = state.transit_waited_s + step
        return _with(state, now, "soak_extended", f"{label}: +{step:g} s for reports in transit (they reach the "
                     f"fleet {verdict.transit_s:.0f} s after they were sent; waited {waited:g} of "
                     f"{pol.max_extension_s:g} s): {summary}", transit_waited_s=waited), [], False
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
    status = "running" if state.phase else "scheduled" if state.start_at is not None and now < state.start_at \
        else "pending"
    accepted = state.wave if state.held else state.accepted_wave  # resuming a hold accepts the wave
    return _with(state, now, "resumed", status=status, paused_at=None, phase_started_at=started, held=False,
                 accepted_wave=accepted, reason="" if state.held else state.reason)


def abort(state: RolloutState, now: float, reason: str = "aborted by operator") -> RolloutState:
    """Stop for good; updated devices keep the new version (use :func:`rollback` to revert).
    A ``scheduled`` rollout is cancelled: it never starts."""
    _require_live(state, "abort")
    if state.status == "scheduled" and state.start_at is not None:
        reason = f"{reason}: cancelled before its start time {iso_utc(state.start_at)}"
    return _with(state, now, "aborted", reason, status="aborted", phase="", reason=reason)


def rollback(state: RolloutState, now: float, reason: str = "rolled back by operator") -> tuple[RolloutState, list[Action]]:
    """Roll every updated device back to its previous version (also after completion)."""
    if state.status in ("rolled_back", "rolling_back"):
        return state, []
    return _start_rollback(state, now, reason)
