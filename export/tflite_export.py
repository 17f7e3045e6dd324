"""PyTorch -> TFLite with litert-torch: FP32 and full-integer INT8 (PT2E).

litert-torch is heavy (JAX, torchao, the LiteRT converter), so it lives in the
``edgeloop[tflite-export]`` extra and is imported only here, inside the functions.
Both graphs keep NCHW and return ``(logits, embedding)`` like the ONNX export; the
INT8 file has int8 inputs and outputs, which ``core.runtime`` (de)quantizes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExportError, QuantizationError

from .onnx_export import EmbeddingHead

__all__ = ["TFLiteExport", "export_tflite_fp32", "export_tflite_int8", "require_litert_torch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TFLiteExport:
    """A converted ``.tflite`` file and how long conversion took."""

    path: Path
    precision: str  # "fp32" | "int8"
    seconds: float
    options: dict[str, Any]


def require_litert_torch() -> Any:
    """Import litert_torch or raise :class:`ExportError` naming the extra to install."""
    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError("litert-torch is not installed; TFLite export is unavailable",
                          hint="pip install 'edgeloop[tflite-export]' or export with --no-tflite") from exc
    return litert_torch


@contextlib.contextmanager
def _quiet() -> Any:
    """litert-torch prints a progress tree on stdout; keep it out of ``--json`` output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue():
        log.debug("litert-torch: %s", buf.getvalue())


def _convert(module: Any, sample: np.ndarray, path: Path, **kwargs: Any) -> None:
    import torch

    litert_torch = require_litert_torch()
    x = torch.from_numpy(np.ascontiguousarray(sample[:1], dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            litert_torch.convert(module, (x,), **kwargs).export(str(path))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"TFLite conversion failed: {exc}".splitlines()[0],
                          hint="the model must be exportable by torch.export", path=str(path)) from exc


def export_tflite_fp32(model: Any, path: str | Path, sample: np.ndarray) -> TFLiteExport:
    """FP32 ``.tflite`` (batch 1, NCHW) returning logits and embedding."""
    t0 = time.perf_counter()
    path = Path(path)
    _convert(EmbeddingHead(model), sample, path)
    return TFLiteExport(path, "fp32", time.perf_counter() - t0, {})


def export_tflite_int8(model: Any, path: str | Path, sample: np.ndarray, calib_images: np.ndarray, *,
                       per_channel: bool = True) -> TFLiteExport:
    """Full-integer INT8 ``.tflite`` via PT2E, calibrated on the same images as ONNX INT8.

    Symmetric per-channel weights, int8 activations, int8 input and outputs.
    """
    import torch

    require_litert_torch()
    try:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise ExportError(f"litert-torch's PT2E quantizer is unavailable: {exc}",
                          hint="pip install 'edgeloop[tflite-export]'") from exc
    t0 = time.perf_counter()
    path = Path(path)
    head = EmbeddingHead(model)
    x = torch.from_numpy(np.ascontiguousarray(sample[:1], dtype=np.float32))
    try:
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
        # torch.export's graph module comes back in training mode: without this, batch norm
        # calibrates on batch statistics and dropout stays live (both measured to wreck INT8).
        graph = move_exported_model_to_eval(torch.export.export(head, (x,)).module())
        prepared = move_exported_model_to_eval(prepare_pt2e(graph, quantizer))
        with torch.no_grad():
            for i in range(len(calib_images)):  # batch 1: the exported graph has a fixed batch of 1
                prepared(torch.from_numpy(np.ascontiguousarray(calib_images[i:i + 1], dtype=np.float32)))
        converted = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
        # The ops are in eval form now, but the graph module's flag stays True (exported
        # modules refuse .eval()); litert-torch reads the flag and would warn.
        converted.training = False
    except Exception as exc:
        raise QuantizationError(f"PT2E INT8 quantization failed: {exc}".splitlines()[0], path=str(path)) from exc
    _convert(converted, sample, path, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    return TFLiteExport(path, "int8", time.perf_counter() - t0,
                        {"scheme": "pt2e-symmetric", "per_channel": per_channel,
                         "calibration_samples": int(len(calib_images)), "io": "int8"})
