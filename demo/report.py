"""The demo's report: key figures, the canary's evidence, drift alarms after the rollout, a
timeline, accuracy and drift per device group, as markdown, JSON and PNGs (:mod:`demo.plots`).

``report.json`` holds the figures; ``series.json`` the raw series (every prediction and
drift window) so that :func:`load_result` can rebuild a :class:`DemoResult` and the plots
can be drawn again without running the demo.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from core.cliutil import to_jsonable

__all__ = ["Event", "Observation", "DriftPoint", "DemoResult", "ALARM_BUDGET", "alarm_rate", "binned",
           "write_report", "load_result"]

RECOVERY_MARGIN_PP = 1.0  # the shifted cameras' recovered accuracy may be at most this far below pre-drift
ALARM_BUDGET = 0.01  # share of drift windows in alarm the baseline is calibrated for on clean data


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the demo started
    kind: str  # the demo's steps; "rollout.<kind>" for the rollout's own events (per wave)
    text: str


@dataclass(frozen=True)
class Observation:
    """One prediction a simulated camera got back, with the truth the demo knows."""

    t: float
    device: str
    group: str  # "shifted" | "clean"
    correct: bool
    version: str | None
    phase: str


@dataclass(frozen=True)
class DriftPoint:
    """One drift window a device reported (``t``: when the fleet received it)."""

    t: float
    device: str
    group: str
    risk: float
    alarm: bool
    version: str | None = None
    threshold: float | None = None  # the risk threshold of the device's baseline


def alarm_rate(points: Sequence[DriftPoint], *, group: str | None = None, version: str | None = None,
               since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """Windows in alarm / windows observed among ``points`` that match, with a 95 % Wilson interval."""
    from fleet.canary_stats import wilson

    sel = [p for p in points if (group is None or p.group == group) and (version is None or p.version == version)
           and (since is None or p.t >= since) and (until is None or p.t < until)]
    n, k = len(sel), sum(bool(p.alarm) for p in sel)
    lo, hi = wilson(k, n)
    return {"windows": n, "alarmed": k, "rate": k / n if n else None, "ci95": [lo, hi],
            "devices": sorted({p.device for p in sel})}


@dataclass
class DemoResult:
    """Everything the demo measured; ``closed`` says whether the loop closed."""

    closed: bool
    reason: str
    devices: dict[str, str]  # device -> group
    broker: str
    seconds: float
    accuracy: dict[str, dict[str, float]]  # phase -> group -> accuracy
    counts: dict[str, dict[str, int]]  # phase -> group -> predictions
    versions: dict[str, str | None]  # device -> final version
    events: list[Event] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    drift: list[DriftPoint] = field(default_factory=list)
    retrain: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)  # incl. "verdicts": the canary analysis per wave
    dashboard_url: str | None = None  # live while the demo ran
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON form (``--json``, ``report.json``) without the raw series."""
        d = to_jsonable({k: v for k, v in self.__dict__.items() if k not in ("observations", "drift")})
        d["recovery_gap_pp"] = self.recovery_gap_pp
        d["recovered_minus_baseline_pp"] = self.recovered_minus_baseline_pp
        d["recovery_gap_ci_pp"] = self.recovery_gap_ci_pp
        d["drift_alarms"] = to_jsonable(self.drift_alarms)
        d["key_figures"] = to_jsonable(self.key_figures)
        return d

    def first(self, kind: str) -> float | None:
        """Time of the first event of ``kind`` (None if it never happened)."""
        return next((e.t for e in sorted(self.events, key=lambda e: e.t) if e.kind == kind), None)

    @property
    def recovered_minus_baseline_pp(self) -> float | None:
        """Recovered minus pre-drift accuracy of the shifted cameras, in points (> 0: better than before)."""
        try:
            return 100.0 * (self.accuracy["recovered"]["shifted"] - self.accuracy["baseline"]["shifted"])
        except KeyError:
            return None

    @property
    def recovery_gap_pp(self) -> float | None:
        """How far the shifted cameras' recovered accuracy stays *below* their pre-drift level, in
        points: 0 when it is back at or above it; at most 1 is the target."""
        delta = self.recovered_minus_baseline_pp
        return None if delta is None else max(0.0, -delta)

    @property
    def recovery_gap_ci_pp(self) -> tuple[float, float] | None:
        return recovery_gap_ci_pp(self.accuracy, self.counts)

    @property
    def recovered_short(self) -> bool | None:
        ci = self.recovery_gap_ci_pp
        return None if ci is None else ci[0] > RECOVERY_MARGIN_PP

    @property
    def drift_alarms(self) -> dict[str, Any]:
        """Share of drift windows in alarm per stage: the clean baseline, the shifted cameras on the
        old model after the shift, and every camera on the new model after the rollout (issue 11 §2:
        the retrained model's baseline covers the shifted domain, so they should stop alarming)."""
        shift, done = self.first("shift"), self.first("rollout_done")
        old, new = self.retrain.get("parent_version"), self.retrain.get("version")
        out: dict[str, Any] = {"budget": ALARM_BUDGET,
                               "baseline": alarm_rate(self.drift, until=shift) if shift is not None else None}
        if shift is not None:
            out["drifted_shifted"] = alarm_rate(self.drift, group="shifted", version=old, since=shift)
        if done is not None and new:
            for group in ("shifted", "clean"):
                out[f"recovered_{group}"] = alarm_rate(self.drift, group=group, version=new, since=done)
            out["new_version_shifted"] = alarm_rate(self.drift, group="shifted", version=new)
            rec = out["recovered_shifted"]
            out["recovered_within_budget"] = None if rec["rate"] is None else rec["rate"] <= ALARM_BUDGET
        return out

    @property
    def key_figures(self) -> dict[str, Any]:
        """The figures a run is compared by: delays, the canary's verdict, accuracy, alarms, wall time."""
        t = self.first

        def delta(a: str, b: str) -> float | None:
            ta, tb = t(a), t(b)
            return None if ta is None or tb is None else round(tb - ta, 1)

        verdicts = self.rollout.get("verdicts") or []
        # the canary's deciding verdict: its last one (earlier ones were inconclusive and extended the soak)
        canary = next((v for v in reversed(verdicts) if v.get("wave") == 0 and v.get("mode") != "shadow"), None)
        rec = (self.drift_alarms.get("recovered_shifted") or {})
        return {
            "seconds": round(self.seconds, 1),
            "trigger_delay_s": delta("shift", "trigger"), "retrain_s": delta("trigger", "candidate"),
            "rollout_s": delta("rollout_started", "rollout_done"), "shift_to_fleet_updated_s": delta("shift", "rollout_done"),
            "canary": None if canary is None else {
                "decision": canary.get("decision"), "score": canary.get("score"), "mode": canary.get("mode"),
                "evidence": [m for m in canary.get("metrics", []) if m.get("decision") not in ("skipped",)]},
            "waves": [{"wave": w, "decision": vs[-1].get("decision"), "score": vs[-1].get("score"),
                       "mode": vs[-1].get("mode"), "verdicts": len(vs)} for w, vs in _by_wave(verdicts)],
            "accuracy_shifted": {p: self.accuracy.get(p, {}).get("shifted") for p in ("baseline", "drifted", "recovered")},
            "accuracy_clean_recovered": self.accuracy.get("recovered", {}).get("clean"),
            "recovered_alarm_rate": rec.get("rate"), "recovered_alarm_windows": [rec.get("alarmed"), rec.get("windows")],
            "adapted_domain": self.retrain.get("adapted_domain"),
        }


def recovery_gap_ci_pp(accuracy: dict[str, dict[str, float]], counts: dict[str, dict[str, int]]
                       ) -> tuple[float, float] | None:
    """95 % interval (Wald, two independent proportions) of the shifted cameras' pre-drift minus recovered
    accuracy, in points; a few hundred predictions per pass leave about +-1.5 points.  The loop did not
    close when its lower end is above ``RECOVERY_MARGIN_PP`` (one-sided 2.5 %): the shortfall is beyond
    the passes' noise."""
    try:
        p1, p2 = accuracy["baseline"]["shifted"], accuracy["recovered"]["shifted"]
        n1, n2 = counts["baseline"]["shifted"], counts["recovered"]["shifted"]
    except KeyError:
        return None
    half = 1.96 * float(np.sqrt(p1 * (1 - p1) / max(n1, 1) + p2 * (1 - p2) / max(n2, 1)))
    return 100.0 * (p1 - p2 - half), 100.0 * (p1 - p2 + half)


def binned(ts: Sequence[float], values: Sequence[float], width: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` per time bin of ``width`` seconds (bins without data left out)."""
    if not len(ts):
        return np.zeros(0), np.zeros(0)
    t, v = np.asarray(ts, float), np.asarray(values, float)
    idx = np.floor(t / width).astype(int)
    keys = np.unique(idx)
    return (keys + 0.5) * width, np.array([v[idx == k].mean() for k in keys])


# --------------------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _adapted_line(a: dict[str, Any]) -> str:
    if not a:
        return "-"
    return (f"{a.get('n')} held-out samples ({a.get('source')}; {a.get('n_drifted')} of {a.get('n_holdout')} "
            "were captured while their camera was drifted)")


def _rate(r: dict[str, Any] | None) -> str:
    if not r or not r.get("windows"):
        return "no windows"
    lo, hi = r["ci95"]
    return f"{_pct(r['rate'])} ({r['alarmed']}/{r['windows']} windows; 95 % interval {_pct(lo)}–{_pct(hi)})"


def _recovery_line(result: DemoResult) -> str:
    delta = result.recovered_minus_baseline_pp
    if delta is None:
        return "Recovery of the shifted cameras: not measured."
    acc = result.accuracy
    where = (f"{delta:.2f} points above" if delta > 0 else f"{-delta:.2f} points below" if delta < 0
             else "exactly at")
    return (f"Shifted cameras: {_pct(acc['baseline']['shifted'])} before the drift, "
            f"{_pct(acc['recovered']['shifted'])} recovered — {where} their pre-drift accuracy "
            f"(target: at most {RECOVERY_MARGIN_PP:g} point below; recovery gap {result.recovery_gap_pp:.2f} points, "
            f"95 % interval of pre-drift minus recovered {_interval(result.recovery_gap_ci_pp)} points).")


def _interval(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _key_lines(result: DemoResult) -> list[str]:
    k = result.key_figures

    def s(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f} s"

    canary = k["canary"]
    verdict = "—" if canary is None else f"{canary['decision']} (score {canary['score']}, {canary['mode']})"
    return ["## Key figures", "",
            "| figure | value |", "|---|---|",
            f"| trigger delay (shift → retraining triggered) | {s(k['trigger_delay_s'])} |",
            f"| retraining job (trigger → candidate) | {s(k['retrain_s'])} |",
            f"| rollout (start → every camera updated) | {s(k['rollout_s'])} |",
            f"| shift → fleet updated | {s(k['shift_to_fleet_updated_s'])} |",
            f"| canary verdict | {verdict} |",
            "| every wave's deciding verdict (verdicts) | "
            + ", ".join(f"{'canary' if w['wave'] == '0' else w['wave'] if w['wave'] == 'shadow' else 'wave ' + w['wave']}"
                        f" {w['decision']} ({w['verdicts']})" for w in k["waves"]) + " |",
            "| shifted cameras: baseline → drifted → recovered | "
            + " → ".join(_pct(k["accuracy_shifted"][p]) for p in ("baseline", "drifted", "recovered")) + " |",
            f"| clean cameras recovered | {_pct(k['accuracy_clean_recovered'])} |",
            f"| recovered cameras' drift alarms | {_rate(result.drift_alarms.get('recovered_shifted'))} |",
            f"| wall time | {s(k['seconds'])} |", ""]


def _by_wave(verdicts: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Verdicts grouped per stage (``shadow`` or the wave number), in order; the last of each decided."""
    out: dict[str, list[dict[str, Any]]] = {}
    for v in verdicts:
        out.setdefault("shadow" if v.get("mode") == "shadow" else str(v.get("wave")), []).append(v)
    return list(out.items())


def _verdict_lines(verdicts: Sequence[dict[str, Any]]) -> list[str]:
    if not verdicts:
        return []
    lines = ["## Canary analysis", "",
             "Each wave's devices against a control group still on the old model over the same window "
             "(docs/fleet.md); per wave its deciding (last) verdict, after any soak extensions.", ""]
    for wave, vs in _by_wave(verdicts):
        v = vs[-1]
        label = "shadow stage" if wave == "shadow" else "canary" if wave == "0" else f"wave {wave}"
        earlier = Counter(x.get("decision") for x in vs[:-1])
        if earlier:
            lines += [f"{label}: {len(vs) - 1} earlier verdict{'s' if len(vs) > 2 else ''} extended the soak "
                      f"({', '.join(f'{n} {d}' for d, n in earlier.items())}; {v.get('extended_s', 0):g} s in all).", ""]
        lines += [f"**{label}: {v.get('decision')}**, score {v.get('score')}, mode {v.get('mode')}: "
                  f"{', '.join(v.get('canary', []))} vs {', '.join(v.get('control', [])) or 'no control'}"
                  + (f" ({'; '.join(v['notes'])})" if v.get("notes") else ""), "",
                  "| metric | canary | control | statistic | p-value | 95 % interval | effect | decision |",
                  "|---|---|---|---|---:|---|---|---|"]
        for m in v.get("metrics", []):
            p = "—" if m.get("p_value") is None else f"{m['p_value']:.3g}"
            ci = "—" if not m.get("interval") else f"[{m['interval'][0]:.3g}, {m['interval'][1]:.3g}]"
            note = f" ({m['note']})" if m.get("note") else ""
            lines.append(f"| {m['metric']} | {m['canary']} | {m['control']} | {m.get('statistic') or '—'} | {p} "
                         f"| {ci} | {m.get('effect') or '—'} | {m['decision']}{note} |")
        lines.append("")
    return lines


def _alarm_lines(result: DemoResult) -> list[str]:
    a = result.drift_alarms
    rows = [("clean data, before the shift (every camera, old model)", a.get("baseline")),
            ("shifted cameras, old model, after the shift", a.get("drifted_shifted")),
            ("**shifted cameras, new model, after the rollout**", a.get("recovered_shifted")),
            ("clean cameras, new model, after the rollout", a.get("recovered_clean")),
            ("shifted cameras, new model, any time (incl. the rollout's soaks)", a.get("new_version_shifted"))]
    within = a.get("recovered_within_budget")
    verdict = ("not measured" if within is None else "within" if within else "over")
    return ["## Drift alarms", "",
            f"Share of drift windows in alarm (budget on clean data: {_pct(a['budget'])} of windows). The retrained "
            "model's baseline includes the held-out shifted samples, so the shifted cameras it serves well should "
            f"stop alarming: after the rollout they are **{verdict}** the budget.", "",
            "| where | alarmed windows |", "|---|---|"] + [f"| {w} | {_rate(r)} |" for w, r in rows if r] + [
            "", "With a few dozen windows the interval is wide: 0 alarms in n windows bounds the rate below "
            "about 3.7/n at 95 %.", ""]


def write_report(result: DemoResult, out: Path) -> Path:
    """Write ``report.md``, ``report.json``, ``series.json`` and the plots into ``out``."""
    from .plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_all(result, out)
    (out / "report.json").write_text(json.dumps(result.summary(), indent=2))
    (out / "series.json").write_text(json.dumps({"observations": [list(to_jsonable(o).values()) for o in result.observations],
                                                 "drift": [list(to_jsonable(p).values()) for p in result.drift]}))
    lines = [
        "# edgeloop demo report", "",
        f"**Loop closed: {'yes' if result.closed else 'NO'}** — {result.reason}", "",
        f"{len(result.devices)} simulated cameras ({sum(g == 'shifted' for g in result.devices.values())} shifted), "
        f"broker: {result.broker}, total {result.seconds:.0f} s.", "",
        *([f"Fleet dashboard while the demo ran: <{result.dashboard_url}> (log in with the operator token "
           "printed in the timeline).", ""] if result.dashboard_url else []),
        *_key_lines(result),
        "## Accuracy per phase", "",
        "| phase | clean cameras | shifted cameras | predictions |",
        "|---|---|---|---|",
    ]
    for phase, accs in result.accuracy.items():
        n = sum(result.counts.get(phase, {}).values())
        lines.append(f"| {phase} | {_pct(accs.get('clean'))} | {_pct(accs.get('shifted'))} | {n} |")
    lines += ["", _recovery_line(result), ""]
    lines += _alarm_lines(result)
    if result.retrain:
        r = result.retrain
        lines += ["## Retraining", "",
                  f"- trigger: {r.get('trigger')} — {r.get('trigger_reason', '')}",
                  f"- candidate {r.get('version')} from {r.get('parent_version')}: **{r.get('status')}** — {r.get('reason')}",
                  f"- labelled drift samples: {r.get('n_labelled')} (train {r.get('n_train')}, held out {r.get('n_holdout')})",
                  f"- the candidate's `adapted` drift baseline: {_adapted_line(r.get('adapted_domain') or {})}",
                  f"- held-out drift accuracy: {_pct(r.get('holdout_current'))} → {_pct(r.get('holdout_candidate'))}; "
                  f"original test split: {_pct(r.get('test_current'))} → {_pct(r.get('test_candidate'))}",
                  f"- job time: {r.get('seconds', 0):.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in r.get('timings', {}).items())})",
                  ""]
    if result.rollout:
        ro = result.rollout
        lines += ["## Rollout", "", f"- {ro.get('rollout_id')}: **{ro.get('status')}**, {ro.get('waves')} waves "
                  f"(canary first) {ro.get('reason') or ''}".rstrip(), ""]
        lines += _verdict_lines(ro.get("verdicts") or [])
    lines += ["## Timeline", "", "| t (s) | event |", "|---:|---|"]
    lines += [f"| {e.t:6.1f} | {e.text.replace('|', '/')} |" for e in sorted(result.events, key=lambda e: e.t)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Settings", "", "```json", json.dumps(to_jsonable(result.settings), indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def load_result(out: Path) -> DemoResult:
    """The :class:`DemoResult` a run wrote into ``out`` (``report.json`` + ``series.json``)."""
    d = json.loads((Path(out) / "report.json").read_text())
    series = json.loads((Path(out) / "series.json").read_text())
    kept = {f.name for f in fields(DemoResult)}
    args = {k: v for k, v in d.items() if k in kept}
    args["events"] = [Event(**e) for e in d.get("events", [])]
    args["observations"] = [Observation(*row) for row in series["observations"]]
    args["drift"] = [DriftPoint(*row) for row in series["drift"]]
    return DemoResult(**args)
