"""The ``edgeloop optimize`` report: every variant tried, what it scored, what shipped and why.

Written next to the bundle as JSON (``<bundle>.report.json``) and markdown
(``<bundle>.report.md``) and stored in the bundle's ``metrics.json``.  Variants are
:class:`export.report.VariantReport` rows, as ``edgeloop export`` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cliutil import to_jsonable

from .report import VariantReport

__all__ = ["OptimizeReport", "OPTIMIZE_REPORT_SCHEMA_VERSION"]

OPTIMIZE_REPORT_SCHEMA_VERSION = 1


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} kB"


@dataclass(frozen=True)
class OptimizeReport:
    """Result of :func:`export.optimize.optimize_model`."""

    bundle: Path
    model: str
    name: str
    version: str
    task: str
    metric: str  # what the figures are: "top-1 on 200 labelled inputs in ..."
    reference: float  # the FP32 model's metric (fraction)
    max_drop: float
    variants: tuple[VariantReport, ...]
    signed_by: str | None
    seconds: float
    calibration: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)  # how latencies were measured
    notes: tuple[str, ...] = ()
    schema_version: int = OPTIMIZE_REPORT_SCHEMA_VERSION

    @property
    def kept(self) -> tuple[VariantReport, ...]:
        return tuple(v for v in self.variants if v.kept)

    def ratios(self, v: VariantReport) -> tuple[float | None, float | None]:
        """(size, latency) of ``v`` relative to the FP32 reference."""
        ref = self.variants[0]
        size = None if not (v.size_bytes and ref.size_bytes) else v.size_bytes / ref.size_bytes
        lat = None if not (v.latency_ms and ref.latency_ms) else v.latency_ms / ref.latency_ms
        return size, lat

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_jsonable(self)
        for row, v in zip(data["variants"], self.variants, strict=True):
            row.pop("file", None)
            row["size_ratio"], row["latency_ratio"] = self.ratios(v)
        data["kept"] = [v.id for v in self.kept]
        data["excluded"] = {v.id: v.reason for v in self.variants if not v.kept}
        return data

    def _rows(self) -> list[list[str]]:
        rows = [["variant", "kept", "metric %", "drop pp", "size", "size x", "ms", "ms x", "float nodes", "note"]]
        for v in self.variants:
            size, lat = self.ratios(v)
            rows.append([v.id, "yes" if v.kept else "NO", "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}",
                         "-" if v.drop_pp is None else f"{v.drop_pp:.2f}", _kb(v.size_bytes),
                         "-" if size is None else f"{size:.2f}", "-" if v.latency_ms is None else f"{v.latency_ms:.3f}",
                         "-" if lat is None else f"{lat:.2f}", str(len(v.float_nodes)), v.reason])
        return rows

    def _head(self) -> str:
        signed = "signed " + self.signed_by if self.signed_by else "unsigned"
        return (f"{self.model} -> {self.bundle} ({self.name} {self.version}, {self.task}, {signed})\n"
                f"metric: {self.metric}; FP32 {100 * self.reference:.2f}%, budget {self.max_drop} pp; "
                f"{self.seconds:.1f} s")

    def table(self) -> str:
        """Plain text for the terminal."""
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join([self._head(), *lines, *(f"  {n}" for n in self.notes)])

    def markdown(self) -> str:
        rows = self._rows()
        out = [f"# edgeloop optimize: {self.model}", "", "```", self._head(), "```", "",
               "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
        out += ["", f"Latency: {self.latency.get('method', '-')}.", f"Calibration: {self.calibration}."]
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"
