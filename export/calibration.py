"""Calibration data for INT8: real training images, one at a time.

Random tensors hide the INT8 failure this project has measured (saturating u8s8
kernels on AVX2 CPUs without VNNI): only real inputs show the activation ranges the
device will see.  The reader feeds batch-1 samples because the quantizers calibrate
per inference call and the device runs batch 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from core.errors import ConfigError

__all__ = ["CALIBRATION_METHODS", "CalibrationConfig", "DEFAULT_CALIBRATION", "select_samples", "ImageCalibrationReader",
           "drift_baseline"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationConfig:
    """How INT8 variants are calibrated: method, number of training images, sampling seed."""

    method: str = "minmax"
    samples: int = 200
    seed: int = 0
    percentile: float = 99.999  # only for method="percentile"
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}",
                              hint=f"choose one of {', '.join(CALIBRATION_METHODS)}", key="calibration.method")
        if self.samples < 1:
            raise ConfigError(f"calibration.samples must be >= 1, got {self.samples}",
                              hint="use e.g. --calib-samples 200", key="calibration.samples")
        if not 90.0 <= self.percentile <= 100.0:
            raise ConfigError(f"calibration.percentile must be in [90, 100], got {self.percentile}",
                              key="calibration.percentile")


#: The frozen default (200 images, minmax), shared as a module-level singleton.
DEFAULT_CALIBRATION = CalibrationConfig()


def select_samples(x: np.ndarray, y: np.ndarray | None, n: int, *, seed: int = 0) -> np.ndarray:
    """Pick ``n`` images (all when fewer), round-robin over classes when labels are given.

    Stratifying keeps a rare class's activations in the calibration ranges.
    """
    if x.ndim != 4 or len(x) == 0:
        raise ConfigError(f"calibration data must be a non-empty NCHW batch, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    if n >= len(x):
        return np.ascontiguousarray(x, dtype=np.float32)
    if y is None:
        idx = rng.choice(len(x), size=n, replace=False)
    else:
        per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
        order = [int(p[rank]) for rank in range(max(len(p) for p in per_class)) for p in per_class if rank < len(p)]
        idx = np.array(order[:n])
    return np.ascontiguousarray(x[np.sort(idx)], dtype=np.float32)


class ImageCalibrationReader(CalibrationDataReader):
    """A CalibrationDataReader over a batch of images, yielding one image per call.

    ``get_next()`` returns ``{input_name: (1, C, H, W) float32}`` and ``None`` when done;
    ``rewind()`` starts again (ONNX Runtime's calibrators and our gate reuse readers).
    """

    def __init__(self, images: np.ndarray, input_name: str = "input") -> None:
        if images.ndim != 4 or len(images) == 0:
            raise ConfigError(f"calibration images must be a non-empty NCHW batch, got {images.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self._it: Iterator[int] = iter(range(len(self.images)))

    def __len__(self) -> int:
        return len(self.images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        if i is None:
            return None
        return {self.input_name: self.images[i:i + 1]}

    def rewind(self) -> None:
        self._it = iter(range(len(self.images)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item



def drift_baseline(held: Any, *, windows: Sequence[int] | None = None, class_prior: np.ndarray | None = None,
                   seed: int = 0, n_boot: int = 2000) -> tuple[bytes | None, dict[str, Any]]:
    """The bundle's drift baseline from held-out ``core.drift_features.DriftFeatures``: (npz bytes, summary).

    Fill ``held`` with exactly what the agent's inference layer will feed the monitor for
    this model (inputs; probs for a classifier; the embedding if the model has one;
    ``outputs`` for detection / tensor tasks), never training data.  Calibrates every size
    in ``windows`` (default 25, 50, 100) that the held-out set is large enough for; the
    summary says which were skipped and how many images they need, and the false-alarm
    budgets with their uncertainty.  Returns ``(None, {"error": ...})`` when the set is too
    small for any window: the caller must then not claim a baseline.
    """
    from core.drift_calibrate import DEFAULT_WINDOWS, calibrate_heldout, calibration_summary
    from core.errors import DataError

    try:
        b = calibrate_heldout(held, windows=tuple(windows or DEFAULT_WINDOWS), class_prior=class_prior, seed=seed,
                              n_boot=n_boot)
    except DataError as exc:
        log.warning("no drift baseline: %s", exc)
        return None, {"error": str(exc), "hint": exc.hint}
    summary = calibration_summary(b)
    for w, why in summary["skipped"].items():
        log.warning("drift window %s not calibrated: the calibration half has %d images, it needs %d "
                    "(hold out about %d images in all)", w, b.n_cal, why["calibration_images_needed"],
                    2 * why["calibration_images_needed"])
    return b.to_bytes(), summary
