"""The demo report's PNGs: accuracy and drift over the whole run, and the rollout wave by wave.

Every figure keeps text off the data: phases are shaded spans named in the legend, events
sit in a lane of their own under the data with their labels staggered over several rows,
and legends stand outside the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import DemoResult, Event, binned

__all__ = ["plot_all", "phase_spans", "stagger"]

_COLORS = {"shifted": "tab:red", "clean": "tab:blue"}
_PHASES = (("baseline", "online", "shift", "#f4f4f4"), ("drifted", "shift", "rollout_started", "#e6e6f5"),
           ("rollout", "rollout_started", "rollout_done", "#fdf0c8"), ("recovered", "rollout_done", "end", "#d8efd8"))
_VERSION_COLORS = ("#9ecae1", "tab:purple", "tab:olive", "tab:cyan")
# The story's own events (labelled in the lane) and the rollout's (markers; timeline.png labels them).
_STORY = {"shift": "camera shift", "trigger": "retraining triggered", "candidate": "candidate",
          "rollout_started": "rollout started", "rollout_done": "rollout done"}
_VERDICT_COLORS = {"pass": "tab:green", "fail": "tab:red", "marginal": "tab:orange", "inconclusive": "tab:gray"}


def phase_spans(events: Sequence[Event], end: float) -> list[tuple[str, float, float, str]]:
    """``(phase, start, stop, colour)`` for each phase the run reached."""
    first: dict[str, float] = {}
    for e in sorted(events, key=lambda e: e.t):
        first.setdefault(e.kind, e.t)
    first.setdefault("online", 0.0)
    first["end"] = max(end, *first.values())
    spans = []
    for name, a, b, colour in _PHASES:
        if a in first:
            stop = first.get(b, first.get("end", end))
            if stop > first[a]:
                spans.append((name, first[a], stop, colour))
    return spans


def stagger(xs: Sequence[float], widths: Sequence[float], rows: int) -> list[int]:
    """A row for each label (sorted by ``xs``) so that labels ``[x, x + width]`` in one row do not
    overlap; when every row is taken, the row whose last label ends first."""
    ends = [-np.inf] * rows
    out = []
    for x, w in zip(xs, widths, strict=True):
        free = [r for r in range(rows) if ends[r] <= x]
        r = free[0] if free else int(np.argmin(ends))
        ends[r] = x + w
        out.append(r)
    return out


def _label_width(ax: Any, text: str, fontsize: float) -> float:
    """A label's width in data units of ``ax``'s x axis (0.6 em per character)."""
    fig_w_pt = ax.figure.get_figwidth() * 72 * ax.get_position().width
    lo, hi = ax.get_xlim()
    return (len(text) * 0.6 * fontsize + 6) * (hi - lo) / max(fig_w_pt, 1.0)


def _lane(ax: Any, items: Sequence[tuple[float, str, str]], *, rows: int = 3, fontsize: float = 7.5) -> None:
    """Events ``(t, label, colour)`` as ticks in their own axes, labels staggered over ``rows`` rows."""
    items = sorted(items)
    ax.set_ylim(0, rows + 0.2)
    ax.set_yticks([])
    for spine in ("left", "right", "top"):
        ax.spines[spine].set_visible(False)
    widths = [_label_width(ax, label, fontsize) for _, label, _ in items]
    for (t, label, colour), row in zip(items, stagger([t for t, _, _ in items], widths, rows), strict=True):
        y = rows - row - 0.5
        ax.plot([t, t], [0, y], color=colour, lw=0.8)
        ax.plot([t], [y], marker="o", ms=3.5, color=colour)
        ax.text(t, y, " " + label, va="center", ha="left", fontsize=fontsize, color=colour, clip_on=False)


def _story_items(result: DemoResult) -> list[tuple[float, str, str]]:
    items = []
    for e in result.events:
        if e.kind in _STORY:
            items.append((e.t, _STORY[e.kind], "0.2"))
    return items


def _rollout_markers(ax: Any, result: DemoResult) -> None:
    """Wave starts (grey triangles) and verdicts (coloured diamonds) on the lane's baseline."""
    starts = [e.t for e in result.events if e.kind == "rollout.wave_started"]
    if starts:
        ax.plot(starts, [0.15] * len(starts), "^", color="0.45", ms=5, label="wave started", clip_on=False)
    for v in result.rollout.get("verdicts") or []:
        t = v.get("t")
        if t is not None:
            ax.plot([t], [0.15], "D", ms=5, color=_VERDICT_COLORS.get(v.get("decision"), "0.3"), clip_on=False)


def _shade(ax: Any, result: DemoResult) -> list[Any]:
    from matplotlib.patches import Patch

    handles = []
    for name, a, b, colour in phase_spans(result.events, result.seconds):
        ax.axvspan(a, b, color=colour, alpha=0.45, lw=0)
        handles.append(Patch(color=colour, alpha=0.45, label=f"phase: {name}"))
    return handles


def _overview(result: DemoResult, title: str) -> tuple[Any, Any, Any]:
    import matplotlib.pyplot as plt

    fig, (ax, lane) = plt.subplots(2, 1, sharex=True, figsize=(10.5, 5.6), layout="constrained",
                                   gridspec_kw={"height_ratios": [3.2, 1.1]})
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # the cameras come online after training and export: the axis starts there
    start, end = result.first("online") or 0.0, max(result.seconds, 1.0)
    span = max(end - start, 1.0)
    lane.set_xlabel("seconds since the demo started" + (f" (training and export before {start:.0f} s)" if start else ""))
    lane.set_xlim(max(0.0, start - 0.02 * span), end + 0.02 * span)
    return fig, ax, lane


def _finish_overview(fig: Any, ax: Any, lane: Any, result: DemoResult, handles: list[Any], path: Path) -> Path:
    from matplotlib.lines import Line2D

    _rollout_markers(lane, result)
    _lane(lane, _story_items(result))
    extra = [Line2D([], [], ls="", marker="^", color="0.45", label="rollout wave started"),
             Line2D([], [], ls="", marker="D", color="tab:green", label="canary verdict (grey: inconclusive, red: fail)")]
    fig.legend(handles=handles + _shade(ax, result) + extra, loc="outside right upper", fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _accuracy_png(result: DemoResult, out: Path, width: float) -> Path:
    fig, ax, lane = _overview(result, "Accuracy per device group")
    handles = []
    for group in ("clean", "shifted"):
        obs = [o for o in result.observations if o.group == group]
        x, y = binned([o.t for o in obs], [float(o.correct) for o in obs], width)
        handles += ax.plot(x, 100 * y, marker=".", color=_COLORS[group], label=f"{group} cameras")
    ax.set(ylabel=f"accuracy % (per {width:.0f} s)", ylim=(0, 102))
    return _finish_overview(fig, ax, lane, result, handles, out / "accuracy.png")


def _drift_png(result: DemoResult, out: Path, width: float) -> Path:
    fig, ax, lane = _overview(result, "Drift per device group: risk score and share of windows in alarm")
    share = ax.twinx()
    handles = []
    for group in ("clean", "shifted"):
        pts = [p for p in result.drift if p.group == group]
        x, y = binned([p.t for p in pts], [p.risk for p in pts], width)
        handles += ax.plot(x, y, marker=".", color=_COLORS[group], label=f"{group}: mean risk score (left)")
        xa, ya = binned([p.t for p in pts], [float(p.alarm) for p in pts], width)
        share.fill_between(xa, 0, 100 * ya, step="mid", color=_COLORS[group], alpha=0.10, lw=0)
        handles += share.step(xa, 100 * ya, where="mid", color=_COLORS[group], ls="--", lw=1.1,
                              label=f"{group}: % of windows in alarm (right)")
    thresholds = [p.threshold for p in result.drift if p.threshold is not None]
    if thresholds:
        handles.append(ax.axhline(float(np.median(thresholds)), color="0.3", ls=":", lw=1,
                                  label="risk threshold (median)"))
    ax.set_ylabel("drift risk score (mean per bin)")
    ax.set_ylim(bottom=0)
    share.set_ylabel("share of drift windows in alarm (%)")
    share.set_ylim(0, 105)
    return _finish_overview(fig, ax, lane, result, handles, out / "drift.png")


def _segments(ts: Sequence[float], versions: Sequence[str | None]) -> list[tuple[float, float, str | None]]:
    """Runs of the same version: ``(start, stop, version)``."""
    segs: list[tuple[float, float, str | None]] = []
    for t, v in zip(ts, versions, strict=True):
        if segs and segs[-1][2] == v:
            segs[-1] = (segs[-1][0], t, v)
        else:
            segs.append((t, t, v))
    return segs


def _timeline_png(result: DemoResult, out: Path) -> Path | None:
    """The rollout, wave by wave: deploy and soak per wave with its verdict, and the version each
    camera served over time."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    started, done = result.first("rollout_started"), result.first("rollout_done")
    if started is None:
        return None
    end = (done or result.seconds) + 0.15 * ((done or result.seconds) - started) + 5
    lo = started - 0.05 * (end - started)
    waves = _waves(result)
    devices = sorted(result.devices, key=lambda d: (_wave_of(result, d), d))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10.5, 2.2 + 0.45 * (len(waves) + len(devices))),
                                      layout="constrained",
                                      gridspec_kw={"height_ratios": [max(1, len(waves)), max(1, len(devices))]})
    top.set_title(f"Rollout {result.rollout.get('rollout_id', '')} of {result.retrain.get('version', '?')}: "
                  f"{result.rollout.get('status', '?')}")
    for row, w in enumerate(waves):
        y = len(waves) - row - 1
        for key, colour in (("deploy", "0.7"), ("soak", "#9fd39f")):
            if w[key]:
                top.broken_barh([w[key]], (y - 0.3, 0.6), color=colour)
                a, d = w[key]
                if d > 0.06 * (end - lo):  # room for its length under the bar
                    top.text(a + d / 2, y - 0.34, f"{key} {d:.0f} s", ha="center", va="top", fontsize=7.5)
        for i, (t, decision, score) in enumerate(w["verdicts"]):
            last = i == len(w["verdicts"]) - 1
            top.plot([t], [y], "D", ms=7 if last else 5, color=_VERDICT_COLORS.get(decision, "0.3"))
            if last:
                label = (f"{decision}" + ("" if score is None else f" ({score:.0f})")
                         + (f" after {i} soak extension{'s' if i > 1 else ''}" if i else "")
                         + ("; went on with a warning" if w["warned"] else ""))
                right = t > lo + 0.6 * (end - lo)  # near the right edge: the label ends at the marker
                top.text(t, y + 0.32, label + " " if right else " " + label, fontsize=8, va="bottom",
                         ha="right" if right else "left")
    top.set_yticks(range(len(waves)), [w["label"] for w in reversed(waves)])
    top.set_ylim(-0.85, len(waves) - 0.1)
    marks = [(e.t, e.kind.split(".", 1)[1]) for e in result.events
             if e.kind in ("rollout.completed", "rollout.rolled_back", "rollout.rolling_back")]
    for t, kind in marks:
        for ax in (top, bottom):
            ax.axvline(t, color="tab:green" if kind == "completed" else "tab:red", lw=1.2)
        top.text(t, len(waves) - 0.15, " promoted" if kind == "completed" else " " + kind.replace("_", " "),
                 fontsize=8, va="top", color="tab:green" if kind == "completed" else "tab:red")
    versions = sorted({o.version for o in result.observations if o.version}, key=str)
    palette = {v: c for v, c in zip(versions, _VERSION_COLORS, strict=False)}
    for row, dev in enumerate(devices):
        obs = [o for o in result.observations if o.device == dev and lo <= o.t <= end]
        for a, b, v in _segments([o.t for o in obs], [o.version for o in obs]):
            bottom.broken_barh([(a, max(b - a, 0.2))], (row - 0.35, 0.7), color=palette.get(v, "0.9"))
    labels = [f"{d} ({result.devices[d]}, {_wave_label(_wave_of(result, d))})" for d in devices]
    bottom.set_yticks(range(len(devices)), labels, fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xlabel("seconds since the demo started")
    bottom.set_xlim(lo, end)
    from matplotlib.lines import Line2D

    legend = [Patch(color="0.7", label="deploying (bundle transfer, install)"),
              Patch(color="#9fd39f", label="soak (canary analysis window)")]
    legend += [Line2D([], [], ls="", marker="D", color=c, label=f"verdict: {d}") for d, c in _VERDICT_COLORS.items()]
    legend += [Patch(color=c, label=f"camera serves {v}") for v, c in palette.items()]
    fig.legend(handles=legend, loc="outside right upper", fontsize=8, frameon=False)
    path = out / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wave_label(wave: int | None) -> str:
    return "not in rollout" if wave is None else "canary" if wave == 0 else f"wave {wave}"


def _wave_of(result: DemoResult, device: str) -> int:
    for v in result.rollout.get("devices") or []:
        if v.get("device_id") == device:
            return int(v.get("wave", 99))
    return 99


def _waves(result: DemoResult) -> list[dict[str, Any]]:
    """Per wave: deploy span, soak span and its verdicts ``(t, decision, score)`` (the last one decided)."""
    waves: list[dict[str, Any]] = []
    verdicts: dict[int, list[tuple[float, str, float | None]]] = {}
    for v in result.rollout.get("verdicts") or []:
        if v.get("mode") != "shadow" and v.get("t") is not None:
            verdicts.setdefault(int(v.get("wave", -1)), []).append((v["t"], v.get("decision"), v.get("score")))
    stop_kinds = ("rollout.wave_healthy", "rollout.rolling_back", "rollout.completed", "rollout.rolled_back")
    evs = sorted((e for e in result.events if e.kind.startswith("rollout.")), key=lambda e: e.t)
    for i, e in enumerate(evs):
        if e.kind != "rollout.wave_started":
            continue
        n = len(waves)
        later = evs[i + 1:]
        soak = next((x.t for x in later if x.kind == "rollout.soaking"), None)
        stop = next((x.t for x in later if x.kind in stop_kinds), None)
        deploy_end = soak if soak is not None else stop
        waves.append({"label": _wave_label(n),
                      "deploy": None if deploy_end is None else (e.t, max(deploy_end - e.t, 0.2)),
                      "soak": None if soak is None or stop is None else (soak, max(stop - soak, 0.2)),
                      "verdicts": verdicts.get(n, []),
                      # an inconclusive/marginal wave the rollout went on with (on_inconclusive = proceed)
                      "warned": any(x.kind == "rollout.warning" for x in later
                                    if stop is None or x.t <= stop + 1e-6)})
    return waves


def plot_all(result: DemoResult, out: Path) -> list[Path]:
    """Write ``accuracy.png``, ``drift.png`` and (when a rollout started) ``timeline.png``."""
    import matplotlib

    matplotlib.use("Agg")
    width = max(2.0, result.seconds / 60)
    paths = [_accuracy_png(result, out, width), _drift_png(result, out, width)]
    timeline = _timeline_png(result, out)
    return paths + ([timeline] if timeline else [])
