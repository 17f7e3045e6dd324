"""Benchmark results: JSON document, markdown table, PNG plots, and cell-by-cell comparison."""

from __future__ import annotations

import json
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


def markdown_table(result: dict[str, Any]) -> str:
    head = ("| variant | runtime | threads | batch | p50 ms | p90 ms | p99 ms | items/s | load ms "
            "| peak RSS MB | size KB | accuracy |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows(result):
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['threads']} | – | error: {r['error']} |||||||| ")
            continue
        acc = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "–"
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['threads']} | {r['batch']} | {_fmt(r.get('p50_ms'), 3)} "
            f"| {_fmt(r.get('p90_ms'), 3)} | {_fmt(r.get('p99_ms'), 3)} | {_fmt(r.get('throughput_per_s'), 0)} "
            f"| {_fmt(r.get('load_ms'), 1)} | {_fmt(r.get('peak_rss_mb'), 1)} | {r['size_bytes'] / 1024:.1f} | {acc} |")
    sysinfo = result.get("system", {})
    lines.append("")
    lines.append(f"Machine: {sysinfo.get('cpu')} ({sysinfo.get('cores')} cores; flags {', '.join(sysinfo.get('cpu_flags', []))}); "
                 f"versions: {', '.join(f'{k} {v}' for k, v in sysinfo.get('versions', {}).items())}.")
    lines.append(f"Command: `{sysinfo.get('command', '')}`")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Latency vs accuracy (batch 1, one thread) with the Pareto front; file size bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    pts = [r for r in rows(result) if r.get("batch") == 1 and r["threads"] == min(c["threads"] for c in result["cells"])
           and r.get("accuracy") is not None and r.get("p50_ms") is not None]
    if pts:
        xy = [(r["p50_ms"], 100 * r["accuracy"]) for r in pts]
        front = pareto_front(xy)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r, (x, y) in zip(pts, xy, strict=True):
            ax.scatter(x, y, s=40)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fx = sorted(xy[i] for i in front)
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("p50 latency, batch 1, 1 thread (ms)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Latency vs accuracy")
        ax.legend()
        fig.tight_layout()
        p = out_dir / "latency_vs_accuracy.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    sizes: dict[str, int] = {}
    for c in result.get("cells", []):
        sizes[c["entry"]["id"]] = c["entry"]["size_bytes"]
    if sizes:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(sizes)
        ax.barh(names, [sizes[n] / 1024 for n in names])
        ax.set_xlabel("file size (KiB)")
        ax.set_title("Model size per variant")
        fig.tight_layout()
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
