"""Choosing the variant a device runs: a fixed id, or ``auto`` (measured here, at install).

``auto`` times every variant the device can load (warm-up, then N batch-1 runs on
the bundle's own reference inputs, median) and picks the fastest whose accuracy drop
is within the bundle's budget.  INT8 is not always faster (see DEPENDENCIES.md:
MobileNetV3 INT8 was 3.8x slower on one CPU), so the decision is measured, not assumed.
Every variant is also timed on each accelerator the installed runtimes offer
(:mod:`edge_agent.accel`: ONNX Runtime execution providers, LiteRT delegates), under the
key ``variant@accelerator``; the fastest pair wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import EdgeloopError, UpdateError
from core.manifest import Manifest, Variant
from core.runtime import measure_latency, time_backend

from . import accel

__all__ = ["VariantChoice", "within_budget", "select_variant"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantChoice:
    """The variant chosen and the figures behind the choice (reported in DeviceState and status)."""

    variant: str
    mode: str  # "auto" | "fixed"
    latency_ms: dict[str, float] = field(default_factory=dict)  # median batch-1 ms per measured variant
    eligible: tuple[str, ...] = ()  # within the accuracy budget
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was not considered
    reason: str = ""
    accelerator: str = "cpu"  # edge_agent.accel id the variant runs on ("cpu": the runtime's default)


def within_budget(manifest: Manifest, variant: Variant) -> bool:
    """Whether a variant's accuracy drop (percentage points) is within the bundle's budget."""
    drop = variant.accuracy_drop
    if drop is None and variant.test_accuracy is not None and manifest.reference_accuracy is not None:
        drop = 100.0 * (manifest.reference_accuracy - variant.test_accuracy)
    if drop is None:  # the reference itself, or a variant the export did not measure: trust it
        return True
    return drop <= manifest.accuracy_budget + 1e-9


def select_variant(manifest: Manifest, slot_dir: Path, preference: str, x1: np.ndarray, *, threads: int = 1,
                   runs: int = 30) -> VariantChoice:
    """Pick the variant to run from an extracted bundle in ``slot_dir``.

    ``preference``: a variant id (must exist in the bundle) or ``auto``.  ``x1`` is one
    preprocessed input (1, C, H, W) to time with.  Raises :class:`UpdateError` when no
    variant can run here.
    """
    if preference != "auto":
        try:
            manifest.variant(preference)
        except EdgeloopError as exc:
            raise UpdateError(f"configured variant {preference!r} is not in bundle {manifest.version}",
                              hint=exc.hint or "set [model].variant = \"auto\"", version=manifest.version) from exc
        return VariantChoice(variant=preference, mode="fixed", eligible=(preference,), reason="configured")
    latencies: dict[str, float] = {}
    skipped: dict[str, str] = {}
    eligible = []
    for v in manifest.variants:
        if not within_budget(manifest, v):
            skipped[v.id] = f"accuracy drop {v.accuracy_drop} pp over budget {manifest.accuracy_budget} pp"
            continue
        try:
            latencies[v.id] = round(measure_latency(slot_dir / v.file, v, x1, threads=threads, runs=runs), 4)
            eligible.append(v.id)
        except EdgeloopError as exc:  # e.g. LiteRT not installed on this device
            skipped[v.id] = str(exc)
            log.info("variant %s skipped: %s", v.id, exc)
            continue
        _time_accelerators(slot_dir, v, x1, threads, runs, latencies, skipped)
    if not eligible:
        raise UpdateError(f"no variant of bundle {manifest.version} can run on this device",
                          hint="; ".join(f"{k}: {v}" for k, v in skipped.items()) or None, version=manifest.version)
    best_key = min((k for k in latencies if accel.split_key(k)[0] in eligible), key=lambda k: latencies[k])
    best, on_accel = accel.split_key(best_key)
    on = "" if on_accel == accel.CPU else f" on {on_accel}"
    reason = f"fastest within the {manifest.accuracy_budget} pp budget{on} ({latencies[best_key]:.3f} ms median, batch 1)"
    return VariantChoice(variant=best, mode="auto", latency_ms=latencies, eligible=tuple(eligible),
                         skipped=skipped, reason=reason, accelerator=on_accel)


def _time_accelerators(slot_dir: Path, v: Variant, x1: np.ndarray, threads: int, runs: int,
                       latencies: dict[str, float], skipped: dict[str, str]) -> None:
    """Time ``v`` on every non-default accelerator for its format (``variant@accelerator`` keys)."""
    for acc in accel.available(v.format):
        if acc.id == accel.CPU:
            continue
        key = f"{v.id}@{acc.id}"
        try:
            backend = accel.open_accelerated(slot_dir / v.file, v, acc.id, threads=threads)
        except EdgeloopError as exc:
            skipped[key] = str(exc)
            continue
        try:
            latencies[key] = round(time_backend(backend, x1, runs=runs), 4)
        except EdgeloopError as exc:
            skipped[key] = str(exc)
        finally:
            backend.close()

