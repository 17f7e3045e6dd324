"""Inference runtimes behind one small interface: ``open_model(path) -> Backend``.

A bundle variant is either an ONNX file (run by ONNX Runtime) or a ``.tflite`` file
(run by LiteRT, ``ai_edge_litert``, falling back to the legacy ``tflite_runtime`` on old
devices).  Both are imported lazily, from a dispatch table keyed by format, so a device
needs only the runtime of the variant it actually runs.  No torch here, ever.

The contract (``docs/ARCHITECTURE.md``): a backend describes the model's own tensors
(``inputs`` / ``outputs``: names, shapes with -1 for dynamic dimensions, dtypes and
per-tensor quantization) and :meth:`Backend.run_raw` runs them as the model declares
them -- float32, float16, uint8, int8, any rank -- returning *every* named output in
its own dtype.  :meth:`Backend.run_outputs` is the same with quantized outputs
dequantized to float32.  What the outputs mean is the task layer's business
(``core.tasks``), not the runtime's.

:meth:`Backend.run` is the classifier shortcut the exporter and the health check use:
a float batch in (quantized to the model's integer input when it has one), float32
``ModelOutput(logits, embedding)`` out.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, RuntimeBackendError
from .manifest import TensorSpec, Variant

__all__ = ["ModelOutput", "Backend", "OnnxBackend", "LiteRTBackend", "open_model", "BACKENDS", "model_format",
           "measure_latency", "time_backend", "quantize", "dequantize", "shape_text"]

Feeds = Mapping[str, np.ndarray] | np.ndarray


@dataclass(frozen=True)
class ModelOutput:
    """What a classifier returns for a batch: class logits and, when the model has one, its embedding."""

    logits: np.ndarray
    embedding: np.ndarray | None = None


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """``(-1, 3, 224, 224)`` -> ``"Nx3x224x224"`` (first dynamic dim N, later ones ?)."""
    return "x".join(("N" if i == 0 else "?") if int(d) < 0 else str(int(d)) for i, d in enumerate(shape))


def quantize(x: np.ndarray, spec: TensorSpec, *, rounding: str = "half-away") -> np.ndarray:
    """Real values -> the tensor's integer dtype with its scale / zero point, clipped.

    ``rounding="half-away"`` is C ``round()`` (TFLite Micro, MLPerf Tiny, the TFLite
    converter's reference); ``"half-even"`` is ``np.round``.
    """
    if spec.scale is None:
        raise RuntimeBackendError(f"tensor {spec.name} ({spec.dtype}) has no quantization parameters",
                                  hint="feed it in its own dtype, or re-export the model with quantization info")
    r = np.asarray(x, np.float64) / spec.scale
    q = np.sign(r) * np.floor(np.abs(r) + 0.5) if rounding == "half-away" else np.round(r)
    info = np.iinfo(np.dtype(spec.dtype))
    return np.clip(q + (spec.zero_point or 0), info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An output as float32: quantized ones dequantized, the rest cast."""
    if spec.quantized:
        return ((q.astype(np.float32) - np.float32(spec.zero_point or 0)) * np.float32(spec.scale)).astype(np.float32)
    return np.asarray(q, dtype=np.float32) if q.dtype != np.float32 else q


class Backend:
    """A loaded model: its tensors, how to run them, how to reset its state.

    ``input_shape`` / ``input_name`` describe the first input (-1 = dynamic) for the
    classifier shortcut; ``inputs`` / ``outputs`` describe everything.
    """

    name: str = "backend"
    input_name: str = ""
    input_shape: tuple[int, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    stateful: bool = False
    path: Path

    # -- the contract ---------------------------------------------------------------
    def run_raw(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Run the model's own input tensors; every named output in its own dtype.

        ``feeds`` is one array (single-input models) or {input name: array}.  A batch
        larger than a fixed-batch model's is run in chunks.  Raises :class:`InputError`
        naming expected and got for a wrong dtype, rank or shape.
        """
        arrays = self._check_feeds(feeds)
        n = arrays[self.inputs[0].name].shape[0] if self.inputs[0].shape else 1
        fixed = self.inputs[0].shape[0] if self.inputs[0].shape else -1
        if fixed > 0 and n != fixed and n % fixed == 0:
            parts = [self._run({k: v[i:i + fixed] for k, v in arrays.items()}) for i in range(0, n, fixed)]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return self._run(arrays)

    def run_outputs(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """:meth:`run_raw` with quantized outputs dequantized and every output float32 (ints kept as they are)."""
        raw = self.run_raw(feeds)
        specs = {s.name: s for s in self.outputs}
        return {k: dequantize(v, specs[k]) if (specs[k].quantized or v.dtype.kind == "f") else v
                for k, v in raw.items()}

    def run_trusted(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run_outputs` without the input checks, for feeds built to the model's own spec.

        The caller guarantees what ``_check_feeds`` would check: every input by name, a
        contiguous array in the input's dtype and one batch the model takes (``core.tasks``
        ``Task.prepare_serving`` builds such feeds).  Same outputs as :meth:`run_outputs`.
        """
        raw = self._run_known(feeds)
        conv = self.__dict__.get("_out_convert")
        if conv is None:  # per output: dequantize (quantized or float) or keep; decided once
            conv = self._out_convert = {s.name: s for s in self.outputs}
            self._out_as_is = not any(s.quantized for s in self.outputs)
        if self._out_as_is and all(v.dtype == np.float32 for v in raw.values()):
            return raw  # float32, nothing quantized: the very arrays the loop below would give
        out = {}
        for k, v in raw.items():
            spec = conv[k]
            out[k] = dequantize(v, spec) if (spec.quantized or v.dtype.kind == "f") else v
        return out

    def _run_known(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`_run` on feeds known to be the model's own (``run_trusted``); a runtime may skip its checks."""
        return self._run(arrays)

    def reset_state(self) -> None:
        """Reset a stateful model's variable tensors (LSTM state...) to their initial values."""

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- input checks ------------------------------------------------------------------
    def _check_feeds(self, feeds: Feeds) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            if len(self.inputs) != 1:
                names = ", ".join(s.name for s in self.inputs)
                raise InputError(f"{self.path.name} has {len(self.inputs)} inputs ({names}); got one array",
                                 hint="pass {name: array} for every input", path=str(self.path))
            feeds = {self.inputs[0].name: feeds}
        missing = [s.name for s in self.inputs if s.name not in feeds]
        unknown = [k for k in feeds if k not in {s.name for s in self.inputs}]
        if missing or unknown:
            raise InputError(f"{self.path.name}: inputs {sorted(feeds)} given, the model takes "
                             f"{[s.name for s in self.inputs]}", hint="name every model input once",
                             path=str(self.path), expected=[s.name for s in self.inputs], got=sorted(feeds))
        return {s.name: self._check_one(feeds[s.name], s) for s in self.inputs}

    def _check_one(self, x: Any, spec: TensorSpec) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputError(f"model input {spec.name!r} must be a numpy array, got {type(x).__name__}",
                             hint=f"pass a {spec.dtype} array of shape {shape_text(spec.shape)}", path=str(self.path))
        if x.dtype != np.dtype(spec.dtype):
            raise InputError(f"model input {spec.name!r} must be {spec.dtype}, got {x.dtype}",
                             hint="preprocess with the bundle's preprocessing (core.preprocess) or cast the array",
                             path=str(self.path), expected=spec.dtype, got=str(x.dtype))
        fixed_ok = all(d < 0 or g == d for g, d in zip(x.shape[1:], spec.shape[1:], strict=False))
        batch_ok = x.ndim == 0 or spec.shape[0] < 0 or x.shape[0] == spec.shape[0] or (
            x.shape[0] % spec.shape[0] == 0 and x.shape[0] > 0)
        if x.ndim != len(spec.shape) or not fixed_ok or not batch_ok or (x.ndim and x.shape[0] < 1):
            expected = shape_text(spec.shape)
            got = "x".join(str(d) for d in x.shape) or "scalar"
            raise InputError(f"model input {spec.name!r} has shape {got}; the model takes {expected}",
                             hint="resize/convert the input with the bundle's preprocessing",
                             path=str(self.path), expected=expected, got=got)
        return np.ascontiguousarray(x)

    # -- the classifier shortcut -------------------------------------------------------
    def check_input(self, x: Any) -> np.ndarray:
        """``x`` (float32, or the first input's own dtype) checked against the first input's shape."""
        spec = self.inputs[0]
        if not isinstance(x, np.ndarray):
            raise InputError(f"model input must be a numpy array, got {type(x).__name__}",
                             hint=f"pass a float32 array of shape {shape_text(spec.shape)}", path=str(self.path))
        if x.dtype != np.float32 and x.dtype != np.dtype(spec.dtype):
            also = "" if spec.dtype == "float32" else f" or {spec.dtype}"
            raise InputError(f"model input must be float32{also}, got {x.dtype}",
                             hint="preprocess images with core.preprocess.preprocess()",
                             path=str(self.path), expected="float32", got=str(x.dtype))
        return self._check_one(x, TensorSpec(spec.name, spec.shape, str(x.dtype)))

    def run(self, x: np.ndarray) -> ModelOutput:
        """Classifier shortcut: float batch in, float32 (logits, embedding) out.

        A float32 batch is cast to a float16 input and quantized (half to even) into an
        integer one, so callers keep working in real values.
        """
        x = self.check_input(x)
        spec = self.inputs[0]
        dt = np.dtype(spec.dtype)
        if x.dtype != dt and dt.kind in "iu":  # quantized, or plain integers (raw pixels) without parameters
            x = quantize(x, spec, rounding="half-even") if spec.scale is not None else \
                np.clip(np.rint(x), np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)
        elif x.dtype != dt:
            x = x.astype(dt)
        outs = self.run_outputs(x)
        names = [o.name for o in self.outputs]
        logits = "logits" if "logits" in outs else names[0]
        rest = [n for n in names if n != logits]
        emb = "embedding" if "embedding" in outs else (rest[0] if rest else None)
        return ModelOutput(np.asarray(outs[logits], np.float32),
                           None if emb is None else np.asarray(outs[emb], np.float32))

    def example_input(self, batch: int = 1, *, fill: str = "zeros", seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of the declared dtypes and shapes (dynamic dims: 1 for batch, 32 elsewhere)."""
        rng = np.random.default_rng(seed)
        out = {}
        for s in self.inputs:
            shape = tuple(batch if i == 0 else (d if d > 0 else 32) for i, d in enumerate(s.shape))
            dt = np.dtype(s.dtype)
            if fill == "zeros":
                out[s.name] = np.zeros(shape, dt)
            elif dt.kind == "f":
                out[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind in "iu":
                info = np.iinfo(dt)
                out[s.name] = rng.integers(max(info.min, -128), min(info.max, 255) + 1, shape).astype(dt)
            else:
                out[s.name] = rng.integers(0, 2, shape).astype(dt)
        return out

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


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _ort_spec(arg: Any, path: Path) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise RuntimeBackendError(f"{path.name}: tensor {arg.name!r} has type {arg.type}, which edgeloop cannot feed",
                                  hint="export the model with float, float16 or (u)int8 inputs and outputs",
                                  path=str(path))
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, shape, dtype)


class OnnxBackend(Backend):
    """ONNX Runtime on the CPU: ``threads`` intra-op threads, sequential execution, all graph optimisations."""

    def __init__(self, path: Path, *, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
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
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeBackendError(f"ONNX Runtime cannot load {path.name}: {first}",
                                      hint="check the opset and operators (onnx.checker), or re-export the model",
                                      path=str(path)) from exc
        self.inputs = tuple(_ort_spec(a, path) for a in self._session.get_inputs())
        self.outputs = tuple(_ort_spec(a, path) for a in self._session.get_outputs())
        first = self._session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = first.type  # e.g. "tensor(float)" (kept for callers of the old API)
        self.input_shape = self.inputs[0].shape
        self.output_names = [o.name for o in self.outputs]

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self._session.run(self.output_names, arrays)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeBackendError(f"ONNX Runtime failed on {self.path.name}: {first}", path=str(self.path)) from exc
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs, strict=True)}

    def _run_known(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session's own ``run`` without the Python wrapper's three per-call checks (feed names, graph
        capture, OrtValue ownership: ``run_trusted``'s feeds are numpy arrays by the model's own names).
        Any failure goes through :meth:`_run` again: the wrapper's provider fallback and errors."""
        sess = getattr(self._session, "_sess", None)
        if sess is not None:
            try:
                return dict(zip(self.output_names, sess.run(self.output_names, arrays, None), strict=True))
            except Exception:  # noqa: BLE001 - the wrapper's path decides what this failure is
                pass
        return self._run(arrays)

    def close(self) -> None:
        self._session = None


from .runtime_litert import LiteRTBackend  # noqa: E402  (it builds on Backend above)

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
        return time_backend(backend, x1, runs=runs, warmup=warmup)
    finally:
        backend.close()


def time_backend(backend: Backend, x1: np.ndarray, *, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time (ms) of ``backend`` on the batch-1 input ``x1`` (an open backend: any accelerator)."""
    run = backend.run if x1.dtype == np.float32 else backend.run_raw
    for _ in range(warmup):
        run(x1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x1)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))
