"""ONNX -> INT8 (static QDQ, dynamic) and FP16 with ONNX Runtime's tools.

Static INT8 settings are a frozen :class:`StaticSettings`; the exporter tries them in
the order of :data:`STATIC_ATTEMPTS` and keeps the first one the accuracy gate accepts.
The first attempt is ORT's default (u8 activations, s8 weights, full range) on purpose:
on CPUs with AVX2 but without VNNI its fused u8s8 kernels saturate and accuracy
collapses, and the gate must see that and move on (``reduce_range`` or U8U8) rather
than ship it.  Calibration is computed once per model and cached: retries only
re-quantize.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, QuantizationError

from .calibration import DEFAULT_CALIBRATION, CalibrationConfig, ImageCalibrationReader

__all__ = [
    "StaticSettings",
    "STATIC_ATTEMPTS",
    "QUANTIZABLE_OPS",
    "preprocess_for_quantization",
    "quantize_static_int8",
    "quantize_dynamic_int8",
    "convert_fp16",
    "count_ops",
    "quantizable_nodes",
]

log = logging.getLogger(__name__)

#: Operators whose weights matter for accuracy and speed; the gate keeps these in float.
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class StaticSettings:
    """One static INT8 recipe: activation/weight types, range reduction, per-channel weights."""

    name: str
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    per_channel: bool = True

    def __post_init__(self) -> None:
        for key in ("activation_type", "weight_type"):
            if getattr(self, key) not in _TYPES:
                raise ConfigError(f"{key} must be one of {_TYPES}, got {getattr(self, key)!r}", key=key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Tried in order until one passes the accuracy gate (see module docstring for why the
#: default comes first).
STATIC_ATTEMPTS: tuple[StaticSettings, ...] = (
    StaticSettings("u8s8"),
    StaticSettings("u8s8-reduce-range", reduce_range=True),
    StaticSettings("u8u8", weight_type="uint8"),
)


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def preprocess_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """Run ``quant_pre_process`` (shape inference, graph fusions) and name every node.

    The gate refers to nodes by name (``nodes_to_exclude``); unnamed nodes get a stable
    ``<op>_<index>`` name here so the names in the report mean something.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    except Exception as exc:
        raise QuantizationError(f"quantization pre-processing failed: {exc}", path=str(fp32_path)) from exc
    model = onnx.load(str(out_path))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(out_path))
    return out_path


def _method(config: CalibrationConfig) -> tuple[Any, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    extra = {"CalibPercentile": config.percentile} if config.method == "percentile" else {}
    return table[config.method], extra


def quantize_static_int8(pre_path: Path, out_path: Path, calib_images: np.ndarray, settings: StaticSettings, *,
                         calibration: CalibrationConfig = DEFAULT_CALIBRATION, nodes_to_exclude: tuple[str, ...] = (),
                         cache_path: Path | None = None, input_name: str = "input") -> Path:
    """Static QDQ INT8 of a pre-processed model (see :func:`preprocess_for_quantization`).

    ``cache_path`` (a JSON file) keeps the calibration ranges so later attempts with
    other settings or excluded nodes skip calibration; it must belong to this model
    and calibration method.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    method, extra = _method(calibration)
    # An object with reader() (export.optimize_data.ArrayCalibration: any rank, the model's own input name).
    reader = calib_images.reader() if hasattr(calib_images, "reader") else ImageCalibrationReader(calib_images, input_name)
    try:
        quantize_static(str(pre_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=_qtype(settings.activation_type), weight_type=_qtype(settings.weight_type),
                        nodes_to_exclude=list(nodes_to_exclude) or None, calibrate_method=method,
                        extra_options=extra or None,
                        calibration_cache_path=None if cache_path is None else str(cache_path))
    except Exception as exc:
        raise QuantizationError(f"static INT8 quantization ({settings.name}) failed: {exc}",
                                path=str(pre_path)) from exc
    return out_path


def quantize_dynamic_int8(fp32_path: Path, out_path: Path) -> Path:
    """Dynamic INT8 of MatMul/Gemm only (dynamic Conv is 5-8x slower on CPUs: ConvInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, per_channel=False)
    except Exception as exc:
        raise QuantizationError(f"dynamic INT8 quantization failed: {exc}", path=str(fp32_path)) from exc
    return out_path


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """FP16 weights and compute with float32 inputs/outputs kept (the device feeds float32).

    Uses ``onnxruntime.transformers.float16``, which ships inside onnxruntime
    (onnxconverter-common is not needed).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    try:
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:
        raise QuantizationError(f"FP16 conversion failed: {exc}", path=str(fp32_path)) from exc
    onnx.save(half, str(out_path))
    return out_path


def count_ops(path: Path) -> Counter[str]:
    """How many nodes of each operator type the model has (QuantizeLinear, Conv, ...)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes of a model, in graph order."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE_OPS]
