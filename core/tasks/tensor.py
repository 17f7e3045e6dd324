"""Tensor models: raw arrays in, every named output out (audio features, sensor windows,
regression, anomaly scores).

Input: an array of the model's input shape (a missing batch axis or a flat array with
the right element count is fine); floats go into a quantized input through its scale and
zero point, integers in the model's own dtype go in unchanged (``core.tasks.base``).
Output: every named output, dequantized to float32.

Options: ``score`` -- ``reconstruction-mse`` makes ``TaskResult.score`` the mean squared
difference between the (dequantized) output and the real-valued input, an autoencoder's
anomaly score (MLPerf Tiny / DCASE); ``output`` names the output it uses (default: the
first).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BundleError
from .base import Prepared, Task, TaskResult

__all__ = ["TensorTask", "SCORES"]

SCORES = ("reconstruction-mse",)


class TensorTask(Task):
    kind = "tensor"

    def __init__(self, manifest: Any, backend: Any) -> None:
        super().__init__(manifest, backend)
        self.score = self.options.get("score")
        if self.score is not None and self.score not in SCORES:
            raise BundleError(f"{manifest.name}: unknown tensor score {self.score!r}",
                              hint=f"use one of {', '.join(SCORES)} or none")
        names = [o.name for o in backend.outputs]
        self.output = self.options.get("output", names[0])

    def decode(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> TaskResult:
        score = None
        if self.score == "reconstruction-mse":
            y = np.asarray(outputs[self.output], np.float64).reshape(-1)
            x = np.asarray(prepared.x, np.float64).reshape(-1)
            if y.shape != x.shape:
                raise BundleError(f"{self.manifest.name}: reconstruction has {y.size} values, the input {x.size}",
                                  hint="reconstruction-mse needs an output of the input's size")
            score = float(np.mean((y - x) ** 2))
        outs = {k: np.asarray(v) for k, v in outputs.items()}
        return TaskResult(self.kind, confidence=0.0 if score is None else score, outputs=outs, score=score)

    def drift_features(self, prepared: Prepared, outputs: dict[str, np.ndarray], result: TaskResult) -> Any:
        from ..drift_features import DriftFeatures, tensor_summary

        flat = np.concatenate([np.asarray(v, np.float32).reshape(1, -1) for v in outputs.values()], axis=1)
        summary = tensor_summary(flat)
        if result.score is not None:
            summary = np.concatenate([summary, np.float32([[result.score]])], axis=1)
        return DriftFeatures(inputs=self.drift_input(prepared), outputs=summary)
