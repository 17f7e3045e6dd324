"""The bundle manifest: what a device needs to know about a model version.

Frozen dataclasses, validated on construction, round-tripping through JSON with
``to_dict`` / ``from_dict``.  ``core.protocol`` re-exports these: the manifest is
part of the wire protocol.  ``docs/bundle.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import BundleError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "Preprocessing",
    "InputSpec",
    "OutputSpec",
    "Variant",
    "Lineage",
    "Manifest",
    "VARIANT_FORMATS",
    "VARIANT_PRECISIONS",
]

MANIFEST_SCHEMA_VERSION = 1
VARIANT_FORMATS = ("onnx", "tflite")
# onnx: fp32, fp16, int8-static (QDQ), int8-dynamic; tflite: fp32, int8 (full integer)
VARIANT_PRECISIONS = ("fp32", "fp16", "int8-static", "int8-dynamic", "int8")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise BundleError(f"invalid manifest: {what}", hint="rebuild the bundle with `edgeloop export` or `edgeloop bundle create`")


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the model's input tensor, exactly.

    raw uint8 image (H, W) or (H, W, C) -> convert to ``channels`` (1: luminance,
    3: RGB, gray replicated) -> resize to ``size`` (height, width) with ``resize``
    interpolation -> float32 * ``scale`` -> (x - mean) / std per channel -> ``layout``.
    """

    size: tuple[int, int]
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    resize: str = "bilinear"
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        _require(len(self.size) == 2 and all(s > 0 for s in self.size), f"preprocessing.size {self.size}")
        _require(self.channels in (1, 3), f"preprocessing.channels {self.channels} (must be 1 or 3)")
        _require(len(self.mean) == self.channels, "preprocessing.mean must have one value per channel")
        _require(len(self.std) == self.channels and all(s > 0 for s in self.std), "preprocessing.std must be positive, one per channel")
        _require(self.resize in ("bilinear", "nearest"), f"preprocessing.resize {self.resize!r}")
        _require(self.layout in ("NCHW", "NHWC"), f"preprocessing.layout {self.layout!r}")
        _require(self.channel_order in ("RGB", "BGR"), f"preprocessing.channel_order {self.channel_order!r}")


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, shape (batch dimension -1 = dynamic), dtype and layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _require(bool(self.name), "input.name is empty")
        _require(len(self.shape) == 4, f"input.shape {self.shape} must be 4-d")


@dataclass(frozen=True)
class OutputSpec:
    """Output names: logits always; the penultimate embedding when the model has one."""

    logits: str = "logits"
    embedding: str | None = "embedding"
    embedding_dim: int | None = None


@dataclass(frozen=True)
class Variant:
    """One runnable form of the model inside the bundle."""

    id: str  # e.g. "onnx-fp32", "onnx-int8-static", "tflite-int8"
    format: str  # "onnx" | "tflite"
    precision: str  # see VARIANT_PRECISIONS
    file: str  # member path, e.g. "models/onnx-int8-static.onnx"
    sha256: str = ""
    size: int = 0
    test_accuracy: float | None = None
    accuracy_drop: float | None = None  # percentage points below the FP32 reference
    latency_ms: float | None = None  # batch 1, one thread, measured at export
    float_nodes: tuple[str, ...] = ()  # nodes the accuracy gate kept in float
    options: dict[str, Any] = field(default_factory=dict)  # e.g. calibration method, reduce_range

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_nodes", tuple(self.float_nodes))
        _require(self.format in VARIANT_FORMATS, f"variant {self.id}: format {self.format!r}")
        _require(self.precision in VARIANT_PRECISIONS, f"variant {self.id}: precision {self.precision!r}")
        _require(bool(self.file) and not self.file.startswith("/") and ".." not in self.file.split("/"),
                 f"variant {self.id}: file {self.file!r}")


@dataclass(frozen=True)
class Lineage:
    """Where this version came from."""

    run_id: str | None = None
    data_hash: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    parent_version: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle.  ``members`` maps every other member to its sha256."""

    name: str
    version: str
    created: str
    labels: tuple[str, ...]
    input: InputSpec
    outputs: OutputSpec
    preprocessing: Preprocessing
    variants: tuple[Variant, ...]
    members: dict[str, str] = field(default_factory=dict)
    reference_accuracy: float | None = None  # FP32 test accuracy (fraction)
    accuracy_budget: float = 0.5  # max drop in percentage points
    baseline: str | None = "baseline.npz"
    health: str | None = "reference.npz"
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "variants", tuple(self.variants))
        _require(self.schema_version == MANIFEST_SCHEMA_VERSION,
                 f"schema_version {self.schema_version} (this agent reads {MANIFEST_SCHEMA_VERSION})")
        _require(bool(self.name) and bool(self.version), "name and version are required")
        _require(len(self.labels) >= 2, "at least two labels are required")
        _require(len(self.variants) >= 1, "at least one variant is required")
        ids = [v.id for v in self.variants]
        _require(len(set(ids)) == len(ids), f"duplicate variant ids {ids}")

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BundleError(f"bundle {self.name} {self.version} has no variant {variant_id!r}",
                          hint=f"choose one of {', '.join(v.id for v in self.variants)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            d = dict(data)
            d["input"] = InputSpec(**d["input"])
            d["outputs"] = OutputSpec(**d.get("outputs", {}))
            d["preprocessing"] = Preprocessing(**d["preprocessing"])
            d["variants"] = tuple(Variant(**v) for v in d["variants"])
            d["lineage"] = Lineage(**d.get("lineage", {}))
            return cls(**d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid manifest: {exc}", member="manifest.json") from exc
