"""The model matrix: every variant x runtime x threads x batch, each cell in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BenchmarkError

from .measure import CellSpec

__all__ = ["BenchConfig", "ModelEntry", "entries_from_bundle", "entry_from_model", "entry_from_run", "run_matrix", "Cell",
           "concrete_shape", "MODEL_SUFFIXES", "failed_cells", "usable_cores", "oversubscription"]

MODEL_SUFFIXES = (".onnx", ".tflite")
DYNAMIC_DIM = 64  # a dynamic non-batch dimension of a bare model file is measured at this size

_RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass(frozen=True)
class BenchConfig:
    """How hard to measure.  Defaults follow the issue: >= 200 timed runs per cell."""

    threads: tuple[int, ...] = (1, 2, 4)
    batches: tuple[int, ...] = (1, 8)
    runs: int = 200
    warmup: int = 20
    time_budget_s: float = 10.0
    variants: tuple[str, ...] = ()  # empty: all
    cell_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.threads or any(t < 1 for t in self.threads):
            raise BenchmarkError(f"invalid thread counts {self.threads}", hint="use e.g. --threads 1,2,4")
        if not self.batches or any(b < 1 for b in self.batches):
            raise BenchmarkError(f"invalid batch sizes {self.batches}", hint="use e.g. --batch 1,8")
        if self.runs < 1 or self.warmup < 0:
            raise BenchmarkError("--runs must be >= 1 and --warmup >= 0")


@dataclass(frozen=True)
class ModelEntry:
    """One benchmarkable form of the model."""

    id: str  # variant id, or "pytorch-eager"
    runtime: str
    precision: str
    path: str
    size_bytes: int
    input_shape: tuple[int, ...]  # (C, H, W)
    accuracy: float | None = None
    accuracy_source: str | None = None
    model: str = ""


@dataclass(frozen=True)
class Cell:
    entry: ModelEntry
    threads: int
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"entry": asdict(self.entry), "threads": self.threads, **self.result}


def concrete_shape(shape: Sequence[int], fallback: Sequence[int] = ()) -> tuple[int, ...]:
    """A per-sample input shape with dynamic (-1) dims filled: from ``fallback`` (the bundle's
    preprocessing size, aligned from the end), else :data:`DYNAMIC_DIM`."""
    out = list(int(d) for d in shape)
    fb = list(fallback)
    for i in range(len(out)):
        if out[i] <= 0:
            j = i - (len(out) - len(fb)) if fb else -1
            out[i] = int(fb[j]) if 0 <= j < len(fb) and fb[j] > 0 else DYNAMIC_DIM
    return tuple(out)


def entry_from_model(path: Path, *, input_shape: Sequence[int] = ()) -> ModelEntry:
    """A bare ``.onnx`` / ``.tflite`` file (no bundle): runtime, precision and input shape read from the file."""
    from core.runtime import model_format, open_model

    fmt = model_format(Path(path))
    backend = open_model(path)
    try:
        inp = backend.inputs[0]
        shape = tuple(input_shape) or concrete_shape(inp.shape[1:])
        quant = any(t.quantized for t in (*backend.inputs, *backend.outputs))
    finally:
        backend.close()
    precision = "int8" if quant else ("fp16" if inp.dtype == "float16" else "fp32")
    return ModelEntry(id=f"{fmt}-{precision}", runtime=_RUNTIME_OF_FORMAT[fmt], precision=precision, path=str(path),
                      size_bytes=Path(path).stat().st_size, input_shape=shape, model=Path(path).name)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def oversubscription(threads: Sequence[int], cores: int) -> str | None:
    """A warning when a thread count exceeds the cores: such cells measure contention, not speed-up."""
    over = sorted({t for t in threads if t > cores})
    if not over:
        return None
    return (f"--threads {','.join(map(str, over))} exceeds the {cores} core{'s' if cores > 1 else ''} this machine "
            f"gives the benchmark: those cells measure threads competing for cores, not a speed-up "
            f"(use --threads {','.join(str(t) for t in sorted(set(threads)) if t <= cores) or '1'})")


def failed_cells(cells: Sequence[Cell]) -> list[Cell]:
    """Cells whose measurement failed (their ``result`` has an ``error``)."""
    return [c for c in cells if c.result.get("error")]


def entries_from_bundle(bundle_path: Path, workdir: Path, *, trusted_key: Any = None,
                        only: Sequence[str] = ()) -> list[ModelEntry]:
    """Extract the bundle's variants into ``workdir`` and describe each (accuracy from the export gate)."""
    from core.bundle import open_bundle

    bundle = open_bundle(bundle_path, trusted_key=trusted_key, require_signature=trusted_key is not None)
    m = bundle.manifest
    root = bundle.extract_to(workdir)
    entries = []
    for v in m.variants:
        if only and v.id not in only:
            continue
        entries.append(ModelEntry(
            id=v.id, runtime=_RUNTIME_OF_FORMAT[v.format], precision=v.precision,
            path=str(Path(root) / v.file), size_bytes=v.size,
            input_shape=concrete_shape(m.input.shape[1:], m.preprocessing.size if m.preprocessing else ()),
            accuracy=v.test_accuracy, accuracy_source="export gate (test split)", model=f"{m.name} {m.version}",
        ))
    if only and not entries:
        raise BenchmarkError(f"bundle {bundle_path} has none of the variants {list(only)}",
                             hint=f"choose from {', '.join(v.id for v in m.variants)}")
    return entries


def entry_from_run(run_dir: Path) -> ModelEntry:
    """PyTorch eager for a training run (needs the [train] extra)."""
    from train.api import load_run

    run = load_run(run_dir)
    ckpt = Path(run_dir) / "checkpoint.pt"
    p = run.preprocessing
    acc = run.metrics.get("test", {}).get("accuracy") if isinstance(run.metrics.get("test"), dict) else run.metrics.get("test_accuracy")
    return ModelEntry(id="pytorch-eager", runtime="pytorch", precision="fp32", path=str(run_dir),
                      size_bytes=ckpt.stat().st_size if ckpt.exists() else 0,
                      input_shape=(p.channels, *p.size), accuracy=acc, accuracy_source="training run (test split)",
                      model=str(run.params.get("model", "")))


def _measure_in_subprocess(spec: CellSpec, timeout_s: float) -> dict[str, Any]:
    payload = json.dumps({**asdict(spec), "batches": list(spec.batches), "input_shape": list(spec.input_shape)})
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.measure"], input=payload, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"measuring process exited {proc.returncode}: {tail[0]}"}
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out.pop("spec", None)
    return out


def run_matrix(entries: Sequence[ModelEntry], config: BenchConfig,
               progress: Callable[[str], None] | None = None,
               measure: Callable[[CellSpec, float], dict[str, Any]] = _measure_in_subprocess) -> list[Cell]:
    """Measure every entry at every thread count (batch sizes inside each cell's process)."""
    cells = []
    for entry in entries:
        for threads in config.threads:
            if progress:
                progress(f"{entry.id} ({entry.runtime}) threads={threads}")
            spec = CellSpec(path=entry.path, runtime=entry.runtime, threads=threads, batches=config.batches,
                            input_shape=entry.input_shape, warmup=config.warmup, runs=config.runs,
                            time_budget_s=config.time_budget_s)
            cells.append(Cell(entry=entry, threads=threads, result=measure(spec, config.cell_timeout_s)))
    return cells


def workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edgeloop-bench-")
