"""Counters, latency percentiles over a bounded ring, and CPU / memory from ``/proc``.

No psutil: a Raspberry Pi install has numpy, onnxruntime and paho-mqtt and nothing
else, and ``/proc/self/stat`` + ``/proc/self/statm`` say all we need.  Memory stays
bounded: the ring holds the last ``capacity`` latencies, whatever the uptime.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from core.protocol import latency_bucket

__all__ = ["LatencyRing", "ProcessSampler", "InferenceStats", "StatsSnapshot", "prometheus_text"]


class LatencyRing:
    """The last ``capacity`` latencies (ms) in a fixed numpy buffer."""

    def __init__(self, capacity: int = 1024, *, lock: threading.Lock | None = None) -> None:
        """``lock``: one the owner already holds when it calls :meth:`put` (default: the ring's own)."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0  # total ever added
        self._lock = lock if lock is not None else threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self.put(ms)

    def put(self, ms: float) -> None:
        """:meth:`add` for a caller holding the ring's lock."""
        self._buf[self._n % self._buf.size] = ms
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, self._buf.size)

    def percentiles(self, *qs: float) -> tuple[float | None, ...]:
        """Percentiles (0-100) of what the ring holds; None when empty."""
        with self._lock:
            data = self._buf[: len(self)].copy()
        if data.size == 0:
            return tuple(None for _ in qs)
        return tuple(float(v) for v in np.percentile(data, qs))


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100


class ProcessSampler:
    """CPU percent (of one core, since the last call) and resident memory of this process."""

    def __init__(self) -> None:
        self._ticks = _clock_ticks()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._last: tuple[float, float] | None = None

    def _cpu_seconds(self) -> float | None:
        try:
            with open("/proc/self/stat") as fh:
                # the command name may hold spaces: fields start after the last ')'
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
        except (OSError, IndexError, ValueError):
            t = os.times()
            return t.user + t.system

    def cpu_percent(self) -> float | None:
        """CPU used since the previous call, in percent of one core (None on the first call)."""
        cpu, wall = self._cpu_seconds(), time.monotonic()
        last, self._last = self._last, (cpu or 0.0, wall)
        if last is None or cpu is None or wall <= last[1]:
            return None
        return round(100.0 * (cpu - last[0]) / (wall - last[1]), 2)

    def memory_mb(self) -> float | None:
        """Resident set size in MiB."""
        try:
            with open("/proc/self/statm") as fh:
                rss_pages = int(fh.read().split()[1])
            return round(rss_pages * self._page / (1024 * 1024), 2)
        except (OSError, IndexError, ValueError):
            try:
                import resource

                return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 2)
            except (ImportError, OSError):
                return None


@dataclass(frozen=True)
class StatsSnapshot:
    inferences: int
    inferences_interval: int
    errors: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    mean_confidence: float | None
    # this interval only (the fleet's canary analysis): sparse latency histogram and errors
    latency_hist: dict[str, int] | None = None
    errors_interval: int = 0


class InferenceStats:
    """Thread-safe inference counters for telemetry and ``/metrics``."""

    def __init__(self, latency_window: int = 1024) -> None:
        self._lock = threading.Lock()
        self.latency = LatencyRing(latency_window, lock=self._lock)  # one lock per record, not two
        self.inferences = 0
        self.errors = 0
        self._interval_start = 0
        self._conf_sum = 0.0
        self._conf_n = 0
        self._hist: dict[int, int] = {}  # this interval's latencies, bucket -> count (str keys in snapshots)
        self._errors_start = 0
        self.started = time.time()

    def record(self, latency_ms: float, confidence: float) -> None:
        bucket = latency_bucket(latency_ms)
        with self._lock:
            self.latency.put(latency_ms)
            self._hist[bucket] = self._hist.get(bucket, 0) + 1
            self.inferences += 1
            self._conf_sum += confidence
            self._conf_n += 1

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self, *, reset_interval: bool = False) -> StatsSnapshot:
        """Counters now; ``reset_interval`` starts a new telemetry interval (and a new mean confidence)."""
        p50, p99 = self.latency.percentiles(50, 99)
        with self._lock:
            interval = self.inferences - self._interval_start
            mean_conf = self._conf_sum / self._conf_n if self._conf_n else None
            snap = StatsSnapshot(self.inferences, interval, self.errors, p50, p99, mean_conf,
                                 {str(k): v for k, v in self._hist.items()}, self.errors - self._errors_start)
            if reset_interval:
                self._interval_start = self.inferences
                self._errors_start = self.errors
                self._conf_sum, self._conf_n = 0.0, 0
                self._hist = {}
        return snap


def _fmt(v: float) -> str:
    return repr(float(v)) if v == v else "NaN"


def prometheus_text(metrics: list[tuple[str, str, str, float | None, dict[str, str]]]) -> str:
    """Render ``(name, type, help, value, labels)`` rows in the Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    seen: set[str] = set()
    for name, mtype, help_text, value, labels in metrics:
        if name not in seen:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {mtype}")
            seen.add(name)
        if value is None:
            continue
        lab = ""
        if labels:
            esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in labels.items()}
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"
        out.append(f"{name}{lab} {_fmt(value)}")
    return "\n".join(out) + "\n"
