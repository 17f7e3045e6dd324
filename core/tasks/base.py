"""What every task shares: turning a request into the model's input tensors, results, state.

A task sits between the runtime (``core.runtime``: named tensors in, named tensors out)
and the agent's answers.  :meth:`Task.prepare` turns one input -- a raw image for an
image model, an array for a tensor model -- into the model's own feeds; :meth:`Task.run`
resets a stateful model (unless the bundle declares it streaming), runs it and hands the
outputs to the task's :meth:`Task.decode`; :meth:`Task.drift_features` says what the
drift detector gets (``core.drift_features.DriftFeatures``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..manifest import Manifest, Preprocessing, TensorSpec
from ..preprocess import Geometry, Preprocessor, prepare_images, to_model_dtype
from ..runtime import Backend, dequantize, quantize, shape_text

__all__ = ["Task", "Prepared", "TaskResult", "Detection", "tensor_feed"]


@dataclass(frozen=True)
class Detection:
    """One detected object: box ``x1, y1, x2, y2`` in original-image pixels, class and score."""

    box: tuple[float, float, float, float]
    index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"box": [round(float(v), 2) for v in self.box], "index": self.index, "label": self.label,
                "score": round(float(self.score), 5)}


@dataclass(frozen=True)
class TaskResult:
    """A task's answer for one input.

    Every task fills ``label`` / ``index`` / ``confidence`` (classification: the top
    class; detection: the best-scoring detection, ``index`` -1 and confidence 0 when
    there is none; tensor: empty, or the score when the bundle defines one).
    """

    kind: str
    label: str = ""
    index: int = -1
    confidence: float = 0.0
    probs: Sequence[float] = ()  # classification: a core.tasks.probs.Probs (floats made on first read)
    detections: tuple[Detection, ...] = ()
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    score: float | None = None
    # classification: the (1, K) float32 class scores ``probs`` was made from (the drift monitor keeps them)
    scores: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.kind, "label": self.label, "index": self.index,
                             "confidence": self.confidence}
        if self.kind == "classification":
            d["probs"] = list(self.probs)
        if self.kind == "detection":
            d["detections"] = [det.to_dict() for det in self.detections]
        if self.kind == "tensor":
            d["outputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "data": v.tolist()}
                            for k, v in self.outputs.items()}
            d["score"] = self.score
        return d


@dataclass(frozen=True)
class Prepared:
    """One input made ready: the model feeds, the float tensor drift sees, the image geometry."""

    feeds: dict[str, np.ndarray]
    x: np.ndarray  # float32 batch of 1 (preprocessed image, or the real-valued tensor)
    geometry: Geometry | None = None
    image: np.ndarray | None = None  # the raw image (for sampling), None for tensor input
    trusted: bool = False  # feeds built to the model's own spec: the runtime need not check them again


def _input_spec(manifest: Manifest, backend: Backend) -> TensorSpec:
    """The variant's own first input (dtype, quantization), named as the backend names it."""
    return backend.inputs[0]


def tensor_feed(arr: Any, spec: TensorSpec, what: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """An array for a tensor model -> (feed in the model's dtype, real-valued float32 copy).

    A single sample may leave out the batch axis, and a flat array with the model's
    element count is reshaped (``[1960]`` or ``[49, 40]`` for ``[1, 1960]``).  Floats
    go into a quantized input through its scale / zero point (half away from zero);
    integers in the model's own dtype go in unchanged.
    """
    if isinstance(arr, (bytes, str)):
        raise InputError(f"{what}: expected an array, got {type(arr).__name__}", hint="send .npy or a JSON array")
    a = np.asarray(arr)
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise InputError(f"{what} has dtype {a.dtype}; expected numbers", hint="send a numeric array")
    want = tuple(spec.shape)
    per_sample = want[1:]
    fixed = all(d > 0 for d in per_sample)
    if a.ndim == len(want) - 1:
        a = a[None]
    if fixed and (a.ndim != len(want) or tuple(a.shape[1:]) != per_sample):
        count = int(np.prod(per_sample))
        if a.size % count == 0 and a.size > 0:
            a = a.reshape(a.size // count, *per_sample)
    if a.ndim != len(want) or any(d > 0 and g != d for g, d in zip(a.shape[1:], per_sample, strict=False)):
        raise InputError(f"{what} has shape {'x'.join(map(str, np.shape(arr))) or 'scalar'}; the model takes "
                         f"{shape_text(want)} ({spec.dtype})", hint="send one sample of the model's input shape",
                         expected=shape_text(want), got="x".join(map(str, np.shape(arr))))
    dt = np.dtype(spec.dtype)
    if a.dtype == dt:
        real = dequantize(a, spec) if spec.quantized else a.astype(np.float32)
        return np.ascontiguousarray(a), real
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise InputError(f"{what} holds NaN or infinity", hint="send finite values")
    if dt.kind in "iu" and a.dtype.kind == "f":
        if spec.scale is None:
            raise InputError(f"{what} is {a.dtype}; the model takes {spec.dtype} without quantization parameters",
                             hint=f"send {spec.dtype} values", expected=spec.dtype, got=str(a.dtype))
        return quantize(a, spec), a.astype(np.float32)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise InputError(f"{what} has values in [{a.min()}, {a.max()}], outside {spec.dtype}",
                             hint=f"send {spec.dtype} values", expected=spec.dtype, got=str(a.dtype))
        q = a.astype(dt)
        return q, dequantize(q, spec) if spec.quantized else q.astype(np.float32)
    return a.astype(dt), a.astype(np.float32)


def _checked_image(item: Any) -> np.ndarray:
    """One image as an array of pixels (H, W) or (H, W, C), C in 1, 3, 4; ``InputError`` otherwise."""
    if isinstance(item, (bytes, str)):
        raise InputError(f"predict() takes an image array, got {type(item).__name__}",
                         hint="load files with core.imageio.load_image()")
    arr = np.asarray(item)
    if arr.dtype == object or arr.dtype.kind not in "uif":
        raise InputError(f"image has dtype {arr.dtype}; expected uint8 pixels (H, W) or (H, W, C)",
                         hint="convert the image to uint8")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or min(arr.shape[:2]) < 1:
        raise InputError(f"image has shape {tuple(arr.shape)}; expected (H, W) or (H, W, C) with C in 1, 3, 4",
                         hint="pass one image")
    return arr


class Task:
    """Base of the task classes (``core.tasks.TASKS``)."""

    kind = "task"
    #: a classifier's activation (``Classification.scores_to_probs``): ``drift_arrays`` then gives the raw
    #: class scores in the probabilities' place and the drift monitor converts a window's rows at once
    scores_to_probs: Callable[[np.ndarray], np.ndarray] | None = None

    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.manifest = manifest
        self.backend = backend
        self.options: dict[str, Any] = dict(manifest.task.options)
        self.labels = tuple(manifest.labels)
        self.pre: Preprocessing | None = manifest.preprocessing
        self.input: TensorSpec = _input_spec(manifest, backend)
        self.streaming = bool(manifest.task.streaming)
        self._serving: Preprocessor | None = None  # prepare_serving's buffer, made on first use
        self._trusted = False
        self._float_input = np.dtype(self.input.dtype) == np.float32

    def _trusts(self, pre: Preprocessing) -> bool:
        """Whether image feeds of ``pre`` match the model's only input (dtype by construction, shape here)."""
        want = tuple(self.input.shape)
        h, w = pre.size
        got = {"NCHW": (1, pre.channels, h, w), "NHWC": (1, h, w, pre.channels), "NHW": (1, h, w)}[pre.layout]
        return len(self.backend.inputs) == 1 and len(want) == len(got) and all(
            d < 0 or d == g for d, g in zip(want, got, strict=True))

    # -- input ----------------------------------------------------------------------------
    @property
    def takes_images(self) -> bool:
        return self.pre is not None

    def prepare(self, item: Any) -> Prepared:
        """One raw image (image models) or one array (tensor input) -> :class:`Prepared`."""
        if self.pre is None:
            feed, real = tensor_feed(item, self.input)
            return Prepared({self.input.name: feed}, real)
        arr = _checked_image(item)
        x, geos = prepare_images([arr], self.pre)
        feed = to_model_dtype(x, self.input, self.pre)
        return Prepared({self.input.name: feed}, x, geos[0], arr)

    def prepare_serving(self, item: Any) -> Prepared:
        """:meth:`prepare` for the agent's serving path: same checks, same values, fewer copies.

        An image goes through a :class:`~core.preprocess.Preprocessor` (one pass into a
        buffer allocated once), and the feeds are marked ``trusted`` when the
        preprocessing's shape is the model input's, so :meth:`run` skips the runtime's
        re-checks.  The buffer is reused by the next call: callers serialise (the agent's
        pipeline lock) and use ``Prepared.x`` before preparing the next input.
        """
        if self.pre is None:
            return self.prepare(item)
        arr = _checked_image(item)
        pre = self._serving
        if pre is None:
            pre = self._serving = Preprocessor(self.pre, model_input=None if self._float_input else self.input)
            self._trusted = self._trusts(self.pre)
        x, geo = pre(arr)
        if self._float_input:  # float32 goes in as it is
            feed = x
        else:  # an integer input from the preprocessor's table, or cast / quantized from x
            feed = pre.feed(arr)
            if feed is None:
                feed = to_model_dtype(x, self.input, self.pre)
        return Prepared({self.input.name: feed}, x, geo, arr, self._trusted)

    # -- running ----------------------------------------------------------------------------
    def run(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """Reset a stateful model (unless streaming), run it; every output dequantized to float."""
        if self.backend.stateful and not self.streaming:
            self.backend.reset_state()
        return self.backend.run_trusted(prepared.feeds) if prepared.trusted else self.backend.run_outputs(prepared.feeds)

    def decode(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> TaskResult:
        raise NotImplementedError

    def predict(self, item: Any) -> TaskResult:
        """prepare -> run -> decode, for callers that need no drift or timing."""
        p = self.prepare(item)
        return self.decode(self.run(p), p)

    def drift_features(self, prepared: Prepared, outputs: dict[str, np.ndarray], result: TaskResult) -> Any:
        """``DriftFeatures`` for one prediction (batch of 1)."""
        raise NotImplementedError

    def drift_arrays(self, prepared: Prepared, outputs: dict[str, np.ndarray],
                     result: TaskResult) -> tuple[np.ndarray | None, ...]:
        """:meth:`drift_features` as the arrays ``(inputs, probs, embedding, outputs)`` (None where absent),
        what ``DriftMonitor.append`` takes without building a ``DriftFeatures`` per inference (with
        :attr:`scores_to_probs` set, the raw class scores stand where the probabilities are)."""
        f = self.drift_features(prepared, outputs, result)
        return f.inputs, f.probs, f.embedding, f.outputs

    def drift_input(self, prepared: Prepared) -> np.ndarray:
        """The input as the drift detector sees it: NCHW float images, (1, ...) tensors."""
        x = prepared.x
        if self.pre is not None:
            if self.pre.layout == "NHWC":
                x = x.transpose(0, 3, 1, 2)
            elif self.pre.layout == "NHW":
                x = x[:, None]
        if x.dtype == np.float32 and x.flags.c_contiguous:
            return x
        return np.ascontiguousarray(x, dtype=np.float32)
