"""Bundle members the exporter makes besides the models, and the packing itself.

``reference.npz`` (health check): a few test inputs ``x``, the FP32 logits ``logits``,
each variant's own logits ``logits/<variant-id>`` and the tolerance the exporter
observed for it ``tolerance/<variant-id>``.  ``baseline.npz``: the drift baseline,
computed from held-out (validation) inputs with the FP32 ONNX model's softmax and
embedding, half as reference sample and half to calibrate the thresholds.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import write_bundle
from core.manifest import Manifest
from core.signing import PrivateKey, load_private_key

__all__ = ["softmax", "reference_npz", "baseline_npz", "load_signing_key", "pack_bundle", "utc_now",
           "default_version", "QUANTIZED_TOLERANCE_FLOOR", "FLOAT_TOLERANCE_FLOOR"]

log = logging.getLogger(__name__)

FLOAT_TOLERANCE_FLOOR = 1e-3  # float variants reproduce their logits to rounding noise
QUANTIZED_TOLERANCE_FLOOR = 0.05  # int8 kernels may round differently on another CPU


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable softmax in float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def utc_now() -> str:
    """ISO-8601 UTC timestamp, seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def default_version() -> str:
    """A version that sorts after earlier exports: ``YYYYMMDD.HHMMSS`` (UTC)."""
    return datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def reference_npz(x: np.ndarray, fp32_logits: np.ndarray, variant_logits: Mapping[str, np.ndarray],
                  quantized: Mapping[str, bool]) -> bytes:
    """Health-check data: inputs, FP32 logits, and per variant its logits and tolerance."""
    arrays: dict[str, np.ndarray] = {"x": np.ascontiguousarray(x, np.float32),
                                     "logits": np.asarray(fp32_logits, np.float32)}
    for vid, logits in variant_logits.items():
        arrays[f"logits/{vid}"] = np.asarray(logits, np.float32)
        scale = float(np.max(np.abs(logits))) if logits.size else 1.0
        floor = QUANTIZED_TOLERANCE_FLOOR * max(1.0, scale) if quantized.get(vid) else FLOAT_TOLERANCE_FLOOR
        arrays[f"tolerance/{vid}"] = np.float32(floor)
    return _npz(arrays)


def baseline_npz(x_val: np.ndarray, logits: np.ndarray, embedding: np.ndarray | None, *,
                 class_counts: np.ndarray | None = None, seed: int = 0) -> bytes | None:
    """The drift baseline (``core.drift``) from held-out inputs, or None when they are too few.

    A model without an embedding output gets a baseline on its inputs and probabilities
    (what the agent feeds it).  See ``export.calibration.drift_baseline`` for the summary.
    """
    from core.drift_features import DriftFeatures

    from .calibration import drift_baseline

    feats = DriftFeatures(inputs=x_val, probs=softmax(logits), embedding=embedding)
    return drift_baseline(feats, class_prior=class_counts, seed=seed)[0]


def load_signing_key(key: str | os.PathLike[str] | PrivateKey | None) -> PrivateKey | None:
    """A private key object from a key file path (or the object itself)."""
    if key is None or isinstance(key, PrivateKey):
        return key
    return load_private_key(key)


def pack_bundle(out: Path, manifest: Manifest, models: Mapping[str, Path], *, reference: bytes | None,
                baseline: bytes | None, metrics: Mapping[str, Any], signing_key: PrivateKey | None) -> Path:
    """Write the bundle: models, ``reference.npz``, ``baseline.npz``, ``metrics.json``; signed when a key is given."""
    files: dict[str, bytes | Path] = dict(models)
    if reference is not None:
        files["reference.npz"] = reference
    if baseline is not None:
        files["baseline.npz"] = baseline
    files["metrics.json"] = (json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n").encode()
    return write_bundle(out, manifest, files, signing_key=signing_key)
