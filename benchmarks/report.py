"""Benchmark results: JSON document, markdown table, PNG plots, and cell-by-cell comparison."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.errors import BenchmarkError

from .stats import pareto_front, ratio

__all__ = ["rows", "markdown_table", "write_report", "load_result", "compare", "compare_table", "plot"]

RESULT_SCHEMA_VERSION = 1


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten cells into one row per (variant, runtime, threads, batch)."""
    out = []
    for cell in result.get("cells", []):
        e = cell["entry"]
        base = {
            "variant": e["id"], "runtime": e["runtime"], "precision": e["precision"], "threads": cell["threads"],
            "size_bytes": e["size_bytes"], "accuracy": e.get("accuracy"), "load_ms": cell.get("load_ms"),
            "peak_rss_mb": cell.get("peak_rss_mb"), "baseline_rss_mb": cell.get("baseline_rss_mb"),
            "error": cell.get("error"),
        }
        lat = cell.get("latency") or {}
        if not lat:
            out.append({**base, "batch": None})
        for batch, s in sorted(lat.items(), key=lambda kv: int(kv[0])):
            out.append({**base, "batch": int(batch), "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"],
                        "p99_ms": s["p99_ms"], "throughput_per_s": s["throughput_per_s"], "runs": s["n"]})
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cores(result: dict[str, Any]) -> int | None:
    """The cores the benchmark could use (its affinity), else the machine's."""
    cores = result.get("cores_usable") or result.get("system", {}).get("cores")
    return int(cores) if cores else None


def markdown_table(result: dict[str, Any]) -> str:
    cores = _cores(result)
    head = ("| variant | runtime | threads | batch | p50 ms | p90 ms | p99 ms | items/s | load ms "
            "| peak RSS MB | size KB | accuracy |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows(result):
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['threads']} | – | error: {r['error']} |||||||| ")
            continue
        acc = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "–"
        threads = f"{r['threads']} (> {cores} cores)" if cores and r["threads"] > cores else r["threads"]
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {threads} | {r['batch']} | {_fmt(r.get('p50_ms'), 3)} "
            f"| {_fmt(r.get('p90_ms'), 3)} | {_fmt(r.get('p99_ms'), 3)} | {_fmt(r.get('throughput_per_s'), 0)} "
            f"| {_fmt(r.get('load_ms'), 1)} | {_fmt(r.get('peak_rss_mb'), 1)} | {r['size_bytes'] / 1024:.1f} | {acc} |")
    sysinfo = result.get("system", {})
    lines.append("")
    lines.append(f"Machine: {sysinfo.get('cpu')} ({sysinfo.get('cores')} cores; flags {', '.join(sysinfo.get('cpu_flags', []))}); "
                 f"versions: {', '.join(f'{k} {v}' for k, v in sysinfo.get('versions', {}).items())}.")
    lines.append(f"Command: `{sysinfo.get('command', '')}`")
    lines += [f"\n**Warning:** {w}" for w in result.get("warnings", [])]
    return "\n".join(lines) + "\n"


_MARKERS = "osD^vP*Xph<>"


def _front_steps(front: list[tuple[float, float]], x_max: float, y_min: float) -> tuple[list[float], list[float]]:
    """The Pareto front as a staircase: nothing to its right and below it is worth having."""
    xs, ys = [front[0][0]], [y_min]
    for (x, y), nxt in zip(front, [*front[1:], (x_max, None)], strict=True):
        xs += [x, nxt[0]]
        ys += [y, y]
    return xs, ys


def _latency_accuracy_plot(result: dict[str, Any], out_dir: Path, plt: Any) -> Path | None:
    """Latency vs accuracy at batch 1 and the fewest threads measured, with the Pareto front.

    Each variant has its own marker and colour, named in a legend outside the axes with its
    numbers (no text next to points, where close variants made the labels overlap); the
    front is a staircase with its variants filled and ringed, the dominated ones hollow.
    """
    threads = min((c["threads"] for c in result.get("cells", [])), default=1)
    pts = [r for r in rows(result) if r.get("batch") == 1 and r["threads"] == threads
           and r.get("accuracy") is not None and r.get("p50_ms") is not None]
    if not pts:
        return None
    xy = [(float(r["p50_ms"]), 100 * float(r["accuracy"])) for r in pts]
    on_front = set(pareto_front(xy))
    fig, ax = plt.subplots(figsize=(9, 4.6 + 0.22 * ((len(pts) + 2) // 2)), layout="constrained")
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    log_x = max(xs) / max(min(xs), 1e-9) > 4
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ticks = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (1, 2, 5)
                              else "")
        ax.xaxis.set_major_formatter(ticks)
        ax.xaxis.set_minor_formatter(ticks)
    span = max(ys) - min(ys)
    pad = max(0.5, 0.15 * span)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    x_hi = max(xs) * (1.6 if log_x else 1.0) + (0 if log_x else 0.15 * (max(xs) - min(xs) or max(xs)))
    x_lo = min(xs) / 1.6 if log_x else max(0.0, min(xs) - 0.15 * (max(xs) - min(xs) or min(xs)))
    ax.set_xlim(x_lo, x_hi)
    front = sorted(xy[i] for i in on_front)
    fx, fy = _front_steps(front, x_hi, ax.get_ylim()[0])
    ax.fill_between(fx, fy, ax.get_ylim()[0], color="tab:green", alpha=0.07, lw=0)
    ax.plot(fx, fy, color="tab:green", lw=2, zorder=2, label="Pareto front (filled markers; shaded: dominated)")
    colours = plt.get_cmap("tab10").colors
    for i, (r, (x, y)) in enumerate(zip(pts, xy, strict=True)):
        best = i in on_front
        colour = colours[i % len(colours)]
        ax.scatter([x], [y], s=70 if best else 55, marker=_MARKERS[i % len(_MARKERS)], zorder=3,
                   facecolors=colour if best else "white", edgecolors="black" if best else colour,
                   linewidths=1.4 if best else 1.6,
                   label=f"{r['variant']} ({r['runtime']}): {x:.3g} ms, {y:.2f} %" + (", on the front" if best else ""))
    ax.set_xlabel(f"p50 latency, batch 1, {threads} thread{'s' if threads > 1 else ''} (ms{', log scale' if log_x else ''})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Latency vs accuracy: up and to the left is better")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    p = out_dir / "latency_vs_accuracy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Latency vs accuracy (batch 1, fewest threads) with the Pareto front; file size bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    p = _latency_accuracy_plot(result, out_dir, plt)
    if p is not None:
        paths.append(p)
    sizes: dict[str, int] = {}
    for c in result.get("cells", []):
        sizes[c["entry"]["id"]] = c["entry"]["size_bytes"]
    if sizes:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(sizes)), layout="constrained")
        names = list(sizes)
        bars = ax.barh(names, [sizes[n] / 1024 for n in names])
        ax.bar_label(bars, labels=[f"{sizes[n] / 1024:,.1f} KiB" for n in names], padding=3, fontsize=8)
        ax.set_xlim(0, max(sizes.values()) / 1024 * 1.25)
        ax.set_xlabel("file size (KiB)")
        ax.set_title("Model size per variant")
        p = out_dir / "sizes.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(result: dict[str, Any], out_dir: Path, *, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"schema_version": RESULT_SCHEMA_VERSION, **result}
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(markdown_table(result))
    for i, p in enumerate(plot(result, out_dir)):
        paths[f"plot{i}"] = p
    return paths


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise BenchmarkError(f"no benchmark result at {path}", hint="run `edgeloop bench ... --out DIR` first") from exc
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not a benchmark result JSON: {exc}") from exc
    if not isinstance(data, dict) or "cells" not in data:
        raise BenchmarkError(f"{path} is not a benchmark result (no 'cells')")
    return data


_METRICS = ("p50_ms", "p99_ms", "throughput_per_s", "peak_rss_mb", "size_bytes", "accuracy")


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Cell-by-cell ratios B / A for cells present in both (keyed by variant, runtime, threads, batch)."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["variant"], r["runtime"], r["threads"], r["batch"])

    ra = {key(r): r for r in rows(a) if r.get("batch") is not None}
    out = []
    for r in rows(b):
        if r.get("batch") is None or key(r) not in ra:
            continue
        base = ra[key(r)]
        out.append({"variant": r["variant"], "runtime": r["runtime"], "threads": r["threads"], "batch": r["batch"],
                    **{f"{m}_ratio": ratio(r.get(m), base.get(m)) for m in _METRICS}})
    return out


def compare_table(ratios: Iterable[dict[str, Any]]) -> str:
    lines = ["| variant | runtime | threads | batch | p50 B/A | p99 B/A | items/s B/A | RSS B/A | size B/A |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['variant']} | {r['runtime']} | {r['threads']} | {r['batch']} | "
                     + " | ".join(_fmt(r.get(f"{m}_ratio"), 3) for m in ("p50_ms", "p99_ms", "throughput_per_s", "peak_rss_mb", "size_bytes"))
                     + " |")
    return "\n".join(lines)
