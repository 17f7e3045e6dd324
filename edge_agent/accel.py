"""Accelerators the installed runtimes offer: ONNX Runtime execution providers and LiteRT delegates.

``[model].variant = "auto"`` times every variant on the runtime's default CPU path and, in
addition, on every accelerator found here (:func:`available`), and serves the fastest
``variant@accelerator`` pair (:mod:`edge_agent.select`).  What is found depends only on the
installed wheels and libraries, so the same agent picks CUDA/TensorRT on a Jetson with
``onnxruntime-gpu``, OpenVINO with ``onnxruntime-openvino``, the Edge TPU where
``libedgetpu`` is installed, and the CPU elsewhere:

===========================  =============================================================
accelerator id               what
===========================  =============================================================
``cpu``                      the runtime's default: ORT's CPU provider; LiteRT's default
                             kernels, which apply the XNNPACK delegate with ``threads``
``ort:<Provider>``           an ONNX Runtime execution provider from
                             ``onnxruntime.get_available_providers()`` (XNNPACK, OpenVINO,
                             CUDA, TensorRT, ...), CPU kept as the fallback for its gaps
``litert:builtin``           LiteRT's builtin kernels without the default XNNPACK delegate
                             (sometimes faster for int8 models on small cores)
``litert:edgetpu``           the Coral Edge TPU delegate (``libedgetpu.so.1``; the model
                             must be compiled with ``edgetpu_compiler`` to run on it)
``litert:gpu``               the LiteRT GPU delegate, where its library is installed
===========================  =============================================================
"""

from __future__ import annotations

import ctypes.util
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import RuntimeBackendError
from core.manifest import Variant
from core.runtime import Backend, LiteRTBackend, OnnxBackend, open_model

__all__ = ["Accelerator", "COMPUTE_PROVIDERS", "available", "open_accelerated", "split_key", "CPU"]

log = logging.getLogger(__name__)

CPU = "cpu"

# Providers that run models.  AzureExecutionProvider (in every ORT wheel) sends requests to
# a cloud endpoint: not an accelerator, never tried.
COMPUTE_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                     "MIGraphXExecutionProvider", "OpenVINOExecutionProvider", "DnnlExecutionProvider",
                     "XnnpackExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider",
                     "QNNExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider",
                     "DmlExecutionProvider", "CANNExecutionProvider", "VitisAIExecutionProvider")

_EDGETPU_LIBS = ("libedgetpu.so.1", "libedgetpu.1.dylib", "edgetpu.dll")
_GPU_LIBS = ("libtensorflowlite_gpu_delegate.so",)


@dataclass(frozen=True)
class Accelerator:
    """One way to run a model format on this device."""

    id: str
    format: str  # "onnx" or "tflite"
    detail: str = ""


def _onnx(load: bool) -> list[Accelerator]:
    if not load and "onnxruntime" not in sys.modules:
        return []
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return []
    found = [Accelerator(CPU, "onnx", "ONNX Runtime CPUExecutionProvider")]
    for p in ort.get_available_providers():
        if p in COMPUTE_PROVIDERS:
            found.append(Accelerator(f"ort:{p}", "onnx", f"ONNX Runtime {p} (CPU fallback)"))
    return found


def _library(names: tuple[str, ...], env: str) -> str | None:
    """A delegate library: ``$env`` if set, else the first of ``names`` the loader finds."""
    if os.environ.get(env):  # a path that is not there is not offered (loading it would fail anyway)
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    for name in names:
        stem = name.split(".so")[0].removeprefix("lib")
        if ctypes.util.find_library(stem):
            return name
    return None


def _tflite(load: bool) -> list[Accelerator]:
    if not load and not {"ai_edge_litert.interpreter", "tflite_runtime.interpreter"} & set(sys.modules):
        return []
    try:
        mod = importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        try:
            mod = importlib.import_module("tflite_runtime.interpreter")
        except ImportError:
            return []
    found = [Accelerator(CPU, "tflite", "LiteRT default kernels (XNNPACK delegate, [model].threads threads)")]
    if hasattr(mod, "OpResolverType"):
        found.append(Accelerator("litert:builtin", "tflite", "LiteRT builtin kernels, no default delegate"))
    lib = _library(_EDGETPU_LIBS, "EDGELOOP_EDGETPU_LIB")
    if lib:
        found.append(Accelerator("litert:edgetpu", "tflite", f"Coral Edge TPU delegate ({lib})"))
    lib = _library(_GPU_LIBS, "EDGELOOP_LITERT_GPU_LIB")
    if lib:
        found.append(Accelerator("litert:gpu", "tflite", f"LiteRT GPU delegate ({lib})"))
    return found


def available(fmt: str | None = None, *, loaded_only: bool = False) -> list[Accelerator]:
    """Accelerators for ``fmt`` ("onnx", "tflite"; None: both) that the installed runtimes offer, CPU first.

    ``loaded_only``: only runtimes this process has imported already (what the device state
    reports: importing LiteRT just to list it would cost a serving ONNX agent ~20 MB).
    """
    load = not loaded_only
    return (_onnx(load) if fmt in (None, "onnx") else []) + (_tflite(load) if fmt in (None, "tflite") else [])


def split_key(key: str) -> tuple[str, str]:
    """``"onnx-fp32@ort:CUDAExecutionProvider"`` -> ``("onnx-fp32", "ort:CUDAExecutionProvider")``; no ``@``: cpu."""
    variant, _, accel = key.partition("@")
    return variant, accel or CPU


def open_accelerated(path: Path, variant: Variant | None, accelerator: str = CPU, *, threads: int = 1) -> Backend:
    """Open a model file on ``accelerator``; :class:`RuntimeBackendError` when that cannot be done here."""
    if accelerator == CPU:
        return open_model(path, variant, threads=threads)
    fmt = variant.format if variant is not None else Path(path).suffix.lstrip(".")
    kind, _, name = accelerator.partition(":")
    if kind == "ort" and fmt == "onnx":
        return OnnxBackend(Path(path), threads=threads, providers=tuple(dict.fromkeys((name, "CPUExecutionProvider"))))
    if kind == "litert" and fmt == "tflite":
        if name == "builtin":
            return LiteRTBackend(Path(path), threads=threads, op_resolver="BUILTIN_WITHOUT_DEFAULT_DELEGATES")
        lib = {"edgetpu": _library(_EDGETPU_LIBS, "EDGELOOP_EDGETPU_LIB"),
               "gpu": _library(_GPU_LIBS, "EDGELOOP_LITERT_GPU_LIB")}.get(name)
        if lib:
            return LiteRTBackend(Path(path), threads=threads, delegates=(lib,))
    raise RuntimeBackendError(f"accelerator {accelerator!r} is not available for {fmt} models here",
                              hint="see `edgeloop agent status` for what this device offers", path=str(path))
