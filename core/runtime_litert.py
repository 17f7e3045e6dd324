"""The LiteRT backend of :mod:`core.runtime`: ``.tflite`` models through ``ai_edge_litert`` (or the legacy
``tflite_runtime`` on old devices), imported lazily; stateful models and resource variables included."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RuntimeBackendError
from .manifest import TensorSpec
from .runtime import Backend, _import_first

__all__ = ["LiteRTBackend"]


# Ops that keep state in variable tensors between invocations.
_STATEFUL_OPS = {"UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN",
                 "BIDIRECTIONAL_SEQUENCE_RNN", "LSTM", "SVDF", "VAR_HANDLE", "ASSIGN_VARIABLE", "READ_VARIABLE"}
# Resource variables (tf.Variable, converted with an init subgraph run by CALL_ONCE): LiteRT's
# reset_all_variables() does not touch them, only a fresh interpreter re-runs their initialisation.
_RESOURCE_OPS = {"VAR_HANDLE", "ASSIGN_VARIABLE", "READ_VARIABLE"}


def _tfl_spec(d: dict[str, Any]) -> TensorSpec:
    scale, zero = d.get("quantization", (0.0, 0))
    sig = d.get("shape_signature", d["shape"])
    shape = tuple(int(s) if int(s) > 0 else -1 for s in (sig if len(sig) == len(d["shape"]) else d["shape"]))
    dtype = np.dtype(d["dtype"]).name
    return TensorSpec(str(d["name"]), shape, dtype, float(scale) if scale else None, int(zero) if scale else None)


class LiteRTBackend(Backend):
    """LiteRT (or legacy tflite_runtime) interpreter, run on the model's own tensors."""

    def __init__(self, path: Path, *, threads: int = 1, op_resolver: str | None = None,
                 delegates: tuple[str, ...] = ()) -> None:
        mod = _import_first(("ai_edge_litert.interpreter", "tflite_runtime.interpreter"), "tflite", "LiteRT")
        self.path = path
        self.name = "litert" if mod.__name__.startswith("ai_edge_litert") else "tflite_runtime"
        extra: dict[str, Any] = {}  # edge_agent.accel: builtin kernels only, or a delegate library
        try:
            if op_resolver is not None:
                extra["experimental_op_resolver_type"] = mod.OpResolverType[op_resolver]
            if delegates:
                extra["experimental_delegates"] = [mod.load_delegate(lib) for lib in delegates]
            self._interp = mod.Interpreter(model_path=str(path), num_threads=int(threads), **extra)
            self._interp.allocate_tensors()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("the model needs an operator this runtime lacks (e.g. a TFLite Micro custom op); "
                    "convert it with builtin ops only" if "custom op" in str(exc).lower() or "resolve" in str(exc).lower()
                    else "re-export the model or check the file")
            raise RuntimeBackendError(f"{self.name} cannot load {path.name}: {first}", hint=hint,
                                      path=str(path)) from exc
        self._in_details = self._interp.get_input_details()
        self._out_details = self._ordered_outputs()
        self._out_index = [(str(d["name"]), d["index"]) for d in self._out_details]
        self.inputs = tuple(_tfl_spec(d) for d in self._in_details)
        self.outputs = tuple(_tfl_spec(d) for d in self._out_details)
        self._in = self._in_details[0]
        self.input_name = str(self._in["name"])
        self.input_dtype = np.dtype(self._in["dtype"]).name  # "float32", or "int8"/"uint8" when quantized
        self.input_shape = self.inputs[0].shape
        self._shapes = {d["name"]: tuple(int(s) for s in d["shape"]) for d in self._in_details}
        try:
            ops = {o.get("op_name", "") for o in self._interp._get_ops_details()}
        except Exception:  # noqa: BLE001 - old runtimes: assume stateful (reset = a fresh interpreter: slower, right)
            ops = {"VAR_HANDLE"}
        self.stateful = bool(ops & _STATEFUL_OPS)
        self._resource_vars = bool(ops & _RESOURCE_OPS)
        self._fresh_interpreter = lambda: mod.Interpreter(model_path=str(path), num_threads=int(threads), **extra)

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
        except Exception:  # old runtimes or no signature: keep detail order
            pass
        return sorted(details, key=lambda d: _natural_key(d["name"]))

    def reset_state(self) -> None:
        """Variable tensors (LSTM/SVDF state) in place; resource variables by a fresh interpreter.

        The fresh interpreter has the model's own input shapes again; anything cached from
        the old one must be refreshed here.
        """
        if not self.stateful:
            return
        if not self._resource_vars:
            self._interp.reset_all_variables()
            return
        interp = self._fresh_interpreter()
        interp.allocate_tensors()
        self._interp = interp
        self._shapes = {d["name"]: tuple(int(s) for s in d["shape"]) for d in self._in_details}

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            resized = False
            for d in self._in_details:
                x = arrays[d["name"]]
                if tuple(x.shape) != self._shapes[d["name"]]:
                    self._interp.resize_tensor_input(d["index"], list(x.shape))
                    self._shapes[d["name"]] = tuple(x.shape)
                    resized = True
            if resized:
                self._interp.allocate_tensors()
            return self._invoke(arrays)
        except (RuntimeError, ValueError) as exc:
            raise self._failed(exc) from exc

    def _invoke(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        for d in self._in_details:
            interp.set_tensor(d["index"], arrays[d["name"]])
        interp.invoke()
        # get_tensor returns a copy (the interpreter reuses its buffers): no second one
        return {name: interp.get_tensor(i) for name, i in self._out_index}

    def _run_known(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`_run` without its resize checks while every feed has the allocated shape."""
        shapes = self._shapes
        for d in self._in_details:
            if arrays[d["name"]].shape != shapes[d["name"]]:
                return self._run(arrays)
        try:
            return self._invoke(arrays)
        except (RuntimeError, ValueError) as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> RuntimeBackendError:
        return RuntimeBackendError(f"{self.name} failed on {self.path.name}: {exc}", path=str(self.path))

    def close(self) -> None:
        self._interp = None


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))

