"""When to retrain: the trigger policy as pure logic (no clock, no database).

The fleet worker asks :func:`decide` every ``check_interval_s`` seconds with a
:class:`FleetSnapshot` it read from the registry; the answer says whether to start a
retraining job and why.  Two independent reasons, either one is enough:

* **persistent drift** – at least ``alarm_devices`` devices are alarmed *persistently*:
  their last ``alarm_reports`` drift reports all raised the alarm, or their alarm has
  been on without a break for at least ``alarm_persist_s`` seconds.  One noisy window
  is not a reason to spend a training run.
* **enough labels** – at least ``min_labelled_samples`` labelled drift samples arrived
  since the model in service was made (KubeEdge Sedna's incremental-learning trigger
  uses the same shape of rule: a sample count checked on a period).

Neither fires inside the ``cooldown_s`` after the previous job, nor while one runs.
Everything takes ``now`` as an argument, so the tests drive it with a fake clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError

__all__ = [
    "RetrainPolicyConfig",
    "GatePolicy",
    "policy_from_fleet_config",
    "DriftPoint",
    "FleetSnapshot",
    "Decision",
    "persistently_alarmed",
    "decide",
    "check_due",
]

POLICY_SCHEMA_VERSION = 1


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"[retrain] {name} = {value!r} must be {'>= 0' if allow_zero else '> 0'}",
                          hint=f"fix {name} in the [retrain] table of fleet.toml", key=name)


@dataclass(frozen=True)
class GatePolicy:
    """What a retrained candidate must show before it may replace the model in service.

    Margins are accuracy fractions (0.02 = 2 points), as in fleet.toml's ``[gate]``.
    """

    holdout_fraction: float = 0.3  # share of the labelled drift samples kept for the comparison
    min_improvement: float = 0.02  # candidate - current on held-out drift samples, at least
    max_original_drop: float = 0.01  # current - candidate on the original test split, at most
    min_holdout: int = 20  # fewer held-out samples cannot show an improvement
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"[retrain.gate] holdout_fraction = {self.holdout_fraction} must be in (0, 1)",
                              hint="e.g. 0.3", key="holdout_fraction")
        if not -1.0 <= self.min_improvement <= 1.0:
            raise ConfigError(f"[gate] min_improvement = {self.min_improvement} must be a fraction in [-1, 1]",
                              hint="e.g. 0.02 for two points", key="min_improvement")
        if not 0.0 <= self.max_original_drop <= 1.0:
            raise ConfigError(f"[gate] max_original_drop = {self.max_original_drop} must be a fraction in [0, 1]",
                              hint="e.g. 0.01 for one point", key="max_original_drop")
        _positive("gate.min_holdout", self.min_holdout)


@dataclass(frozen=True)
class RetrainPolicyConfig:
    """The whole retraining policy: trigger, fine-tuning and gate.

    ``fleet.toml`` spells it as ``[trigger]`` and ``[gate]`` (see :mod:`fleet.config`);
    :func:`policy_from_fleet_config` maps those tables onto this class.
    """

    enabled: bool = True
    check_interval_s: float = 60.0
    min_labelled_samples: int = 500
    alarm_devices: int = 3  # k
    alarm_reports: int = 3  # m consecutive alarmed reports make an alarm persistent...
    alarm_persist_s: float = 600.0  # ...or an alarm held without a break this long (0: off)
    min_labels_for_drift: int = 50  # a drift trigger still needs labels to learn from
    cooldown_s: float = 3600.0
    fine_tune_epochs: int = 4
    fine_tune_lr: float | None = None  # None: the parent run's learning rate / 3
    auto_rollout: bool = True
    gate: GatePolicy = field(default_factory=GatePolicy)
    schema_version: int = POLICY_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.gate, Mapping):
            object.__setattr__(self, "gate", GatePolicy(**self.gate))
        _positive("check_interval_s", self.check_interval_s)
        _positive("min_labelled_samples", self.min_labelled_samples)
        _positive("alarm_devices", self.alarm_devices)
        _positive("alarm_reports", self.alarm_reports)
        _positive("alarm_persist_s", self.alarm_persist_s, allow_zero=True)
        _positive("cooldown_s", self.cooldown_s, allow_zero=True)
        _positive("min_labels_for_drift", self.min_labels_for_drift, allow_zero=True)
        _positive("fine_tune_epochs", self.fine_tune_epochs)
        if self.fine_tune_lr is not None:
            _positive("fine_tune_lr", self.fine_tune_lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrainPolicyConfig:
        """Build from a parsed TOML table; unknown keys are a :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown keys in [retrain]: {sorted(unknown)}",
                              hint=f"known keys: {', '.join(sorted(names))}")
        d = dict(data)
        if "gate" in d:
            gate = dict(d["gate"])
            gnames = {f.name for f in dataclasses.fields(GatePolicy)}
            if set(gate) - gnames:
                raise ConfigError(f"unknown keys in [retrain.gate]: {sorted(set(gate) - gnames)}",
                                  hint=f"known keys: {', '.join(sorted(gnames))}")
            d["gate"] = GatePolicy(**gate)
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"invalid [retrain] table: {exc}") from exc


@dataclass(frozen=True)
class DriftPoint:
    """One drift report as the policy sees it."""

    ts: float
    alarm: bool


@dataclass(frozen=True)
class FleetSnapshot:
    """What the policy needs from the registry at time ``now``.

    ``reports`` holds, per device, its drift reports since the model in service went
    out (oldest first); the caller drops older ones so that alarms raised against a
    replaced model do not count.
    """

    now: float
    reports: Mapping[str, Sequence[DriftPoint]]
    labelled_since_model: int
    last_job_at: float | None = None  # start of the previous retraining job
    job_running: bool = False
    # labelled samples from the alarmed devices captured since their alarm went on (None: use
    # labelled_since_model); what a drift trigger has to learn the new conditions from
    labelled_during_alarm: int | None = None


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str
    trigger: str | None = None  # "drift" | "labels" | None
    alarmed_devices: tuple[str, ...] = ()
    labelled: int = 0


def persistently_alarmed(points: Sequence[DriftPoint], now: float, cfg: RetrainPolicyConfig) -> bool:
    """True when the device's alarm persists: the last m reports alarmed, or on for T seconds."""
    if not points or not points[-1].alarm:
        return False
    tail = points[-cfg.alarm_reports:]
    if len(tail) >= cfg.alarm_reports and all(p.alarm for p in tail):
        return True
    if cfg.alarm_persist_s > 0:
        # Walk back to where the current unbroken run of alarms started.
        start = points[-1].ts
        for p in reversed(points):
            if not p.alarm:
                break
            start = p.ts
        return now - start >= cfg.alarm_persist_s
    return False


def check_due(last_check_at: float | None, now: float, cfg: RetrainPolicyConfig) -> bool:
    """Whether the periodic check should run at ``now``."""
    return last_check_at is None or now - last_check_at >= cfg.check_interval_s


def decide(cfg: RetrainPolicyConfig, snap: FleetSnapshot) -> Decision:
    """Apply the policy to one snapshot."""
    alarmed = tuple(sorted(d for d, pts in snap.reports.items() if persistently_alarmed(pts, snap.now, cfg)))
    base = {"alarmed_devices": alarmed, "labelled": snap.labelled_since_model}
    if not cfg.enabled:
        return Decision(False, "retraining is disabled", **base)
    if snap.job_running:
        return Decision(False, "a retraining job is already running", **base)
    if snap.last_job_at is not None and snap.now - snap.last_job_at < cfg.cooldown_s:
        left = cfg.cooldown_s - (snap.now - snap.last_job_at)
        return Decision(False, f"cool-down: {left:.0f} s left", **base)
    drift_labels = snap.labelled_since_model if snap.labelled_during_alarm is None else snap.labelled_during_alarm
    if len(alarmed) >= cfg.alarm_devices and drift_labels >= cfg.min_labels_for_drift:
        return Decision(True, f"drift alarm persists on {len(alarmed)} devices (>= {cfg.alarm_devices})",
                        trigger="drift", **base)
    if snap.labelled_since_model >= cfg.min_labelled_samples:
        return Decision(True, f"{snap.labelled_since_model} labelled drift samples (>= {cfg.min_labelled_samples})",
                        trigger="labels", **base)
    if len(alarmed) >= cfg.alarm_devices:
        return Decision(False, f"drift alarm persists on {len(alarmed)} devices but only "
                               f"{drift_labels}/{cfg.min_labels_for_drift} labelled samples from them", **base)
    return Decision(False, f"{len(alarmed)}/{cfg.alarm_devices} devices persistently alarmed, "
                           f"{snap.labelled_since_model}/{cfg.min_labelled_samples} labelled samples", **base)


def policy_from_fleet_config(cfg: Any) -> RetrainPolicyConfig:
    """Map a :class:`fleet.config.FleetConfig`'s ``[trigger]``/``[gate]``/``[rollout]`` onto the policy.

    Keys the core config does not (yet) carry keep this module's defaults; extra keys
    are read with ``getattr`` so that adding them there needs no change here.
    """
    t, g = cfg.trigger, cfg.gate
    gate = GatePolicy(
        holdout_fraction=g.holdout_fraction,
        min_improvement=g.min_improvement,
        max_original_drop=g.max_original_drop,
        min_holdout=getattr(g, "min_holdout", GatePolicy.min_holdout),
        seed=getattr(g, "seed", GatePolicy.seed),
    )
    d = RetrainPolicyConfig()
    return RetrainPolicyConfig(
        enabled=t.enabled,
        check_interval_s=t.check_interval_s or d.check_interval_s,
        min_labelled_samples=t.labelled_samples,
        alarm_devices=t.alarm_devices,
        alarm_reports=getattr(t, "alarm_reports", d.alarm_reports),
        alarm_persist_s=t.alarm_persist_s,
        min_labels_for_drift=getattr(t, "min_labels_for_drift", d.min_labels_for_drift),
        cooldown_s=t.cooldown_s,
        fine_tune_epochs=getattr(t, "fine_tune_epochs", d.fine_tune_epochs),
        auto_rollout=cfg.rollout.auto,
        gate=gate,
    )
