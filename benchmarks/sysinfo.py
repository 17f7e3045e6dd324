"""What a benchmark ran on: CPU, cores, library versions, the exact command."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import sys
from typing import Any

__all__ = ["system_info"]

_LIBS = ("numpy", "onnxruntime", "ai-edge-litert", "tflite-runtime", "torch", "onnx", "paho-mqtt", "edgeloop")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    interesting = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "neon", "asimd", "asimddp"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(interesting & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def system_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Machine, versions and command, recorded with every benchmark result."""
    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else ["edgeloop", *sys.argv[1:]])),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
