"""Lost commands: which unanswered rollout commands to send again, and when.

Commands can be lost on the way (a broker restarted without persistence drops the
queued ones).  :func:`resend` picks the devices that never answered their command with
any job step and sends the same command (same job id: agents ignore a job they have or
are handling) again, with a per-device back-off (:class:`ResendPolicy`), and at once
when the device reconnected after the command went out.  Pure, like :mod:`fleet.rollout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from core.errors import ConfigError

from .rollout_state import Action, Deploy, DeviceProgress, Rollback, RolloutState, set_devices, with_event

__all__ = ["ResendPolicy", "Liveness", "unanswered", "due_resends", "resend"]


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
        actions.append(Deploy(d.device_id, d.job_id, shadow=state.phase == "shadow_deploying") if d.status == "sent"
                       else Rollback(d.device_id, d.job_id, d.previous_version, state.reason))
    state = set_devices(state, {d.device_id: dataclasses.replace(d, resends=d.resends + 1, resent_at=now)
                                 for d in due})
    names = ", ".join(d.device_id for d in due[:5]) + (f" and {len(due) - 5} more" if len(due) > 5 else "")
    return with_event(state, now, "resent", f"{len(due)} unanswered commands: {names}"), actions
