"""Measurements taken in the real device runtime: accuracy on a split, batch-1 latency, file size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.runtime import ModelOutput, open_model

__all__ = ["run_model", "accuracy", "latency_ms", "percentage_points"]


def run_model(path: Path, x: np.ndarray, *, threads: int = 1, batch: int = 256) -> ModelOutput:
    """Outputs of the model file for all of ``x``, in chunks of ``batch``."""
    backend = open_model(path, threads=threads)
    try:
        parts = [backend.run(np.ascontiguousarray(x[i:i + batch])) for i in range(0, len(x), batch)]
    finally:
        backend.close()
    emb = None if parts[0].embedding is None else np.concatenate([p.embedding for p in parts])  # type: ignore[misc]
    return ModelOutput(np.concatenate([p.logits for p in parts]), emb)


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, *, threads: int = 1) -> float:
    """Top-1 accuracy (fraction) of the model file on ``(x, y)`` in the device runtime."""
    logits = run_model(path, x, threads=threads).logits
    return float(np.mean(np.argmax(logits, axis=1) == y))


def percentage_points(reference: float, value: float) -> float:
    """Accuracy drop in percentage points (positive = worse than the reference)."""
    return round((reference - value) * 100.0, 4)


def latency_ms(path: Path, sample: np.ndarray, *, threads: int = 1, warmup: int = 5, repeats: int = 30) -> float:
    """Median batch-1 latency in milliseconds, one thread (how the device runs it).

    The same measurement the agent makes when it picks a variant (``edge_agent.select``).
    """
    from core.runtime import measure_latency

    x = np.ascontiguousarray(sample[:1], dtype=np.float32)
    return round(measure_latency(path, None, x, threads=threads, runs=repeats, warmup=warmup), 4)
