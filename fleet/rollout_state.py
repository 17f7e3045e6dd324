"""The rollout's data: its plan, per-device progress, events and the state that holds them.

Frozen dataclasses only; the transitions live in :mod:`fleet.rollout` (waves, soak,
verdicts, operator commands) and :mod:`fleet.rollout_resend` (lost commands).
:class:`RolloutState` JSON round-trips with ``to_dict``/``from_dict``: the driver
persists it after every transition.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from core.errors import ConfigError, RolloutError

from .canary import CanaryPolicy

__all__ = ["ROLLOUT_SCHEMA_VERSION", "TERMINAL", "FAILED", "MAY_RUN_NEW", "RolloutPlan", "wave_sizes",
           "DeviceProgress", "RolloutEvent", "JobOutcome", "Deploy", "Rollback", "Action", "RolloutState",
           "with_event", "set_devices", "TargetSelector", "parse_target", "iso_utc",
           "parse_window", "in_window"]

ROLLOUT_SCHEMA_VERSION = 1
TERMINAL = frozenset({"completed", "aborted", "rolled_back"})
FAILED = frozenset({"failed", "timed_out", "unhealthy"})
# Devices that run, or may run, the new version: what a rollback has to revert.
MAY_RUN_NEW = frozenset({"updated", "sent", "timed_out", "unhealthy", "shadowing"})


@dataclass(frozen=True)
class RolloutPlan:
    """How to stage a rollout; fractions are of the target devices (0.1 = 10 %)."""

    canary: float = 0.10
    waves: tuple[float, ...] = (0.25, 0.5, 1.0)  # cumulative shares after the canary
    soak_s: float = 60.0
    max_failures: float = 0.05  # share of a wave that may fail
    job_timeout_s: float = 300.0  # a device that has not finished by then failed
    analysis: CanaryPolicy = field(default_factory=CanaryPolicy)
    shadow_s: float = 0.0  # > 0: the canary devices first shadow the candidate this long (not serving it)
    shadow_every: int = 0  # the shadow runs on every n-th input (0: the agent's default)
    window: str = ""  # "HH:MM-HH:MM" (UTC): waves start only inside this maintenance window ("": any time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", tuple(float(w) for w in self.waves))
        if self.window:
            parse_window(self.window)
        if isinstance(self.analysis, Mapping):
            object.__setattr__(self, "analysis", CanaryPolicy(**self.analysis))
        if not 0.0 < self.canary <= 1.0:
            raise ConfigError(f"canary {self.canary:g} must be a share in (0, 1]", hint="e.g. --canary 10%")
        if any(not 0.0 < w <= 1.0 for w in self.waves) or list(self.waves) != sorted(set(self.waves)):
            raise ConfigError(f"waves {self.waves} must be increasing shares in (0, 1]", hint="e.g. --waves 25,50,100")
        if self.soak_s < 0 or self.job_timeout_s <= 0:
            raise ConfigError("soak must be >= 0 s and the job timeout > 0 s", hint="e.g. --soak 60s")
        if self.shadow_s < 0 or self.shadow_every < 0:
            raise ConfigError("shadow must be >= 0 s, every n-th input >= 0", hint="e.g. shadow_s = 60")
        if not 0.0 <= self.max_failures < 1.0:
            raise ConfigError(f"max_failures {self.max_failures:g} must be a share in [0, 1)", hint="e.g. --max-failures 5%")


@dataclass(frozen=True)
class TargetSelector:
    """Which devices a rollout targets: every device, or those whose tags match all ``pairs``.

    ``group=cams-north`` selects the devices tagged ``group = "cams-north"``; several pairs
    (``group=cams-north,site=a``) must all match.  A tag the fleet set (``tags``) wins over
    the same key reported by the agent (``hardware``, e.g. ``group`` in its config).
    """

    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def everything(self) -> bool:
        return not self.pairs

    def matches(self, tags: Mapping[str, Any] | None, hardware: Mapping[str, Any] | None = None) -> bool:
        tags, hardware = tags or {}, hardware or {}
        for key, value in self.pairs:
            have = tags.get(key, hardware.get(key))
            if have is None or str(have) != value:
                return False
        return True

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pairs) if self.pairs else "all"


def parse_target(text: str | None) -> TargetSelector:
    """``None`` / ``""`` / ``"all"`` -> every device; ``"group=cams-north[,key=value...]"`` -> a tag selector."""
    t = (text or "").strip()
    if not t or t.lower() == "all":
        return TargetSelector()
    pairs = []
    for part in (p.strip() for p in t.split(",")):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value or not key.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"bad rollout target {text!r}", hint="all, or tag selectors like group=cams-north")
        pairs.append((key, value))
    return TargetSelector(tuple(pairs))


_WINDOW_HINT = "HH:MM-HH:MM in UTC, e.g. --window 01:00-05:00; 22:00-04:00 spans midnight"


def parse_window(text: str) -> tuple[int, int]:
    """A maintenance window ``"01:00-05:00"`` (UTC) -> its (start, end) minutes of the day;
    an end before the start spans midnight."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if m is None or int(m[1]) > 23 or int(m[3]) > 23 or int(m[2]) > 59 or int(m[4]) > 59:
        raise ConfigError(f"maintenance window {text!r} is not HH:MM-HH:MM", hint=_WINDOW_HINT)
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ConfigError(f"maintenance window {text!r} is empty", hint=_WINDOW_HINT)
    return start, end


def in_window(window: str, now: float) -> bool:
    """True when ``now`` (epoch seconds) lies in the UTC maintenance ``window`` (always, without one)."""
    if not window:
        return True
    start, end = parse_window(window)
    minute = (now % 86400.0) / 60.0
    return start <= minute < end if start < end else minute >= start or minute < end


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
    In a shadow stage: ``sent`` → ``shadowing`` (installed, not serving), then ``sent``
    again with the canary's deploy.
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
class Deploy:
    device_id: str
    job_id: str
    shadow: bool = False  # install and shadow, do not switch (the shadow stage)


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
    transit_waited_s: float = 0.0  # the current soak's extensions while that data was in transit (late, not missing)
    verdicts: tuple[dict[str, Any], ...] = ()  # every canary analysis (Verdict.to_dict + wave, ts)
    held: bool = False  # paused by on_inconclusive = "hold" (a resume accepts the wave)
    accepted_wave: int = -1  # a held wave an operator resumed: an inconclusive verdict passes
    target: str = "all"  # the devices chosen: "all" or a tag selector (TargetSelector), shown by the dashboard
    start_at: float | None = None  # a scheduled rollout (status "scheduled") sends nothing before this time

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
        """True when the current wave's soak (or the shadow stage) is over and :func:`advance` needs a verdict."""
        length = {"soaking": self.plan.soak_s, "shadowing": self.plan.shadow_s}.get(self.phase)
        return (self.status == "running" and length is not None and self.phase_started_at is not None
                and now - self.phase_started_at >= length + self.soak_extended_s + self.transit_waited_s)

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


def iso_utc(ts: float) -> str:
    """``ts`` (epoch seconds) as ISO 8601 in UTC, e.g. ``2026-12-03T02:00:00+00:00``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def with_event(state: RolloutState, now: float, kind: str, detail: str = "", **changes: Any) -> RolloutState:
    """``state`` with ``changes`` and one more event."""
    return dataclasses.replace(state, events=state.events + (RolloutEvent(now, kind, detail),), **changes)


def set_devices(state: RolloutState, updates: Mapping[str, DeviceProgress]) -> RolloutState:
    """``state`` with some devices' progress replaced (by device id)."""
    return dataclasses.replace(state, devices=tuple(updates.get(d.device_id, d) for d in state.devices))
