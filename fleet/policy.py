"""When to retrain: the trigger policy as pure logic (no clock, no database).

The fleet worker asks :func:`decide` every ``check_interval_s`` seconds with a
:class:`FleetSnapshot` it read from the registry; the answer says whether to start a
retraining job and why.  Two independent reasons, either one is enough:

* **persistent drift** – at least ``alarm_devices`` devices are alarmed *persistently*:
  their last ``alarm_reports`` drift reports all raised the alarm, or their alarm has
  been on without a break for at least ``alarm_persist_s`` seconds.  One noisy window
  is not a reason to spend a training run.
* **concept drift** – with ``concept_drift`` on, any slice (fleet, device, group, class)
  whose feedback-label error rate rose past its calibrated CUSUM threshold
  (:mod:`fleet.concept_drift`; the inputs may look unchanged, so no input-drift alarm
  would ever fire), given ``min_labels_for_drift`` labels to learn from.
* **enough labels** – at least ``min_labelled_samples`` labelled drift samples arrived
  since the model in service was made (KubeEdge Sedna's incremental-learning trigger
  uses the same shape of rule: a sample count checked on a period).

Neither fires inside the ``cooldown_s`` after the previous job, nor while one runs.
Everything takes ``now`` as an argument, so the tests drive it with a fake clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from core.configfile import check, from_mapping, knob, supported_schema
from core.configwrite import to_dict

from .concept_drift import ConceptDriftConfig

__all__ = [
    "TriggerPolicy",
    "CandidateGate",
    "GatePolicy",
    "RetrainPolicyConfig",
    "policy_from_fleet_config",
    "DriftPoint",
    "FleetSnapshot",
    "Decision",
    "persistently_alarmed",
    "decide",
    "check_due",
]

POLICY_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TriggerPolicy:
    """When to retrain: ``[trigger]`` in fleet.toml *is* this class (one schema, one set of defaults).

    ``alarm_persist_s`` is 600 s, not shorter: it exists for devices that report rarely,
    and a time shorter than a drift window would let one noisy window count as a
    persistent alarm before the next report could clear it; 600 s is about the
    ``alarm_reports`` = 3 windows the report rule asks for at a typical cadence.
    """

    enabled: bool = True
    check_interval_s: float = knob(60.0, gt=0)
    # the label-count trigger: this many labelled drift samples since the model in service
    # (``labelled_samples`` is the old fleet.toml name)
    min_labelled_samples: int = knob(500, ge=1, aliases=("labelled_samples",))
    alarm_devices: int = knob(3, ge=1)  # k devices persistently alarmed ...
    alarm_reports: int = knob(3, ge=1)  # ... m consecutive alarmed reports make an alarm persistent ...
    alarm_persist_s: float = knob(600.0, ge=0)  # ... or an alarm held without a break this long (0: off)
    min_labels_for_drift: int = knob(50, ge=0)  # a drift trigger still needs labels to learn from
    concept_drift: bool = True  # a concept-drift alarm on any slice (fleet.concept_drift) triggers retraining
    cooldown_s: float = knob(3600.0, ge=0)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class CandidateGate:
    """What a retrained candidate must show before it may replace the model in service.

    ``[acceptance]`` in fleet.toml (``[gate]`` before; the old name still loads).  Not the
    export's accuracy gate for quantized variants (:mod:`export.gate`): this one compares
    a retrained model with the model in service.  Margins are accuracy fractions (0.02 = 2 points).
    """

    holdout_fraction: float = knob(0.3, gt=0, lt=1)  # share of the labelled drift samples kept for the comparison
    min_improvement: float = knob(0.02, ge=-1, le=1)  # candidate - current on held-out drift samples, at least
    max_original_drop: float = knob(0.01, ge=0, le=1)  # current - candidate on the original test split, at most
    min_holdout: int = knob(20, ge=1)  # fewer held-out samples cannot show an improvement
    seed: int = 0

    def __post_init__(self) -> None:
        check(self)


GatePolicy = CandidateGate  # the old name (deprecated): the retrain gate is the candidate acceptance gate


@dataclass(frozen=True)
class RetrainPolicyConfig(TriggerPolicy):
    """The whole retraining policy: the trigger, fine-tuning and the candidate gate.

    ``fleet.toml`` spells it as ``[trigger]`` (:class:`TriggerPolicy`), ``[acceptance]``
    (:class:`CandidateGate`), ``[concept]`` (:class:`fleet.concept_drift.ConceptDriftConfig`) and ``[rollout].auto``; :func:`policy_from_fleet_config`
    puts them together.
    """

    fine_tune_epochs: int = knob(4, ge=1)
    fine_tune_lr: float | None = knob(None, gt=0)  # None: the parent run's learning rate / 3
    auto_rollout: bool = True
    gate: CandidateGate = knob(factory=CandidateGate)
    concept: ConceptDriftConfig = knob(factory=ConceptDriftConfig)  # fleet.toml's [concept]
    schema_version: int = knob(POLICY_SCHEMA_VERSION, check=supported_schema(POLICY_SCHEMA_VERSION))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<retrain policy>") -> RetrainPolicyConfig:
        """Build from a parsed TOML/JSON table; unknown keys are a :class:`ConfigError`."""
        return from_mapping(cls, data, source=source)


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
    # slices in concept-drift alarm for the model in service (fleet.concept_drift.with_concept_drift)
    concept_alarms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str
    trigger: str | None = None  # "drift" | "concept" | "labels" | None
    alarmed_devices: tuple[str, ...] = ()
    labelled: int = 0
    concept_alarms: tuple[str, ...] = ()


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
    concept = tuple(snap.concept_alarms) if cfg.concept_drift else ()
    base = {"alarmed_devices": alarmed, "labelled": snap.labelled_since_model, "concept_alarms": concept}
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
    if concept and snap.labelled_since_model >= cfg.min_labels_for_drift:
        shown = ", ".join(concept[:5]) + (f" and {len(concept) - 5} more" if len(concept) > 5 else "")
        return Decision(True, f"concept drift (feedback error rate up) on {shown}", trigger="concept", **base)
    if snap.labelled_since_model >= cfg.min_labelled_samples:
        return Decision(True, f"{snap.labelled_since_model} labelled drift samples (>= {cfg.min_labelled_samples})",
                        trigger="labels", **base)
    if len(alarmed) >= cfg.alarm_devices:
        return Decision(False, f"drift alarm persists on {len(alarmed)} devices but only "
                               f"{drift_labels}/{cfg.min_labels_for_drift} labelled samples from them", **base)
    return Decision(False, f"{len(alarmed)}/{cfg.alarm_devices} devices persistently alarmed, "
                           f"{snap.labelled_since_model}/{cfg.min_labelled_samples} labelled samples", **base)


def policy_from_fleet_config(cfg: Any) -> RetrainPolicyConfig:
    """The policy of a :class:`fleet.config.FleetConfig`: its ``[trigger]``, ``[acceptance]`` and ``[rollout].auto``.

    Every ``[trigger]`` field is carried over, so a field added to :class:`TriggerPolicy`
    reaches the policy with no change here.
    """
    trigger = {f.name: getattr(cfg.trigger, f.name) for f in fields(TriggerPolicy)}
    return RetrainPolicyConfig(**trigger, auto_rollout=cfg.rollout.auto, gate=cfg.acceptance,
                               concept=getattr(cfg, "concept", None) or ConceptDriftConfig())
