"""The export report: what was built, what was measured, what shipped and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cliutil import to_jsonable

__all__ = ["VariantReport", "ExportReport", "REPORT_SCHEMA_VERSION"]

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VariantReport:
    """One candidate variant: its figures and whether the gate kept it."""

    id: str
    format: str
    precision: str
    kept: bool
    reason: str
    accuracy: float | None = None  # test split, in the device runtime (fraction)
    drop_pp: float | None = None  # percentage points below the FP32 ONNX reference
    size_bytes: int | None = None
    latency_ms: float | None = None  # batch 1, one thread, at export
    float_nodes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float | None = None  # logits vs PyTorch (FP32 variants) on the reference inputs
    seconds: float = 0.0  # conversion + gate
    attempts: tuple[dict[str, Any], ...] = ()
    file: Path | None = None  # working file (not in the JSON; the bundle holds the model)


@dataclass(frozen=True)
class ExportReport:
    """Result of :func:`export.pipeline.export_run`."""

    bundle: Path
    name: str
    version: str
    run_id: str | None
    reference_accuracy: float  # FP32 ONNX test accuracy (fraction)
    torch_accuracy: float | None
    max_drop: float
    variants: tuple[VariantReport, ...]
    signed_by: str | None
    seconds: float
    onnx_max_abs_diff: float | None
    calibration: dict[str, Any] = field(default_factory=dict)
    test_samples: int = 0
    schema_version: int = REPORT_SCHEMA_VERSION

    @property
    def kept(self) -> tuple[VariantReport, ...]:
        return tuple(v for v in self.variants if v.kept)

    @property
    def excluded(self) -> tuple[VariantReport, ...]:
        return tuple(v for v in self.variants if not v.kept)

    def variant(self, variant_id: str) -> VariantReport:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_jsonable(self)
        for v in data["variants"]:
            v.pop("file", None)
        data["kept"] = [v.id for v in self.kept]
        data["excluded"] = {v.id: v.reason for v in self.excluded}
        return data

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [["variant", "kept", "acc %", "drop pp", "size", "ms", "float nodes", "note"]]
        for v in self.variants:
            rows.append([v.id, "yes" if v.kept else "NO",
                         "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}",
                         "-" if v.drop_pp is None else f"{v.drop_pp:.2f}",
                         "-" if v.size_bytes is None else f"{v.size_bytes / 1024:.1f} kB",
                         "-" if v.latency_ms is None else f"{v.latency_ms:.3f}",
                         str(len(v.float_nodes)), v.reason])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        head = (f"{self.name} {self.version} -> {self.bundle} ({'signed ' + self.signed_by if self.signed_by else 'unsigned'})\n"
                f"reference (ONNX FP32) test accuracy {100 * self.reference_accuracy:.2f}% on {self.test_samples} "
                f"images, budget {self.max_drop} pp, {self.seconds:.1f} s")
        return head + "\n" + "\n".join(lines)
