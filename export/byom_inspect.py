"""Read what a model file says about itself, for ``bundle create`` / ``optimize``.

Everything readable from the file is read from it: the input's dtype, shape and
quantization (``core.runtime``), a layout guess, labels from the zip that TFLite
metadata appends to the flatbuffer, the TFLite ops (the SSD post-processing op makes a
detector), an ONNX output fed by ``Softmax``, and -- by probing the model with a few
inputs -- whether an output already holds probabilities (rows in [0, 1] summing to 1).
The CLI's flags override every guess.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.manifest import TensorSpec
from core.runtime import Backend, dequantize

__all__ = ["ModelFacts", "inspect_model", "guess_layout", "labels_from_model", "probe_outputs", "softmax_outputs",
           "ssd_meanings"]


@dataclass(frozen=True)
class ModelFacts:
    """What the file told us."""

    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: frozenset[str]
    softmax_outputs: frozenset[str]  # ONNX outputs produced by a Softmax node
    labels: tuple[str, ...]  # from TFLite metadata's zip, else ()
    stateful: bool


def guess_layout(shape: tuple[int, ...]) -> str:
    """``NCHW`` / ``NHWC`` for 4-d inputs with a 1- or 3-wide channel axis, else ``none`` (tensor)."""
    if len(shape) == 4:
        if shape[3] in (1, 3) and shape[1] not in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
        if shape[3] in (1, 3):
            return "NHWC"
    return "none"


def labels_from_model(path: Path) -> tuple[str, ...]:
    """Labels from the zip TFLite metadata appends to a model (``labels.txt`` / ``labelmap.txt``), else ()."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if Path(name).name.lower() in ("labels.txt", "labelmap.txt", "labels_en.txt"):
                    text = zf.read(name).decode("utf-8", "replace")
                    return tuple(line.strip() for line in text.splitlines() if line.strip())
    except (zipfile.BadZipFile, OSError, KeyError):
        pass
    return ()


def softmax_outputs(path: Path) -> frozenset[str]:
    """ONNX graph outputs produced directly by a Softmax node (needs the onnx package)."""
    try:
        import onnx
    except ImportError:
        return frozenset()
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ORT could load it; onnx's opinion is only a hint
        return frozenset()
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return frozenset(o.name for o in graph.output if made_by.get(o.name) == "Softmax")


def _tflite_ops(backend: Backend) -> frozenset[str]:
    interp = getattr(backend, "_interp", None)
    try:
        return frozenset(str(o.get("op_name", "")) for o in interp._get_ops_details())  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001
        return frozenset()


def inspect_model(path: Path, fmt: str, backend: Backend) -> ModelFacts:
    return ModelFacts(format=fmt, inputs=backend.inputs, outputs=backend.outputs,
                      ops=_tflite_ops(backend) if fmt == "tflite" else frozenset(),
                      softmax_outputs=softmax_outputs(path) if fmt == "onnx" else frozenset(),
                      labels=labels_from_model(path) if fmt == "tflite" else (), stateful=backend.stateful)


def probe_outputs(backend: Backend, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run each feed; outputs dequantized (``Backend.run_outputs``)."""
    out = []
    for f in feeds:
        backend.reset_state()
        out.append(backend.run_outputs(f))
    return out


def looks_like_probabilities(name: str, spec: TensorSpec, probes: list[dict[str, np.ndarray]]) -> bool:
    """Every probe's rows lie in [0, 1] and sum to 1 (looser for quantized outputs)."""
    tol = 0.03 if spec.quantized else 2e-3
    for p in probes:
        y = np.asarray(p[name], np.float64)
        if y.ndim < 1 or y.shape[-1] < 2:
            return False
        rows = y.reshape(-1, y.shape[-1])
        if rows.min() < -tol or rows.max() > 1 + tol or np.abs(rows.sum(-1) - 1).max() > tol:
            return False
    return True


def ssd_meanings(outputs: tuple[TensorSpec, ...], probes: list[dict[str, np.ndarray]]) -> dict[str, str]:
    """{output name: boxes | classes | scores | count} for a TFLite SSD post-processed model.

    boxes: the [1, N, 4] output; count: the one-element output; of the two [1, N] ones,
    the one holding whole numbers in every probe is classes (TF1 and TF2 exports order
    them differently, so the values decide, not the order).
    """
    meanings: dict[str, str] = {}
    flat = []
    for o in outputs:
        if len(o.shape) == 3 and o.shape[-1] == 4:
            meanings[o.name] = "boxes"
        elif int(np.prod([max(d, 1) for d in o.shape])) == 1:
            meanings[o.name] = "count"
        else:
            flat.append(o.name)
    if len(flat) != 2 or "boxes" not in meanings.values():
        raise ConfigError(f"outputs {[o.name for o in outputs]} are not SSD post-processed outputs "
                          "(boxes [1,N,4], classes [1,N], scores [1,N], count [1])",
                          hint="use --detector yolox|yolov5|yolov8 for a raw head, or --task tensor")
    integral = [all(np.allclose(np.asarray(p[n]), np.rint(np.asarray(p[n]))) for p in probes) for n in flat]
    cls_i = 0 if integral[0] and not integral[1] else 1 if integral[1] and not integral[0] else 0
    meanings[flat[cls_i]] = "classes"
    meanings[flat[1 - cls_i]] = "scores"
    return meanings


def dequantized(spec: TensorSpec, q: np.ndarray) -> np.ndarray:
    return dequantize(q, spec)
