"""Inference runtimes behind one small interface: ``open_model(path) -> Backend``.

A bundle variant is either an ONNX file (run by ONNX Runtime) or a ``.tflite`` file
(run by LiteRT, ``ai_edge_litert``, falling back to the legacy ``tflite_runtime`` on old
devices).  Both are imported lazily, from a dispatch table keyed by format, so a device
needs only the runtime of the variant it actually runs.  No torch here, ever.

Every backend takes float32 NCHW batches and returns float32 ``ModelOutput(logits,
embedding)``; quantized LiteRT models get their int8/uint8 inputs quantized and their
outputs dequantized here, so callers never see integer tensors.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, RuntimeBackendError
from .manifest import Variant

__all__ = ["ModelOutput", "Backend", "OnnxBackend", "LiteRTBackend", "open_model", "BACKENDS", "model_format", "measure_latency"]


@dataclass(frozen=True)
class ModelOutput:
    """What a model returns for a batch: class logits and, when the model has one, its embedding."""

    logits: np.ndarray
    embedding: np.ndarray | None = None


class Backend:
    """A loaded model.  ``input_shape`` has -1 for a dynamic batch dimension."""

    name: str = "backend"
    input_name: str = ""
    input_shape: tuple[int, ...] = ()
    path: Path

    def run(self, x: np.ndarray) -> ModelOutput:
        """Run a float32 NCHW batch; raise :class:`InputError` on a wrong shape or dtype."""
        raise NotImplementedError

    def check_input(self, x: Any) -> np.ndarray:
        """Return ``x`` as a contiguous float32 array, or raise :class:`InputError` naming expected vs got."""
        expected = "x".join("N" if d < 0 else str(d) for d in self.input_shape)
        if not isinstance(x, np.ndarray):
            raise InputError(f"model input must be a numpy array, got {type(x).__name__}",
                             hint=f"pass a float32 array of shape {expected}", path=str(self.path))
        if x.dtype != np.float32:
            raise InputError(f"model input must be float32, got {x.dtype}",
                             hint="preprocess images with core.preprocess.preprocess()",
                             path=str(self.path), expected="float32", got=str(x.dtype))
        fixed = tuple(self.input_shape[1:])
        if x.ndim != len(self.input_shape) or tuple(x.shape[1:]) != fixed or x.shape[0] < 1:
            got = "x".join(str(d) for d in x.shape)
            raise InputError(f"model input shape {got} does not match the model's {expected}",
                             hint="resize/convert images with the bundle's preprocessing",
                             path=str(self.path), expected=expected, got=got)
        return np.ascontiguousarray(x)

    def close(self) -> None:
        """Release the runtime session (the object is unusable afterwards)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name!s}, input={self.input_shape}, runtime={self.name})"


def _import_first(modules: tuple[str, ...], extra: str, what: str) -> Any:
    """Import the first importable module, or raise RuntimeBackendError naming the pip extra."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeBackendError(f"{what} is not installed (tried {', '.join(modules)})",
                              hint=f"pip install 'edgeloop[{extra}]'")


class OnnxBackend(Backend):
    """ONNX Runtime on the CPU: ``threads`` intra-op threads, sequential execution, all graph optimisations."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        ort = _import_first(("onnxruntime",), "agent", "ONNX Runtime")
        self.path = path
        self.name = "onnxruntime"
        self.version = str(getattr(ort, "__version__", "?"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only; ORT warns about unused initializers otherwise
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise RuntimeBackendError(f"ONNX Runtime cannot load {path.name}: {exc}",
                                      hint="re-export the model or check the bundle", path=str(path)) from exc
        inp = self._session.get_inputs()[0]
        self._input_name = self.input_name = inp.name
        self.input_dtype = inp.type  # e.g. "tensor(float)"
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in inp.shape)
        names = [o.name for o in self._session.get_outputs()]
        self._logits = "logits" if "logits" in names else names[0]
        rest = [n for n in names if n != self._logits]
        self._embedding = "embedding" if "embedding" in names else (rest[0] if rest else None)
        self.output_names = names

    def run(self, x: np.ndarray) -> ModelOutput:
        x = self.check_input(x)
        fetch = [self._logits] + ([self._embedding] if self._embedding else [])
        if self.input_shape[0] > 0 and x.shape[0] != self.input_shape[0]:
            parts = [self._session.run(fetch, {self._input_name: x[i:i + 1]}) for i in range(x.shape[0])]
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(fetch))]
        else:
            try:
                outs = self._session.run(fetch, {self._input_name: x})
            except Exception as exc:
                raise RuntimeBackendError(f"ONNX Runtime failed on {self.path.name}: {exc}", path=str(self.path)) from exc
        logits = np.asarray(outs[0], dtype=np.float32)
        emb = np.asarray(outs[1], dtype=np.float32) if len(outs) > 1 else None
        return ModelOutput(logits, emb)

    def close(self) -> None:
        self._session = None


class LiteRTBackend(Backend):
    """LiteRT (or legacy tflite_runtime) interpreter; quantizes int inputs and dequantizes outputs."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        mod = _import_first(("ai_edge_litert.interpreter", "tflite_runtime.interpreter"), "tflite", "LiteRT")
        self.path = path
        self.name = "litert" if mod.__name__.startswith("ai_edge_litert") else "tflite_runtime"
        try:
            self._interp = mod.Interpreter(model_path=str(path), num_threads=int(threads))
            self._interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeBackendError(f"{self.name} cannot load {path.name}: {exc}",
                                      hint="re-export the model or check the bundle", path=str(path)) from exc
        self._in = self._interp.get_input_details()[0]
        self.input_name = str(self._in["name"])
        self.input_dtype = np.dtype(self._in["dtype"]).name  # "float32", or "int8"/"uint8" when quantized
        sig = self._in.get("shape_signature", self._in["shape"])
        self._dynamic_batch = int(sig[0]) == -1
        self.input_shape = (-1 if self._dynamic_batch else int(self._in["shape"][0]),) + tuple(
            int(d) for d in self._in["shape"][1:])
        self._batch = int(self._in["shape"][0])
        self._outputs = self._ordered_outputs()

    def _ordered_outputs(self) -> list[dict[str, Any]]:
        """Output details in signature order (output_0 = logits, output_1 = embedding).

        The flatbuffer's own output order is not the model's return order, so the
        signature's names decide; without a signature, fall back to detail order.
        """
        details = self._interp.get_output_details()
        by_index = {d["index"]: d for d in details}
        try:
            sigs = self._interp._get_full_signature_list()
            outs = next(iter(sigs.values()))["outputs"]
            ordered = [by_index[outs[k]] for k in sorted(outs, key=_natural_key) if outs[k] in by_index]
            if len(ordered) == len(details):
                return ordered
        except Exception:  # old runtimes without signatures: keep detail order
            pass
        return sorted(details, key=lambda d: _natural_key(d["name"]))

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self._in["dtype"]
        if dtype == np.float32:
            return x
        scale, zero = self._in["quantization"]
        if not scale:
            raise RuntimeBackendError(f"{self.path.name}: integer input without quantization parameters",
                                      path=str(self.path))
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)

    def _invoke(self, x: np.ndarray) -> list[np.ndarray]:
        self._interp.set_tensor(self._in["index"], self._quantize(x))
        self._interp.invoke()
        result = []
        for d in self._outputs:
            y = self._interp.get_tensor(d["index"])
            if y.dtype != np.float32:
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - np.float32(zero)) * np.float32(scale) if scale else y.astype(np.float32)
            result.append(np.array(y, dtype=np.float32))  # copy: the interpreter reuses its buffers
        return result

    def run(self, x: np.ndarray) -> ModelOutput:
        x = self.check_input(x)
        try:
            if x.shape[0] == self._batch:
                outs = self._invoke(x)
            elif self._dynamic_batch:
                self._interp.resize_tensor_input(self._in["index"], list(x.shape))
                self._interp.allocate_tensors()
                self._batch = x.shape[0]
                outs = self._invoke(x)
            else:  # fixed-batch model (litert-torch exports batch 1): loop
                parts = [self._invoke(x[i:i + self._batch]) for i in range(0, x.shape[0], self._batch)]
                outs = [np.concatenate([p[k] for p in parts]) for k in range(len(self._outputs))]
        except (RuntimeError, ValueError) as exc:
            raise RuntimeBackendError(f"{self.name} failed on {self.path.name}: {exc}", path=str(self.path)) from exc
        return ModelOutput(outs[0], outs[1] if len(outs) > 1 else None)

    def close(self) -> None:
        self._interp = None


def _natural_key(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


#: format -> backend class; the table (not an if-chain) decides which runtime runs a file.
BACKENDS: dict[str, Callable[..., Backend]] = {"onnx": OnnxBackend, "tflite": LiteRTBackend}
_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


def model_format(path: Path, variant: Variant | None = None) -> str:
    """The format of a model file: the variant's, else from the file suffix."""
    if variant is not None:
        return variant.format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise RuntimeBackendError(f"unknown model format {path.suffix!r} for {path.name}",
                                  hint="use a .onnx or .tflite file", path=str(path))
    return fmt


def open_model(path: str | Path, variant: Variant | None = None, *, threads: int = 1) -> Backend:
    """Load a model file in the runtime its format needs.

    ``variant`` (from the bundle manifest) names the format; without it the file suffix
    does.  Raises :class:`RuntimeBackendError` when the runtime is missing (naming the
    pip extra) or cannot load the file.
    """
    path = Path(path)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if not path.is_file():
        raise RuntimeBackendError(f"model file {path} does not exist", hint="check the path or extract the bundle",
                                  path=str(path))
    fmt = model_format(path, variant)
    factory = BACKENDS.get(fmt)
    if factory is None:
        raise RuntimeBackendError(f"no runtime for format {fmt!r}", hint=f"supported: {', '.join(BACKENDS)}",
                                  path=str(path))
    return factory(path, threads=threads)


def measure_latency(model_path: Path, variant: Variant | None, x1: np.ndarray, *, threads: int = 1, runs: int = 30,
                    warmup: int = 5) -> float:
    """Median wall time (ms) of batch-1 inference on this device."""
    backend = open_model(model_path, variant, threads=threads)
    try:
        for _ in range(warmup):
            backend.run(x1)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            backend.run(x1)
            times.append((time.perf_counter() - t0) * 1000.0)
        return float(np.median(times))
    finally:
        backend.close()
