"""What the canary judge (:mod:`fleet.canary`) reads: groups and their observations from the registry.

:func:`analyse_wave` picks the wave's control group — online devices of the same model
still on a version the wave came from, not part of the current or an earlier wave —
matched by the policy's ``match_tag`` (``group``) when any control device shares a tag
value with the wave, and gathers both groups' telemetry, drift reports and feedback
labels over the SAME window: from the moment the wave's last device finished its update
(the soak's start) to now.  Without a control device it falls back to the wave's own
devices before their update (a window as long, ending when the command went out).

:func:`analyse_shadow` reads the shadow stage: the ``shadow_*`` telemetry fields of the
shadowing devices (the candidate and the serving model on the same inputs) since the
last of them started shadowing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

from . import canary_stats as st
from . import rollout as rm
from .canary import GroupData, Verdict, judge, judge_shadow

__all__ = ["observe", "control_group", "analyse_wave", "analyse_shadow", "reports_in_transit", "TRANSIT_LOOKBACK_S"]


def observe(registry: Any, device_ids: Sequence[str], *, versions: Collection[str | None], since: float,
            until: float, label_version: str | None) -> GroupData:
    """Everything ``device_ids`` reported in ``[since, until)`` while running one of ``versions``."""
    ids = list(device_ids)
    if not ids:
        return GroupData()
    tel = [t for t in registry.telemetry(device_ids=ids, since=since, until=until) if t.model_version in versions]
    hist: dict[str, int] = {}
    hist_devices: set[str] = set()
    p50s: list[float] = []  # one per telemetry interval with inferences: the latency test's units
    first_errors: dict[str, int] = {}
    last_errors: dict[str, int] = {}
    attempts = errors = 0
    for t in tel:
        data = t.data or {}
        interval_hist = data.get("latency_hist") or {}
        for k, v in interval_hist.items():
            hist[k] = hist.get(k, 0) + int(v)
            hist_devices.add(t.device_id)
        p50 = t.latency_p50_ms if t.latency_p50_ms is not None else st.hist_median_ms(st.hist_array(interval_hist))
        if p50 is not None and t.inferences_interval:
            p50s.append(float(p50))
        interval_errors = data.get("errors_interval")
        if interval_errors is not None:
            errors += int(interval_errors)
            attempts += int(interval_errors)
        else:  # an older agent: its error counter's growth over the window
            first_errors.setdefault(t.device_id, t.errors)
            last_errors[t.device_id] = t.errors
        attempts += t.inferences_interval
    for dev, last in last_errors.items():
        grown = max(0, last - first_errors[dev])
        errors += grown
        attempts += grown
    drift = [r for r in registry.drift_reports(device_ids=ids, since=since, until=until)
             if r.model_version in versions]
    correct, total = (registry.feedback_accuracy(device_ids=ids, since=since, model_version=label_version)
                      if label_version else (0, 0))
    seen = {t.device_id for t in tel}
    return GroupData(
        devices=tuple(ids), latency_hist=hist, hist_devices=len(hist_devices), latency_p50s=tuple(p50s),
        attempts=attempts, errors=errors, feedback_n=total, feedback_correct=correct,
        drift_windows=len(drift), drift_alarms=sum(1 for r in drift if r.alarm),
        confidences=tuple(t.mean_confidence for t in tel if t.mean_confidence is not None and t.inferences_interval),
        silent=tuple(d for d in ids if d not in seen))


def control_group(registry: Any, state: rm.RolloutState, wave: Sequence[rm.DeviceProgress],
                  match_tag: str) -> tuple[list[str], set[str | None], str]:
    """``(control device ids, their versions, how they were matched)``."""
    old = {d.previous_version for d in wave if d.previous_version}
    busy = {d.device_id for d in state.devices if d.wave <= state.wave or d.status != "pending"}
    candidates = [r for r in registry.devices(online=True)
                  if r.model_version in old and r.id not in busy and r.model_name in (None, state.name)]
    if not candidates:
        return [], old, ""
    if match_tag:
        recs = registry.devices_by_id([d.device_id for d in wave])
        values = {(r.tags or {}).get(match_tag) for r in recs.values()} - {None}
        matched = [r for r in candidates if (r.tags or {}).get(match_tag) in values]
        if matched:
            return [r.id for r in matched], old, f"control matched by {match_tag}={','.join(sorted(map(str, values)))}"
        if values:
            return [r.id for r in candidates], old, f"no control device shares {match_tag}; compared with all"
    return [r.id for r in candidates], old, ""


#: how far back (device time) :func:`reports_in_transit` looks for a device's newest report
TRANSIT_LOOKBACK_S = 600.0
#: a newest report that arrived longer ago than this tells nothing about the backlog now (the device is silent)
TRANSIT_FRESH_S = 60.0


def reports_in_transit(registry: Any, device_ids: Sequence[str], now: float) -> float:
    """How late the devices' reports reach the fleet now: over the devices whose newest telemetry arrived in the
    last ``TRANSIT_FRESH_S``, the most seconds between its sending (device time) and its arrival; 0 without any.

    A backlog at the broker or the ingest (a busy machine, a device catching up after a partition) delays
    every report alike, so a soak window that looks empty may only be late; a silent device is not counted.
    """
    worst = 0.0
    for dev in device_ids:
        newest = registry.telemetry(device_ids=[dev], since=now - TRANSIT_LOOKBACK_S, limit=1)
        if newest and now - newest[-1].received <= TRANSIT_FRESH_S:
            worst = max(worst, newest[-1].received - newest[-1].ts)
    return worst


def _with_transit(verdict: Verdict, registry: Any, device_ids: Sequence[str], now: float) -> Verdict:
    if verdict.decision in ("pass", "fail"):
        return verdict
    return dataclasses.replace(verdict, transit_s=reports_in_transit(registry, device_ids, now))


def analyse_wave(registry: Any, state: rm.RolloutState, now: float) -> Verdict:
    """The canary analysis of the current wave's updated devices (with ``transit_s`` when it cannot decide)."""
    verdict, judged = _analyse_wave(registry, state, now)
    return _with_transit(verdict, registry, judged, now)


def _analyse_wave(registry: Any, state: rm.RolloutState, now: float) -> tuple[Verdict, list[str]]:
    pol = state.plan.analysis
    wave = [d for d in state.in_wave(state.wave) if d.status == "updated" and d.sent_at is not None]
    ids = [d.device_id for d in wave]
    since = max((d.done_at or d.sent_at or now) for d in wave) if wave else now
    until = now + 1e-6
    canary = observe(registry, ids, versions={state.version}, since=since, until=until, label_version=state.version)
    control_ids, old, how = control_group(registry, state, wave, pol.match_tag)
    notes = [how] if how else []
    if control_ids:
        control = observe(registry, control_ids, versions=old, since=since, until=until,
                          label_version=next(iter(old)) if len(old) == 1 else None)
        return judge(canary, control, pol, mode="control", notes=notes), ids + control_ids
    # No control group: the same devices before the update, over a window as long as the soak's.
    sent = min((d.sent_at or now) for d in wave) if wave else now
    length = max(until - since, 1.0)
    before = observe(registry, ids, versions=old, since=sent - length, until=sent,
                     label_version=next(iter(old)) if len(old) == 1 else None)
    return judge(canary, before, pol, mode="before_after", notes=notes), ids


def analyse_shadow(registry: Any, state: rm.RolloutState, now: float) -> Verdict:
    """The shadow stage's verdict: candidate vs serving model on the same inputs (:func:`judge_shadow`)."""
    devs = [d for d in state.in_wave(0) if d.status == "shadowing"]
    ids = [d.device_id for d in devs]
    since = max((d.done_at or d.sent_at or now) for d in devs) if devs else now
    tel = [t for t in registry.telemetry(device_ids=ids, since=since, until=now + 1e-6)
           if (t.data or {}).get("shadow_version") == state.version]
    cand_hist: dict[str, int] = {}
    serv_hist: dict[str, int] = {}
    cand_p50s: list[float] = []
    serv_p50s: list[float] = []
    inputs = agree = errors = compared = 0
    cand_conf: list[float] = []
    serv_conf: list[float] = []
    drifted = _drifted(registry, devs, since, now)
    for t in tel:
        data = t.data or {}
        if t.device_id not in drifted:  # agreement: only where the serving model is on its own ground
            agree += int(data.get("shadow_agree", 0))
            compared += int(data.get("shadow_inputs", 0))
        for src, dst, p50s in ((data.get("shadow_latency_hist") or {}, cand_hist, cand_p50s),
                               (data.get("shadow_serving_hist") or {}, serv_hist, serv_p50s)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + int(v)
            p50 = st.hist_median_ms(st.hist_array(src))
            if p50 is not None:
                p50s.append(p50)
        inputs += int(data.get("shadow_inputs", 0))
        errors += int(data.get("shadow_errors", 0))
        if data.get("shadow_confidence") is not None and data.get("shadow_serving_confidence") is not None:
            cand_conf.append(float(data["shadow_confidence"]))
            serv_conf.append(float(data["shadow_serving_confidence"]))
    seen = {t.device_id for t in tel}
    cost = sum(float((t.data or {}).get("shadow_cost_ms", 0.0)) for t in tel)
    served = sum(t.inferences_interval for t in tel)
    candidate = GroupData(devices=tuple(ids), latency_hist=cand_hist, hist_devices=len(seen), attempts=inputs,
                          latency_p50s=tuple(cand_p50s),
                          errors=errors, confidences=tuple(cand_conf), silent=tuple(d for d in ids if d not in seen))
    serving = GroupData(devices=tuple(ids), latency_hist=serv_hist, hist_devices=len(seen), attempts=inputs,
                        latency_p50s=tuple(serv_p50s),
                        confidences=tuple(serv_conf))
    skipped = sum(int((t.data or {}).get("shadow_skipped", 0)) for t in tel)
    notes = [f"device cost: {inputs} of {served} inputs shadowed ({skipped} skipped while busy), "
             f"{cost:.0f} ms of candidate compute"]
    verdict = judge_shadow(candidate, serving, agree, state.plan.analysis, notes=notes, compared=compared,
                           drifted=sorted(drifted))
    return _with_transit(verdict, registry, ids, now)


# how far back a shadowing device's drift reports tell whether its inputs drifted from the serving model's baseline
DRIFT_LOOKBACK_S = 120.0


def _drifted(registry: Any, devs: Sequence[rm.DeviceProgress], since: float, now: float) -> set[str]:
    """Shadowing devices whose inputs drifted from the serving model's baseline: at least half of their drift
    windows on the model they serve, over the shadow stage and the ``DRIFT_LOOKBACK_S`` before it, in alarm
    or flagged "input changed"."""
    serving = {d.device_id: d.previous_version for d in devs}
    flagged: dict[str, list[bool]] = {}
    for r in registry.drift_reports(device_ids=list(serving), since=since - DRIFT_LOOKBACK_S, until=now + 1e-6):
        if serving.get(r.device_id) in (None, r.model_version):
            flagged.setdefault(r.device_id, []).append(bool(r.alarm or r.input_shift))
    return {d for d, f in flagged.items() if f and 2 * sum(f) >= len(f)}
