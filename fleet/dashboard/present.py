"""How values read on the pages: versions, counts, byte sizes, the candidate gate as rows.

Pure functions, shared by the Jinja filters (:mod:`.views`) and the page data (:mod:`.data`),
so the JSON twins carry the same readable rows the HTML shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["version", "count", "human_bytes", "gate_rows", "gate_value", "NO_MODEL"]

NO_MODEL = "—"


def version(v: Any) -> str:
    """``"2"`` -> ``"v2"``; no version (None, "", "None", "unknown") -> ``"—"``."""
    if v is None:
        return NO_MODEL
    s = str(v).strip()
    if not s or s.lower() in ("none", "null", "unknown"):
        return NO_MODEL
    return s if s.startswith("v") else f"v{s}"


def count(v: Any) -> str:
    """A count as an integer (``8.0`` -> ``"8"``); ``"—"`` when missing or not a number."""
    if v is None or isinstance(v, bool):
        return "—" if v is None else str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{round(f):,}" if math.isfinite(f) else "—"


def human_bytes(v: Any) -> str:
    """``90000`` -> ``"87.9 KB"`` (binary units, 1 KB = 1024 B); ``"—"`` when missing."""
    try:
        n = float(v)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(n) or n < 0:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def gate_value(v: Any) -> str:
    """A gate cell: an accuracy in [0, 1] as a percentage, a count as an integer, else 3 digits."""
    f = _f(v)
    if f is None:
        return "—"
    if 0.0 <= f <= 1.0 and not (f == 1.0 and isinstance(v, int)):
        return f"{100 * f:.1f}%"
    return count(f) if f.is_integer() else f"{f:.3f}"


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _row(metric: str, current: Any, candidate: Any, *, budget: str, ok: bool | None,
         change: float | None) -> dict[str, Any]:
    return {"metric": metric, "current": _f(current), "candidate": _f(candidate), "change": change,
            "budget": budget, "verdict": "—" if ok is None else ("pass" if ok else "fail")}


def gate_rows(gate: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The candidate gate (``fleet/retrain.py``'s ``metrics.gate``) as table rows.

    Each row: metric, ``current`` (the model in service), ``candidate``, ``change``
    (candidate - current), ``budget`` (what the gate requires) and ``verdict``.  Keys of
    another shape (``X_current`` / ``X_candidate`` pairs, or plain numbers) still get a row
    each, so nothing a gate records is hidden.
    """
    if not gate:
        return []
    g = dict(gate)
    rows: list[dict[str, Any]] = []
    hold_cur, hold_new = _f(g.pop("holdout_current", None)), _f(g.pop("holdout_candidate", None))
    test_cur, test_new = _f(g.pop("test_current", None)), _f(g.pop("test_candidate", None))
    min_imp, max_drop = _f(g.pop("min_improvement", None)), _f(g.pop("max_original_drop", None))
    if hold_cur is not None and hold_new is not None:
        gain = hold_new - hold_cur
        rows.append(_row(f"held-out drift accuracy (n={count(g.pop('n_holdout', None))})", hold_cur, hold_new,
                         change=gain, budget=f"gain ≥ {100 * min_imp:+.1f} pt" if min_imp is not None else "—",
                         ok=None if min_imp is None else gain >= min_imp - 1e-12))
    if test_cur is not None and test_new is not None:
        change = test_new - test_cur
        rows.append(_row("original test accuracy", test_cur, test_new, change=change,
                         budget=f"drop ≤ {100 * max_drop:.1f} pt" if max_drop is not None else "—",
                         ok=None if max_drop is None else -change <= max_drop + 1e-12))
    passed = g.pop("passed", None)
    for key in sorted(g):  # X_current / X_candidate, or current_X / candidate_X: one row per pair
        if key not in g:
            continue
        if key.endswith("_current"):
            stem, other = key[: -len("_current")], f"{key[: -len('_current')]}_candidate"
        elif key.startswith("current_"):
            stem, other = key[len("current_"):], f"candidate_{key[len('current_'):]}"
        else:
            continue
        if other in g:
            cur, new = _f(g.pop(key)), _f(g.pop(other))
            rows.append(_row(stem.replace("_", " "), cur, new, budget="—", ok=None,
                             change=None if cur is None or new is None else new - cur))
    for key in sorted(g):
        value = g[key]
        if isinstance(value, str):
            rows.append(_row(f"{key.replace('_', ' ')}: {value}", None, None, budget="—", ok=None, change=None))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(_row(key.replace("_", " "), None, value, budget="—", ok=None, change=None))
    if passed is not None:
        rows.append({"metric": "overall", "current": None, "candidate": None, "change": None,
                     "budget": "every row passes", "verdict": "pass" if passed else "fail"})
    return rows
