"""One benchmark cell, measured in a fresh process: ``python -m benchmarks.measure < spec.json``.

A fresh process per variant and thread count gives an honest peak RSS and load time
(no other model's memory or warm caches) and keeps runtime thread pools from leaking
between cells.  The parent (``model_bench``) reads one JSON object from stdout.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .stats import LatencyStats, summarize

__all__ = ["CellSpec", "CellResult", "measure_cell", "rss_mb", "peak_rss_mb"]


@dataclass(frozen=True)
class CellSpec:
    """What to measure: one model file in one runtime at one thread count, several batch sizes."""

    path: str
    runtime: str  # "onnxruntime" | "litert" | "pytorch"
    threads: int
    batches: tuple[int, ...] = (1, 8)
    input_shape: tuple[int, ...] = ()  # (C, H, W) without batch
    warmup: int = 20
    runs: int = 200
    time_budget_s: float = 10.0  # per batch size; stops earlier than ``runs`` only past this
    min_runs: int = 30
    seed: int = 0


@dataclass(frozen=True)
class CellResult:
    spec: CellSpec
    load_ms: float
    baseline_rss_mb: float
    peak_rss_mb: float
    latency: dict[int, LatencyStats] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = {str(b): {**asdict(s), "throughput_per_s": s.throughput_per_s} for b, s in self.latency.items()}
        return d


def rss_mb() -> float:
    """Current resident set size from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's own peak RSS.

    ``VmHWM`` from /proc, because ``ru_maxrss`` of a forked child starts from its
    parent's peak and would charge the benchmark driver's memory to every cell.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _load(spec: CellSpec) -> Any:
    """Return ``run(x)`` for the cell's runtime."""
    if spec.runtime == "pytorch":
        import torch

        from train.api import load_run

        torch.set_num_threads(spec.threads)
        model = load_run(spec.path).model.eval()

        def run_torch(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        return run_torch
    from core.runtime import open_model

    backend = open_model(spec.path, threads=spec.threads)
    return backend.run


def measure_cell(spec: CellSpec) -> CellResult:
    """Load the model, then per batch size: warm up, time ``runs`` calls (or the time budget)."""
    baseline = rss_mb()
    t0 = time.perf_counter()
    run = _load(spec)
    load_ms = (time.perf_counter() - t0) * 1000.0
    rng = np.random.default_rng(spec.seed)
    latency: dict[int, LatencyStats] = {}
    for batch in spec.batches:
        x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
        for _ in range(spec.warmup):
            run(x)
        samples: list[float] = []
        deadline = time.perf_counter() + spec.time_budget_s
        while len(samples) < spec.runs:
            t = time.perf_counter()
            run(x)
            samples.append((time.perf_counter() - t) * 1000.0)
            if len(samples) >= spec.min_runs and time.perf_counter() > deadline:
                break
        latency[batch] = summarize(samples, batch=batch)
    return CellResult(spec=spec, load_ms=load_ms, baseline_rss_mb=baseline, peak_rss_mb=peak_rss_mb(), latency=latency)


def main() -> int:
    raw = json.load(sys.stdin)
    raw["batches"] = tuple(raw.get("batches", (1,)))
    raw["input_shape"] = tuple(raw["input_shape"])
    spec = CellSpec(**raw)
    try:
        result = measure_cell(spec)
    except Exception as exc:  # reported to the parent as this cell's error, not a crash of the bench
        result = CellResult(spec=spec, load_ms=0.0, baseline_rss_mb=0.0, peak_rss_mb=peak_rss_mb(),
                            error=f"{type(exc).__name__}: {exc}")
    json.dump(result.to_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
