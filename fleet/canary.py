"""The canary judge: is a wave on the new model worse than devices still on the old one?

Pure logic, no I/O (:mod:`fleet.canary_data` gathers the observations from the
registry).  Modelled on Kayenta: the wave's devices (the *canary*) are compared with a
*control* group — devices of the same fleet still running the previous version, over the
SAME time window, matched by a tag (``group``) where possible — so load, lighting or
the time of day hit both sides alike and are not blamed on the model.  Per metric, a
test fit for its kind:

========== ============================================= ===================================
metric     data                                          test (one-sided: canary worse)
========== ============================================= ===================================
latency    per-interval latency medians (histograms     Mann-Whitney U on the interval
           show the pooled medians)                      medians, both ways (see below) +
                                                         Hodges-Lehmann ratio, bootstrap CI
errors     inference errors / attempts                   two-proportion z test
accuracy   feedback labels: wrong / labelled             two-proportion z test
drift      drift windows in alarm / windows              two-proportion z test
confidence per-interval mean top-1 confidence            Mann-Whitney U
========== ============================================= ===================================

A metric fails only when the difference is both significant (``p < alpha``) and larger
than its tolerance (a 3 % slower median on 10,000 inferences is significant and
harmless).  Latency's unit is the telemetry interval, not the inference: the inferences
of one interval share its load burst, so a group whose few intervals happened to fall
on a busy second would look significantly slower inference by inference.  And latency
must earn its pass: it passes only once the canary's interval medians are significantly
below ``max_latency_ratio`` times the control's (non-inferiority); until then it is
``insufficient`` and the soak extends, so neither a burst nor a short soak decides.  Its
fail needs ``latency_fail_alpha`` (stricter than ``alpha``: every extension is another
look) and a Hodges-Lehmann ratio (the median of all interval pairs' ratios) above
``max_latency_ratio``.  A metric with fewer samples than its minimum in either group does not vote:
a *required* one (``required``, default latency and errors) is ``insufficient`` and
keeps the verdict ``inconclusive``; so is an optional one whose data so far point the
wrong way (beyond its tolerance: a less accurate model with 12 labels waits for more);
any other optional one is ``skipped`` and the verdict names it.  The score
is the share of voting metrics that passed; a failed *critical* metric fails the wave
whatever the score.

Decisions: ``fail`` (roll back), ``pass`` (score ≥ ``pass_score``), ``marginal``
(≥ ``marginal_score``) and ``inconclusive`` (not enough data); the last two extend the
soak (see :mod:`fleet.rollout`) and then follow ``on_inconclusive``.  Without a control
group (every device targeted, a fleet of one, the last wave) the same tests compare the
wave's devices with themselves before the update, and the verdict says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.errors import ConfigError

from . import canary_stats as st

__all__ = ["CanaryPolicy", "GroupData", "MetricResult", "Verdict", "METRICS", "judge", "judge_shadow", "verdict_line"]

METRICS = ("latency", "errors", "accuracy", "drift", "confidence")
MIN_INTERVAL_MS = 1e-3  # an interval median reported as 0 ms (rounded) counts as 1 us: the test takes logs
DECISIONS = ("pass", "marginal", "inconclusive", "fail")


@dataclass(frozen=True)
class CanaryPolicy:
    """Thresholds of the canary analysis (fleet.toml ``[rollout]``, see docs/fleet.md)."""

    alpha: float = 0.05  # significance level of every one-sided test
    # latency's fail needs this (<= alpha): the judge looks again at every extension, and a bursty
    # machine gives each look a chance to look slower (benchmarks/canary_power.py)
    latency_fail_alpha: float = 0.0125
    max_latency_ratio: float = 1.5  # how many times slower the canary's interval medians may be (Hodges-Lehmann)
    max_error_increase: float = 0.02  # absolute increase of the error rate
    max_accuracy_drop: float = 0.05  # absolute drop of the accuracy on feedback labels
    max_drift_alarm_increase: float = 0.25  # absolute increase of the share of drift windows in alarm
    max_confidence_drop: float = 0.10  # drop of the mean top-1 confidence
    min_latency_samples: int = 100  # inferences per group (agents that send histograms)
    min_latency_intervals: int = 5  # telemetry intervals per group: the latency test's units
    min_inferences: int = 100  # attempts per group for the error rate
    min_feedback: int = 30  # labels per group
    min_drift_windows: int = 5  # drift reports per group
    min_confidence_intervals: int = 5  # telemetry intervals with a confidence per group
    required: tuple[str, ...] = ("latency", "errors")  # must have data to decide
    critical: tuple[str, ...] = ("latency", "errors", "accuracy")  # one failure fails the wave
    pass_score: float = 90.0
    marginal_score: float = 60.0
    max_extension_s: float = 120.0  # how much longer a soak may run while data is missing
    extension_step_s: float = 0.0  # each extension (0: the soak time, at least 1 s)
    on_inconclusive: str = "proceed"  # after the last extension: "proceed" (warn, go on) or "hold" (pause)
    match_tag: str = "group"  # device tag that pairs canary and control devices ("" = any control)
    max_shadow_disagreement: float = 0.10  # shadow stage: share of inputs answered otherwise than the serving model
    min_shadow_inputs: int = 50  # shadow stage: shadowed inputs before agreement may vote

    def __post_init__(self) -> None:
        for name in ("required", "critical"):
            value = tuple(str(m) for m in getattr(self, name))
            object.__setattr__(self, name, value)
            if any(m not in METRICS for m in value):
                raise ConfigError(f"canary {name} {value}: unknown metric", hint=f"metrics: {', '.join(METRICS)}",
                                  key=f"rollout.canary_{name}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"canary alpha {self.alpha:g} must be in (0, 0.5)", key="rollout.canary_alpha")
        if not 0 < self.latency_fail_alpha <= self.alpha:
            raise ConfigError(f"canary latency_fail_alpha {self.latency_fail_alpha:g} must be in (0, alpha]",
                              key="rollout.canary_latency_fail_alpha")
        if not 0 <= self.marginal_score <= self.pass_score <= 100:
            raise ConfigError("canary scores need 0 <= marginal <= pass <= 100", key="rollout.canary_pass_score")
        if self.on_inconclusive not in ("hold", "proceed"):
            raise ConfigError(f"on_inconclusive {self.on_inconclusive!r}", hint="use 'hold' or 'proceed'",
                              key="rollout.canary_on_inconclusive")
        if self.max_latency_ratio <= 1 or self.max_extension_s < 0 or self.extension_step_s < 0:
            raise ConfigError("canary: max_latency_ratio must be > 1 and extension times >= 0",
                              key="rollout.canary_max_latency_ratio")

    def step_s(self, soak_s: float) -> float:
        return self.extension_step_s or max(1.0, soak_s)


@dataclass(frozen=True)
class GroupData:
    """What one group of devices reported over the analysis window."""

    devices: tuple[str, ...] = ()
    latency_hist: Mapping[str, int] = field(default_factory=dict)  # summed histograms
    hist_devices: int = 0  # devices that sent histograms
    # one median per telemetry interval (every device): the latency test's units.  Inferences of
    # one interval share its load burst, so they are not independent samples; intervals are.
    latency_p50s: tuple[float, ...] = ()
    attempts: int = 0  # inferences + errors
    errors: int = 0
    feedback_n: int = 0
    feedback_correct: int = 0
    drift_windows: int = 0
    drift_alarms: int = 0
    confidences: tuple[float, ...] = ()
    silent: tuple[str, ...] = ()  # devices that sent no telemetry in the window


@dataclass(frozen=True)
class MetricResult:
    """One metric's evidence: the numbers of both groups, the test, and its decision."""

    metric: str
    decision: str  # pass | fail | insufficient (required, too few samples) | skipped (too few, or not voting here)
    canary: str
    control: str
    statistic: str = ""
    p_value: float | None = None
    interval: tuple[float, float] | None = None  # 95 % interval of the effect
    effect: str = ""
    n_canary: int = 0
    n_control: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "decision": self.decision, "canary": self.canary, "control": self.control,
                "statistic": self.statistic, "p_value": self.p_value,
                "interval": None if self.interval is None else [self.interval[0], self.interval[1]],
                "effect": self.effect, "n_canary": self.n_canary, "n_control": self.n_control, "note": self.note}

    def line(self) -> str:
        p = "" if self.p_value is None else f", p={self.p_value:.3g}"
        ci = "" if self.interval is None else f" [{self.interval[0]:.3g}, {self.interval[1]:.3g}]"
        eff = f" {self.effect}{ci}" if self.effect else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.metric} {self.decision}: {self.canary} vs {self.control}{eff}{p}{note}"


@dataclass(frozen=True)
class Verdict:
    """The canary analysis of one wave."""

    decision: str
    score: float | None
    mode: str  # "control" | "before_after" | "shadow"
    metrics: tuple[MetricResult, ...]
    canary: tuple[str, ...] = ()
    control: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # how late the judged devices' reports reach the fleet now (seconds from a report's sending to its
    # arrival; :func:`fleet.canary_data.reports_in_transit`): data that is late, not missing
    transit_s: float = 0.0

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """JSON-ready (lists, no tuples: a rollout state must equal itself after a JSON round trip)."""
        return {**extra, "decision": self.decision, "score": self.score, "mode": self.mode,
                "canary": list(self.canary), "control": list(self.control), "notes": list(self.notes),
                "metrics": [m.to_dict() for m in self.metrics], "transit_s": round(self.transit_s, 3)}

    def summary(self) -> str:
        score = "" if self.score is None else f", score {self.score:.0f}"
        against = (f"{len(self.canary)} canary vs {len(self.control)} control devices" if self.mode == "control"
                   else f"{len(self.canary)} devices shadowing: candidate vs serving model on the same inputs"
                   if self.mode == "shadow" else f"{len(self.canary)} devices before/after the update (no control group)")
        voted = "; ".join(m.line() for m in self.metrics if m.decision != "skipped")
        skipped = [f"{m.metric} ({m.n_canary} vs {m.n_control})" for m in self.metrics if m.decision == "skipped"]
        if skipped:
            voted += f"; not voting, too few samples: {', '.join(skipped)}"
        notes = "; ".join(self.notes)
        return f"{self.decision}{score} ({against}): {voted}" + (f" [{notes}]" if notes else "")


# --------------------------------------------------------------------------- per metric


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g} ms"


def _availability(metric: str, n1: int, n2: int, minimum: int, policy: CanaryPolicy,
                  worse_so_far: bool = False) -> str | None:
    """``insufficient`` / ``skipped`` when the metric may not vote (see the module docstring), else None."""
    if n1 >= minimum and n2 >= minimum:
        return None
    return "insufficient" if metric in policy.required or (worse_so_far and n1 and n2) else "skipped"


def _latency(c: GroupData, k: GroupData, pol: CanaryPolicy, *, wait: bool = True) -> MetricResult:
    """Latency, judged on per-interval medians (module docstring): ``fail`` when the canary's are
    significantly larger (at ``latency_fail_alpha``) and their Hodges-Lehmann ratio exceeds
    ``max_latency_ratio``; ``pass`` only when they are significantly below ``max_latency_ratio``
    times the control's (non-inferiority, at ``alpha``); in between the data do not settle it yet:
    ``insufficient`` while ``wait`` (more intervals come with the soak's extensions), else ``skipped``."""
    a, b = st.hist_array(c.latency_hist), st.hist_array(k.latency_hist)
    pooled = bool(a.sum() and b.sum())
    if not pooled:  # older agents: their per-interval medians are all there is
        a, b = st.samples_hist(c.latency_p50s), st.samples_hist(k.latency_p50s)
    u1 = [max(v, MIN_INTERVAL_MS) for v in c.latency_p50s]
    u2 = [max(v, MIN_INTERVAL_MS) for v in k.latency_p50s]
    n1, n2 = len(u1), len(u2)
    m1, m2 = st.hist_median_ms(a), st.hist_median_ms(b)
    base = dict(metric="latency", canary=f"median {_ms(m1)} ({n1} intervals, {int(a.sum())} inferences)",
                control=f"median {_ms(m2)} ({n2} intervals, {int(b.sum())} inferences)", n_canary=n1, n_control=n2)
    ci = st.shift_ratio_ci(u1, u2)
    ratio = ci[0] if ci else 1.0
    worse_so_far = ratio > pol.max_latency_ratio
    gap = _availability("latency", n1, n2, pol.min_latency_intervals, pol, worse_so_far) or (
        _availability("latency", int(a.sum()), int(b.sum()), pol.min_latency_samples, pol, worse_so_far)
        if pooled else None)
    if gap:
        return MetricResult(decision=gap, note=f"needs {pol.min_latency_intervals} telemetry intervals and "
                                               f"{pol.min_latency_samples} inferences per group", **base)
    log1, log2 = np.log(u1), np.log(u2)
    worse = st.mann_whitney_samples(log1, log2)
    within = st.mann_whitney_samples(log1, log2 + np.log(pol.max_latency_ratio), larger=False,
                                     event=f"canary<x{pol.max_latency_ratio:g} control")
    effect = f"x{ratio:.2f} slower (Hodges-Lehmann; fails > x{pol.max_latency_ratio:g})"
    common: dict[str, Any] = dict(interval=(ci[1], ci[2]) if ci else None, effect=effect,
                                  note="" if pooled else "from per-interval medians (no histograms)", **base)
    if worse.p_value < pol.latency_fail_alpha and ratio > pol.max_latency_ratio:
        return MetricResult(decision="fail", statistic=f"Mann-Whitney on interval medians {worse.statistic}",
                            p_value=worse.p_value, **common)
    if within.p_value < pol.alpha:
        return MetricResult(decision="pass", statistic=f"Mann-Whitney on interval medians {within.statistic}",
                            p_value=within.p_value, **common)
    common["note"] = (f"not settled: neither significantly slower (p={worse.p_value:.3g}, needs "
                      f"{pol.latency_fail_alpha:g}) nor significantly within x{pol.max_latency_ratio:g} "
                      f"(p={within.p_value:.3g}); more intervals decide")
    return MetricResult(decision="insufficient" if wait and "latency" in pol.required else "skipped",
                        statistic=f"Mann-Whitney on interval medians {worse.statistic}", p_value=worse.p_value,
                        **common)


def _rate(metric: str, bad1: int, n1: int, bad2: int, n2: int, minimum: int, tolerance: float, what: str,
          pol: CanaryPolicy, *, show_good: bool = False) -> MetricResult:
    """A "bad outcome" rate compared one-sided (canary higher), as for errors, wrong labels, alarms."""
    def show(bad: int, n: int) -> str:
        return f"{(n - bad if show_good else bad) / n:.1%} of {n}" if n else "- of 0"
    base = dict(metric=metric, canary=show(bad1, n1), control=show(bad2, n2), n_canary=n1, n_control=n2)
    worse = bool(n1 and n2 and bad1 / n1 - bad2 / n2 > tolerance)
    gap = _availability(metric, n1, n2, minimum, pol, worse)
    if gap:
        return MetricResult(decision=gap, note=f"needs {minimum} {what} per group"
                            + ("; worse so far" if worse else ""), **base)
    test, (lo, hi) = st.two_proportions(bad1, n1, bad2, n2)
    diff = bad1 / n1 - bad2 / n2
    bad = test.p_value < pol.alpha and diff > tolerance
    sign = -1 if show_good else 1  # accuracy: show the change of the good rate
    interval = (sign * hi, sign * lo) if show_good else (lo, hi)
    return MetricResult(decision="fail" if bad else "pass", statistic=f"two-proportion {test.statistic}",
                        p_value=test.p_value, interval=interval,
                        effect=f"{sign * diff:+.1%} (fails {'<' if show_good else '>'} {sign * tolerance:+.0%})",
                        **base)


def _confidence(c: GroupData, k: GroupData, pol: CanaryPolicy) -> MetricResult:
    n1, n2 = len(c.confidences), len(k.confidences)
    mean1 = float(np.mean(c.confidences)) if n1 else None
    mean2 = float(np.mean(k.confidences)) if n2 else None
    base = dict(metric="confidence", canary="-" if mean1 is None else f"mean {mean1:.3f} (n={n1})",
                control="-" if mean2 is None else f"mean {mean2:.3f} (n={n2})", n_canary=n1, n_control=n2)
    gap = _availability("confidence", n1, n2, pol.min_confidence_intervals, pol,
                        mean1 is not None and mean2 is not None and mean2 - mean1 > pol.max_confidence_drop)
    if gap:
        return MetricResult(decision=gap, note=f"needs {pol.min_confidence_intervals} intervals per group", **base)
    assert mean1 is not None and mean2 is not None
    test = st.mann_whitney_samples(c.confidences, k.confidences, larger=False)
    drop = mean2 - mean1
    bad = test.p_value < pol.alpha and drop > pol.max_confidence_drop
    return MetricResult(decision="fail" if bad else "pass", statistic=f"Mann-Whitney {test.statistic}",
                        p_value=test.p_value, effect=f"{-drop:+.3f} (fails < {-pol.max_confidence_drop:+.2f})",
                        **base)


# --------------------------------------------------------------------------- the verdict


def _decide(metrics: Sequence[MetricResult], critical: set[str], pol: CanaryPolicy,
            notes: list[str]) -> tuple[str, float | None]:
    """The decision and score over the metrics' votes (module docstring); appends why to ``notes``."""
    voting = [m for m in metrics if m.decision in ("pass", "fail")]
    score = 100.0 * sum(m.decision == "pass" for m in voting) / len(voting) if voting else None
    waiting = [m.metric for m in metrics if m.decision == "insufficient"]
    if any(m.decision == "fail" and m.metric in critical for m in metrics):
        return "fail", score  # enough data to see it is worse: no need to wait for the rest
    if waiting or score is None:
        notes.append(f"not enough data: {', '.join(waiting) or 'no metric'}")
        return "inconclusive", score
    if score >= pol.pass_score:
        return "pass", score
    return ("marginal" if score >= pol.marginal_score else "fail"), score


def judge(canary: GroupData, control: GroupData, policy: CanaryPolicy, *, mode: str = "control",
          notes: Sequence[str] = ()) -> Verdict:
    """Compare the canary group with the control group (or with itself before, ``mode="before_after"``)."""
    pol = policy
    metrics = (
        _latency(canary, control, pol, wait=mode != "before_after"),
        _rate("errors", canary.errors, canary.attempts, control.errors, control.attempts, pol.min_inferences,
              pol.max_error_increase, "inferences", pol),
        _rate("accuracy", canary.feedback_n - canary.feedback_correct, canary.feedback_n,
              control.feedback_n - control.feedback_correct, control.feedback_n, pol.min_feedback,
              pol.max_accuracy_drop, "labels", pol, show_good=True),
        _rate("drift", canary.drift_alarms, canary.drift_windows, control.drift_alarms, control.drift_windows,
              pol.min_drift_windows, pol.max_drift_alarm_increase, "drift windows", pol),
        _confidence(canary, control, pol),
    )
    all_notes = list(notes)
    if canary.silent:
        all_notes.append(f"no telemetry from {', '.join(canary.silent)}")
    if mode == "before_after":
        all_notes.insert(0, "no control group: compared with the same devices before the update")
    critical = set(pol.critical)
    if mode == "before_after":  # load and time of day change between before and after: latency alone
        critical.discard("latency")  # cannot roll back a wave that has no control group to compare with
    decision, score = _decide(metrics, critical, pol, all_notes)
    return Verdict(decision, score, mode, metrics, tuple(canary.devices), tuple(control.devices), tuple(all_notes))


def _agreement(agree: int, n: int, pol: CanaryPolicy) -> MetricResult:
    """Disagreement with the serving model on the same inputs, one-sided against its tolerance."""
    bad, tol = n - agree, pol.max_shadow_disagreement
    base = dict(metric="agreement", canary=f"{agree / n:.1%} of {n}" if n else "- of 0", control="100% (itself)",
                n_canary=n, n_control=n)
    worse = bool(n and bad / n > tol)
    if n < pol.min_shadow_inputs:
        return MetricResult(decision="insufficient", note=f"needs {pol.min_shadow_inputs} shadowed inputs"
                            + ("; worse so far" if worse else ""), **base)
    p_hat = bad / n
    z = (p_hat - tol) / max(1e-12, (tol * (1 - tol) / n) ** 0.5)
    p = st.normal_sf(z)
    lo, hi = st.wilson(bad, n)
    fail = p < pol.alpha and p_hat > tol
    return MetricResult(decision="fail" if fail else "pass", statistic=f"one-proportion z={z:.2f}", p_value=p,
                        interval=(lo, hi), effect=f"disagrees on {p_hat:.1%} (fails > {tol:.0%})", **base)


def judge_shadow(candidate: GroupData, serving: GroupData, agree: int, policy: CanaryPolicy, *,
                 notes: Sequence[str] = (), compared: int | None = None, drifted: Sequence[str] = ()) -> Verdict:
    """The shadow stage: the candidate against the serving model on the SAME inputs of the same devices.

    Errors and confidence as in :func:`judge` (the candidate as canary, the serving model
    as control); latency is compared the same way and shown, but does not vote: the device
    times the candidate on a background thread, so contention inflates it (2.25x for the
    same network in the quick demo on a loaded machine) -- the canary, served beside a
    control group, judges latency.  Plus ``agreement`` (critical): the share of shadowed inputs
    on which the candidate's top answer differs from the serving model's may not be
    significantly above ``max_shadow_disagreement``.

    Agreement is a regression check, so it is counted only where the serving model is on
    its own ground: ``agree`` of ``compared`` inputs (default: all shadowed inputs) from the
    devices whose inputs had not drifted from its baseline.  On ``drifted`` devices the
    serving model is the thing being replaced: a candidate retrained for them *should*
    answer otherwise (the quick demo's good candidate disagreed on 61 % of a shifted
    camera's inputs, where the old model was right on about 40 %).  There the other
    metrics vote, and the canary's labelled accuracy comes next.
    """
    pol = policy
    n = candidate.attempts if compared is None else compared
    agreement = _agreement(agree, n, pol)
    if drifted and n == 0:
        agreement = replace(agreement, decision="skipped", note=(
            f"not counted: the inputs of {', '.join(drifted)} drifted from the serving model's baseline, "
            "where answering otherwise is what retraining is for"))
    elif drifted:
        agreement = replace(agreement, note=f"{', '.join(drifted)} not counted (inputs drifted)")
    latency = _latency(candidate, serving, pol)
    if latency.decision in ("pass", "fail", "insufficient"):
        latency = replace(latency, decision="skipped", note=(
            f"shown, not voting ({latency.decision} as measured): the candidate runs on a background thread beside "
            "the serving path, so its wall-clock time carries the device's contention; latency votes at the canary, "
            "served, against the control group"))
    metrics = (
        agreement,
        latency,
        _rate("errors", candidate.errors, candidate.attempts, serving.errors, serving.attempts,
              pol.min_shadow_inputs, pol.max_error_increase, "shadowed inputs", pol),
        _confidence(candidate, serving, pol),
    )
    all_notes = ["shadow: the candidate beside the serving model on the same inputs, never served", *notes]
    if candidate.silent:
        all_notes.append(f"no shadow telemetry from {', '.join(candidate.silent)}")
    decision, score = _decide(metrics, {"agreement", *pol.critical}, pol, all_notes)
    return Verdict(decision, score, "shadow", metrics, tuple(candidate.devices), tuple(serving.devices),
                   tuple(all_notes))


def verdict_line(verdicts: Sequence[Mapping[str, Any]]) -> str:
    """The latest stored verdict of a rollout state in one short line (for tables)."""
    if not verdicts:
        return ""
    v = verdicts[-1]
    score = "" if v.get("score") is None else f" {v['score']:.0f}"
    failed = [m["metric"] for m in v.get("metrics", ()) if m.get("decision") in ("fail", "insufficient")]
    mode = {"before_after": " before/after", "shadow": " shadow"}.get(str(v.get("mode")), "")
    return f"w{v.get('wave', '?')} {v.get('decision')}{score}{mode}" + (f" ({', '.join(failed)})" if failed else "")
