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
    "TensorSpec",
    "InputSpec",
    "OutputSpec",
    "TaskSpec",
    "TASK_KINDS",
    "TENSOR_DTYPES",
    "RESIZE_MODES",
    "FIT_MODES",
    "INPUT_LAYOUTS",
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
TASK_KINDS = ("classification", "detection", "tensor")
TENSOR_DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
# bilinear: antialiased triangle filter (PIL BILINEAR); area: antialiased box (PIL BOX, OpenCV INTER_AREA
# when shrinking); bilinear-cv: no antialias, half-pixel centres (OpenCV INTER_LINEAR, TFLite
# resize_bilinear(half_pixel_centers=True)); nearest: PIL NEAREST (source pixel floor((i + 0.5) * scale)).
RESIZE_MODES = ("bilinear", "area", "bilinear-cv", "nearest")
# stretch: to size, aspect not kept; center-crop: shorter side to size then the centre; letterbox:
# aspect kept, padded with pad_value (anchor center or top-left); height: PaddleOCR text lines
# (height to size[0], width ceil(h-scaled) capped at size[1], padded on the right).
FIT_MODES = ("stretch", "center-crop", "letterbox", "height")
# NCHW / NHWC images; NHW: an image without a channel axis (gray, e.g. [N, 28, 28]); none: not an image.
INPUT_LAYOUTS = ("NCHW", "NHWC", "NHW", "none")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise BundleError(f"invalid manifest: {what}", hint="rebuild the bundle with `edgeloop export` or `edgeloop bundle create`")


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the model's input tensor, exactly.

    raw uint8 image (H, W) or (H, W, C) -> convert to ``channels`` (1: luminance,
    3: RGB, gray replicated) -> fit into ``size`` (height, width) with ``fit`` and
    ``resize`` interpolation -> float32 * ``scale`` -> (x - mean) / std per channel ->
    ``channel_order`` -> ``layout`` -> the model input's dtype (see ``core.preprocess``).
    Every field after ``channel_order`` is new in edgeloop 0.2 and defaults to the old
    behaviour, so old manifests mean what they meant.
    """

    size: tuple[int, int]
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    resize: str = "bilinear"
    layout: str = "NCHW"
    channel_order: str = "RGB"
    fit: str = "stretch"
    anchor: str = "center"  # letterbox placement: center | top-left
    pad_value: float = 0.0  # raw pixel value of letterbox / padding areas (before scaling)
    crop_fraction: float = 1.0  # center-crop: the crop is this fraction of the resized shorter side

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        _require(len(self.size) == 2 and all(s > 0 for s in self.size), f"preprocessing.size {self.size}")
        _require(self.channels in (1, 3), f"preprocessing.channels {self.channels} (must be 1 or 3)")
        _require(len(self.mean) == self.channels, "preprocessing.mean must have one value per channel")
        _require(len(self.std) == self.channels and all(s > 0 for s in self.std), "preprocessing.std must be positive, one per channel")
        _require(self.resize in RESIZE_MODES, f"preprocessing.resize {self.resize!r} (one of {', '.join(RESIZE_MODES)})")
        _require(self.layout in ("NCHW", "NHWC", "NHW"), f"preprocessing.layout {self.layout!r} (NCHW, NHWC or NHW)")
        _require(self.layout != "NHW" or self.channels == 1, "preprocessing.layout NHW needs channels 1")
        _require(self.channel_order in ("RGB", "BGR", "GRAY"), f"preprocessing.channel_order {self.channel_order!r}")
        _require(self.fit in FIT_MODES, f"preprocessing.fit {self.fit!r} (one of {', '.join(FIT_MODES)})")
        _require(self.anchor in ("center", "top-left"), f"preprocessing.anchor {self.anchor!r}")
        _require(0.0 < self.crop_fraction <= 1.0, f"preprocessing.crop_fraction {self.crop_fraction}")
        _require(self.scale > 0, f"preprocessing.scale {self.scale}")


def _member_path_ok(name: str) -> bool:
    return bool(name) and not name.startswith("/") and ".." not in name.split("/")


def _quant_ok(scale: float | None, zero_point: int | None, dtype: str, what: str) -> None:
    if scale is None:
        return
    _require(scale > 0 and scale == scale, f"{what}: quantization scale {scale} must be positive")
    if dtype in ("uint8", "int8") and zero_point is not None:
        lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
        _require(lo <= zero_point <= hi, f"{what}: zero point {zero_point} outside {dtype}")


@dataclass(frozen=True)
class TensorSpec:
    """One named model tensor as the model file declares it.

    ``shape`` uses -1 for a dynamic dimension; ``scale`` / ``zero_point`` are the
    (per-tensor) quantization of an integer tensor, real = (q - zero_point) * scale;
    ``meaning`` says what an output holds: ``logits``, ``probabilities``, ``embedding``,
    ``boxes``, ``classes``, ``scores``, ``count``, ``raw-detections`` or ``tensor``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    scale: float | None = None
    zero_point: int | None = None
    meaning: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _require(bool(self.name), "tensor name is empty")
        _require(self.dtype in TENSOR_DTYPES, f"tensor {self.name}: dtype {self.dtype!r}")
        _quant_ok(self.scale, self.zero_point, self.dtype, f"tensor {self.name}")

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype in ("uint8", "int8", "int16")


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, shape (-1 = dynamic), dtype, layout and quantization.

    ``layout``: ``NCHW`` / ``NHWC`` / ``NHW`` for images, ``none`` for a raw tensor
    (features, sensor windows).  ``extra`` lists further inputs of multi-input models.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "NCHW"
    scale: float | None = None
    zero_point: int | None = None
    extra: tuple[TensorSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "extra", tuple(t if isinstance(t, TensorSpec) else TensorSpec(**t)
                                                for t in self.extra))
        _require(bool(self.name), "input.name is empty")
        _require(len(self.shape) >= 1, "input.shape is empty")
        _require(self.dtype in TENSOR_DTYPES, f"input.dtype {self.dtype!r}")
        _require(self.layout in INPUT_LAYOUTS, f"input.layout {self.layout!r} (one of {', '.join(INPUT_LAYOUTS)})")
        want = {"NCHW": 4, "NHWC": 4, "NHW": 3}.get(self.layout)
        _require(want is None or len(self.shape) == want, f"input.shape {list(self.shape)} is not {self.layout}")
        _quant_ok(self.scale, self.zero_point, self.dtype, "input")

    @property
    def tensor(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype, self.scale, self.zero_point)


@dataclass(frozen=True)
class OutputSpec:
    """The model's outputs.

    ``tensors`` lists every named output with its shape, dtype, quantization and
    meaning (new bundles).  ``logits`` / ``embedding`` name the classifier outputs;
    old bundles have only these and mean "logits, softmax applied by the agent".
    """

    logits: str = "logits"
    embedding: str | None = "embedding"
    embedding_dim: int | None = None
    tensors: tuple[TensorSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(t if isinstance(t, TensorSpec) else TensorSpec(**t)
                                                  for t in self.tensors))
        names = [t.name for t in self.tensors]
        _require(len(set(names)) == len(names), f"duplicate output names {names}")

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)


@dataclass(frozen=True)
class TaskSpec:
    """What the outputs mean and how the agent turns them into an answer (``core.tasks``).

    ``kind``: ``classification`` | ``detection`` | ``tensor``.  ``options`` are the
    task's own settings (``core.tasks.<kind>`` documents them: e.g. a classifier's
    ``activation``, a detector's ``decoder``, ``box_format``, thresholds).
    ``streaming``: a stateful model keeps its state between predictions (otherwise it
    is reset before each one).
    """

    kind: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)
    streaming: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in TASK_KINDS, f"task.kind {self.kind!r} (one of {', '.join(TASK_KINDS)})")


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
        _require(_member_path_ok(self.file), f"variant {self.id}: file {self.file!r}")


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
    preprocessing: Preprocessing | None  # None: the input is a raw tensor, not an image
    variants: tuple[Variant, ...]
    members: dict[str, str] = field(default_factory=dict)
    reference_accuracy: float | None = None  # FP32 test accuracy (fraction)
    accuracy_budget: float = 0.5  # max drop in percentage points
    baseline: str | None = "baseline.npz"
    health: str | None = "reference.npz"
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    task: TaskSpec = field(default_factory=TaskSpec)
    # further drift baselines, one per domain the model serves (name -> member, e.g. "baselines/adapted.npz");
    # ``baseline`` is the default domain.  Left out of to_dict when empty: bundles without it stay as they were.
    drift_domains: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "variants", tuple(self.variants))
        _require(self.schema_version == MANIFEST_SCHEMA_VERSION,
                 f"schema_version {self.schema_version} (this agent reads {MANIFEST_SCHEMA_VERSION})")
        _require(bool(self.name) and bool(self.version), "name and version are required")
        _require(self.task.kind != "classification" or len(self.labels) >= 2,
                 "a classifier needs at least two labels")
        _require(self.preprocessing is not None or self.input.layout == "none",
                 f"an image input ({self.input.layout}) needs preprocessing")
        _require(len(self.variants) >= 1, "at least one variant is required")
        ids = [v.id for v in self.variants]
        _require(len(set(ids)) == len(ids), f"duplicate variant ids {ids}")
        object.__setattr__(self, "drift_domains", {str(k): str(v) for k, v in dict(self.drift_domains).items()})
        for dom, member in self.drift_domains.items():
            _require(bool(dom) and dom != "default", f"drift_domains: domain name {dom!r} (not empty, not 'default')")
            _require(_member_path_ok(member) and member != self.baseline,
                     f"drift_domains[{dom!r}]: member {member!r}")
        _require(len(set(self.drift_domains.values())) == len(self.drift_domains),
                 "drift_domains: two domains name the same member")

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BundleError(f"bundle {self.name} {self.version} has no variant {variant_id!r}",
                          hint=f"choose one of {', '.join(v.id for v in self.variants)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.drift_domains:  # optional: absent, so a manifest without domains is what it was before
            del d["drift_domains"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            d = dict(data)
            d["input"] = InputSpec(**d["input"])
            d["outputs"] = OutputSpec(**d.get("outputs", {}))
            pre = d.get("preprocessing")
            d["preprocessing"] = None if pre is None else Preprocessing(**pre)
            d["task"] = TaskSpec(**d.get("task", {}))
            d["variants"] = tuple(Variant(**v) for v in d["variants"])
            d["lineage"] = Lineage(**d.get("lineage", {}))
            return cls(**d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid manifest: {exc}", member="manifest.json") from exc
