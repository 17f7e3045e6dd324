"""The demo's report: a timeline, accuracy and drift per device group, as markdown and PNGs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.cliutil import to_jsonable

__all__ = ["Event", "Observation", "DriftPoint", "DemoResult", "binned", "write_report"]


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the demo started
    kind: str
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
    t: float
    device: str
    group: str
    risk: float
    alarm: bool


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
    rollout: dict[str, Any] = field(default_factory=dict)
    dashboard_url: str | None = None  # live while the demo ran
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON form (``--json``, ``report.json``) without the raw series."""
        d = to_jsonable({k: v for k, v in self.__dict__.items() if k not in ("observations", "drift")})
        d["recovery_gap_pp"] = self.recovery_gap_pp
        return d

    @property
    def recovery_gap_pp(self) -> float | None:
        """Pre-drift minus recovered accuracy of the shifted group, in points (<= 1 is the target)."""
        try:
            return 100.0 * (self.accuracy["baseline"]["shifted"] - self.accuracy["recovered"]["shifted"])
        except KeyError:
            return None


def binned(ts: Sequence[float], values: Sequence[float], width: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` per time bin of ``width`` seconds (bins without data left out)."""
    if not len(ts):
        return np.zeros(0), np.zeros(0)
    t, v = np.asarray(ts, float), np.asarray(values, float)
    idx = np.floor(t / width).astype(int)
    keys = np.unique(idx)
    return (keys + 0.5) * width, np.array([v[idx == k].mean() for k in keys])


_COLORS = {"shifted": "tab:red", "clean": "tab:blue"}
_EVENT_KINDS = ("shift", "trigger", "candidate", "rollout_started", "rollout_done")


def _mark_events(ax: Any, events: Sequence[Event]) -> None:
    for e in events:
        if e.kind in _EVENT_KINDS:
            ax.axvline(e.t, color="0.5", lw=0.8, ls="--")
            ax.text(e.t, ax.get_ylim()[1], " " + e.kind.replace("_", " "), rotation=90, va="top", ha="left",
                    fontsize=7, color="0.35")


def _plots(result: DemoResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(2.0, result.seconds / 60)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4))
    for group in ("clean", "shifted"):
        obs = [o for o in result.observations if o.group == group]
        x, y = binned([o.t for o in obs], [float(o.correct) for o in obs], width)
        ax.plot(x, 100 * y, marker=".", color=_COLORS[group], label=f"{group} cameras")
    ax.set(xlabel="seconds since start", ylabel="accuracy %", title="Accuracy per device group",
           ylim=(0, 102))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    _mark_events(ax, result.events)
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for group in ("clean", "shifted"):
        pts = [p for p in result.drift if p.group == group]
        x, y = binned([p.t for p in pts], [p.risk for p in pts], width)
        ax.plot(x, y, marker=".", color=_COLORS[group], label=f"{group} cameras (mean risk)")
        xa, ya = binned([p.t for p in pts], [float(p.alarm) for p in pts], width)
        ax.fill_between(xa, 0, ya * (max(y) if len(y) else 1), step="mid", color=_COLORS[group], alpha=0.12,
                        label=f"{group}: share alarmed")
    ax.set(xlabel="seconds since start", ylabel="drift risk score", title="Drift score per device group")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _mark_events(ax, result.events)
    fig.tight_layout()
    paths.append(out / "drift.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def write_report(result: DemoResult, out: Path) -> Path:
    """Write ``report.md``, ``report.json``, ``accuracy.png`` and ``drift.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(result, out)
    (out / "report.json").write_text(json.dumps(result.summary(), indent=2))
    gap = result.recovery_gap_pp
    lines = [
        "# edgeloop demo report",
        "",
        f"**Loop closed: {'yes' if result.closed else 'NO'}** — {result.reason}",
        "",
        f"{len(result.devices)} simulated cameras ({sum(g == 'shifted' for g in result.devices.values())} shifted), "
        f"broker: {result.broker}, total {result.seconds:.0f} s.",
        "",
        *([f"Fleet dashboard while the demo ran: <{result.dashboard_url}> (log in with the operator token "
           "printed in the timeline).", ""]
          if result.dashboard_url else []),
        "## Accuracy per phase",
        "",
        "| phase | clean cameras | shifted cameras | predictions |",
        "|---|---|---|---|",
    ]
    for phase, accs in result.accuracy.items():
        n = sum(result.counts.get(phase, {}).values())
        lines.append(f"| {phase} | {_pct(accs.get('clean'))} | {_pct(accs.get('shifted'))} | {n} |")
    lines += ["", f"Recovery gap of the shifted cameras (pre-drift minus recovered): "
                  f"{'—' if gap is None else f'{gap:+.2f} points'} (target: at most 1 point).", ""]
    if result.retrain:
        r = result.retrain
        lines += ["## Retraining", "",
                  f"- trigger: {r.get('trigger')} — {r.get('trigger_reason', '')}",
                  f"- candidate {r.get('version')} from {r.get('parent_version')}: **{r.get('status')}** — {r.get('reason')}",
                  f"- labelled drift samples: {r.get('n_labelled')} (train {r.get('n_train')}, held out {r.get('n_holdout')})",
                  f"- held-out drift accuracy: {_pct(r.get('holdout_current'))} → {_pct(r.get('holdout_candidate'))}; "
                  f"original test split: {_pct(r.get('test_current'))} → {_pct(r.get('test_candidate'))}",
                  f"- job time: {r.get('seconds', 0):.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in r.get('timings', {}).items())})",
                  ""]
    if result.rollout:
        ro = result.rollout
        lines += ["## Rollout", "", f"- {ro.get('rollout_id')}: **{ro.get('status')}**, waves {ro.get('waves')}", ""]
    lines += ["## Timeline", "", "| t (s) | event |", "|---:|---|"]
    lines += [f"| {e.t:6.1f} | {e.text} |" for e in result.events]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Settings", "", "```json", json.dumps(to_jsonable(result.settings), indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
