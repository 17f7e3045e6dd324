"""``edgeloop bundle create``: bundle your own ``.onnx`` / ``.tflite`` model (bring your own model).

The model file says what it can (``export.byom_inspect``): the input's name, shape,
dtype and quantization, a layout guess, labels embedded in TFLite metadata, whether an
output already holds probabilities, an SSD post-processing op.  The flags say the rest
and override any guess: task, preprocessing (layout, channel order, value range,
mean/std, resize, fit), output meaning, detector decoder and thresholds.

The bundle always carries a health-check reference (``reference.npz``: two synthetic
inputs and the outputs this model gave them), so ``agent install`` checks the model on
the device.  A drift baseline is added only with ``--baseline-dir`` and only when the
agent will use it: it is calibrated from the task's own drift features
(``Task.drift_features``) and fed back through a ``DriftMonitor`` before it is packed.

A model edgeloop cannot run fails here, in one line naming the model, the reason and
what to try; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.cliutil import emit
from core.errors import ConfigError, DataError, EdgeloopError, ExportError
from core.manifest import (
    InputSpec,
    Lineage,
    Manifest,
    OutputSpec,
    Preprocessing,
    TaskSpec,
    TensorSpec,
    Variant,
)
from core.runtime import Backend, model_format, open_model

from .byom_inspect import (
    ModelFacts,
    guess_layout,
    inspect_model,
    looks_like_probabilities,
    probe_outputs,
    ssd_meanings,
)
from .pack import load_signing_key, pack_bundle, reference_npz, utc_now

__all__ = ["create_bundle", "detect_precision", "IMAGE_SUFFIXES", "RANGES", "build_manifest_parts", "ModelPlan",
           "plan_model", "synthetic_inputs", "health_reference", "drift_baseline", "open_or_fail"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".npy", ".bmp")
#: --range -> (scale, mean, std) applied as (x * scale - mean) / std: unit 0..1, pixel 0..255, signed -1..1
RANGES = {"unit": (1 / 255, 0.0, 1.0), "pixel": (1.0, 0.0, 1.0), "signed": (1 / 255, 0.5, 0.5)}


def detect_precision(path: Path, fmt: str) -> str:
    """``fp32`` / ``fp16`` / ``int8-static`` / ``int8-dynamic`` (ONNX) or ``fp32`` / ``int8`` (TFLite)."""
    if fmt == "tflite":
        b = open_model(path)
        quant = any(t.quantized for t in (*b.inputs, *b.outputs)) or b.inputs[0].dtype != "float32"
        b.close()
        return "int8" if quant else "fp32"
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" in ops or "QLinearConv" in ops:
        return "int8-static"
    if ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
        return "int8-dynamic"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _read_labels(path: Path) -> tuple[str, ...]:
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}", key="labels", path=str(path)) from exc


# ------------------------------------------------------------------------------------ planning


class ModelPlan:
    """Everything ``bundle create`` decided about a model: input, preprocessing, outputs, task."""

    def __init__(self, input: InputSpec, pre: Preprocessing | None, outputs: OutputSpec, task: TaskSpec,
                 labels: tuple[str, ...], notes: list[str]) -> None:
        self.input, self.pre, self.outputs, self.task, self.labels, self.notes = input, pre, outputs, task, labels, notes


def _opt(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def _preprocessing(args: argparse.Namespace, inp: TensorSpec, layout: str) -> Preprocessing:
    shape = inp.shape
    if layout == "NCHW":
        c, hw = shape[1], shape[2:4]
    elif layout == "NHWC":
        c, hw = shape[3], shape[1:3]
    else:  # NHW
        c, hw = 1, shape[1:3]
    size = tuple(args.size) if args.size else hw
    if any(int(d) <= 0 for d in size):
        raise ConfigError(f"the model's input {list(shape)} has a dynamic height/width", hint="give --size H W")
    if args.size and all(d > 0 for d in hw) and tuple(args.size) != tuple(hw):
        raise ConfigError(f"--size {list(args.size)} but the model takes {list(hw)} (height, width)",
                          hint="drop --size or give the model's own")
    channels = int(args.channels) if args.channels else int(c)
    if c > 0 and channels != c:
        raise ConfigError(f"--channels {channels} but the model's {layout} input {list(shape)} has {c}",
                          hint="drop --channels")
    if channels not in (1, 3):
        raise ConfigError(f"the model's input {list(shape)} has {channels} channels; images have 1 or 3",
                          hint="use --task tensor for non-image inputs")
    default_range = "pixel" if inp.dtype == "uint8" else "unit"
    scale, m0, s0 = RANGES[_opt(args, "range", default_range)]
    mean = tuple(args.mean) if args.mean else (m0,) * channels
    std = tuple(args.std) if args.std else (s0,) * channels
    if len(mean) == 1 and channels == 3:
        mean = mean * 3
    if len(std) == 1 and channels == 3:
        std = std * 3
    order = _opt(args, "channel_order", "GRAY" if channels == 1 else "RGB")
    if (order == "GRAY") != (channels == 1):
        raise ConfigError(f"--channel-order {order} does not fit a {channels}-channel input",
                          hint="GRAY for 1 channel, RGB or BGR for 3")
    return Preprocessing(size=size, channels=channels, mean=mean, std=std, scale=scale,
                         resize=_opt(args, "resize", "bilinear"), layout=layout, channel_order=order,
                         fit=_opt(args, "fit", "stretch"), anchor=_opt(args, "anchor", "center"),
                         pad_value=float(_opt(args, "pad_value", 0.0)),
                         crop_fraction=float(_opt(args, "crop_fraction", 1.0)))


def _task_kind(args: argparse.Namespace, facts: ModelFacts, labels: tuple[str, ...]) -> str:
    if args.task:
        return str(args.task)
    if "TFLite_Detection_PostProcess" in facts.ops or args.detector:
        return "detection"
    out = facts.outputs[0]
    if labels and out.shape and out.shape[-1] == len(labels) and len(out.shape) <= 2:
        return "classification"
    return "tensor"


def plan_model(args: argparse.Namespace, backend: Backend, facts: ModelFacts, name: str) -> ModelPlan:
    """Decide input, preprocessing, outputs and task from the file and the flags."""
    if len(facts.inputs) != 1:
        raise ConfigError(f"{name} has {len(facts.inputs)} inputs ({', '.join(t.name for t in facts.inputs)}); "
                          "bundle create handles single-input models", hint="export the model with one input")
    inp = facts.inputs[0]
    labels = _read_labels(args.labels) if args.labels else facts.labels
    notes: list[str] = []
    if not args.labels and labels:
        notes.append(f"{len(labels)} labels read from the model's metadata")
    kind = _task_kind(args, facts, labels)
    layout = _opt(args, "layout", None) or (guess_layout(inp.shape) if kind != "tensor" or args.size else "none")
    if kind == "detection" and layout == "none":
        raise ConfigError(f"{name}: input {list(inp.shape)} does not look like an image", hint="give --layout NCHW|NHWC")
    pre = None if layout == "none" else _preprocessing(args, inp, layout)
    probes = probe_outputs(backend, [backend.example_input(fill="zeros"), backend.example_input(fill="random")])
    meanings: dict[str, str] = {}
    options: dict[str, Any] = {}
    if kind == "classification":
        out = _opt(args, "output", facts.outputs[0].name)
        spec = next((o for o in facts.outputs if o.name == out), None)
        if spec is None:
            raise ConfigError(f"{name} has no output {out!r}", hint=f"outputs: {[o.name for o in facts.outputs]}")
        k = probes[0][out].reshape(len(probes[0][out]), -1).shape[1]
        if len(labels) < 2:
            raise ConfigError(f"{name} is a classifier with {k} classes but no labels were given",
                              hint="give --labels FILE (one class name per line)")
        if k != len(labels):
            raise ConfigError(f"{name} outputs {k} class scores ({out} {list(spec.shape)}) but the labels have "
                              f"{len(labels)}", hint="one label per model output", key="labels")
        kind_of = args.output_kind or ("probabilities" if out in facts.softmax_outputs
                                       or looks_like_probabilities(out, spec, probes) else "logits")
        meanings[out] = kind_of
        options = {"output": out, "activation": "none" if kind_of == "probabilities" else "softmax"}
        notes.append(f"output {out} holds {kind_of}" + ("" if args.output_kind else " (read from the model)"))
    elif kind == "detection":
        decoder = args.detector or ("ssd" if "TFLite_Detection_PostProcess" in facts.ops else None)
        if decoder is None:
            raise ConfigError(f"{name}: cannot tell which detector head this is (outputs "
                              f"{[(o.name, list(o.shape)) for o in facts.outputs]})",
                              hint="give --detector yolox|yolov5|yolov8 (or ssd for TFLite post-processed models)")
        if decoder == "ssd":
            meanings = ssd_meanings(facts.outputs, probes)
        else:
            raw = facts.outputs[0]
            meanings[raw.name] = "raw-detections"
            width = raw.shape[-1] if decoder in ("yolox", "yolov5") else raw.shape[-2]
            n_cls = width - (5 if decoder in ("yolox", "yolov5") else 4)
            if labels and n_cls != len(labels):
                raise ConfigError(f"{name}: a {decoder} head {list(raw.shape)} has {n_cls} classes, the labels "
                                  f"{len(labels)}", hint="check --detector and --labels", key="labels")
        options = {"decoder": decoder, "score_threshold": float(_opt(args, "score_threshold", 0.25)),
                   "iou_threshold": float(_opt(args, "iou_threshold", 0.45)),
                   "max_detections": int(_opt(args, "max_detections", 100))}
        if decoder == "yolox":
            options["strides"] = list(_opt(args, "strides", (8, 16, 32)))
        if getattr(args, "label_offset", None):
            options["label_offset"] = int(args.label_offset)
    else:
        if getattr(args, "score", None):
            options["score"] = args.score
    outputs = OutputSpec(
        logits=options.get("output", facts.outputs[0].name), embedding=None, embedding_dim=None,
        tensors=tuple(TensorSpec(o.name, o.shape, o.dtype, o.scale, o.zero_point, meanings.get(o.name, "tensor"))
                      for o in facts.outputs))
    streaming = bool(getattr(args, "streaming", False))
    if facts.stateful:
        notes.append("stateful model: " + ("state kept between predictions (--streaming)" if streaming
                                           else "state reset before each prediction"))
    input_spec = InputSpec(inp.name, inp.shape, inp.dtype, layout, inp.scale, inp.zero_point)
    return ModelPlan(input_spec, pre, outputs, TaskSpec(kind, options, streaming), labels, notes)


def build_manifest_parts(plan: ModelPlan) -> dict[str, Any]:
    """Manifest fields the plan decides (``optimize`` reuses them)."""
    return {"labels": plan.labels, "input": plan.input, "outputs": plan.outputs, "preprocessing": plan.pre,
            "task": plan.task}


# ------------------------------------------------------------------------------------ reference / baseline


def synthetic_inputs(plan: ModelPlan, backend: Backend) -> list[Any]:
    """Two inputs for the health check: a mid-grey and a noise image, or two random tensors."""
    rng = np.random.default_rng(0)
    if plan.pre is not None:
        h, w = plan.pre.size
        c = 3 if plan.pre.channels == 3 else 1
        grey = np.full((h, w, c), 128, np.uint8)
        noise = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        return [grey[..., 0] if c == 1 else grey, noise[..., 0] if c == 1 else noise]
    return [backend.example_input(fill="random", seed=s)[plan.input.name][0] for s in (0, 1)]


def health_reference(task: Any, items: list[Any], variants: list[tuple[str, Backend, bool]]) -> bytes:
    """reference.npz: real-valued model inputs (``Backend.run`` quantizes them back exactly) and the outputs.

    ``variants``: (variant id, its loaded backend, quantized?), the FP32 reference first;
    each variant gets its own expected outputs.
    """
    from core.runtime import dequantize

    backend = variants[0][1]
    xs = []
    for item in items:
        p = task.prepare(item)
        feed = p.feeds[backend.inputs[0].name]
        xs.append(dequantize(feed, backend.inputs[0]) if backend.inputs[0].quantized else feed.astype(np.float32))
    x = np.concatenate(xs)
    coarse = any(o.quantized and (o.scale or 0) > 0.1 for o in backend.outputs)
    if task.kind == "detection" or coarse:
        # Boxes after NMS are not comparable element by element: tied scores (1/256 steps in a
        # quantized model) are ordered differently by other kernels or thread counts; and an int8
        # output whose step exceeds the agent's quantized tolerance differs by a few steps between
        # kernels.  The health check then runs the inputs and checks latency and finite outputs.
        import io

        buf = io.BytesIO()
        np.savez(buf, x=np.ascontiguousarray(x, np.float32))
        return buf.getvalue()
    logits = {vid: np.concatenate([b.run(x[i:i + 1]).logits for i in range(len(x))]) for vid, b, _ in variants}
    return reference_npz(x, logits[variants[0][0]], logits, {vid: q for vid, _, q in variants})


def _sample_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no inputs ({', '.join(IMAGE_SUFFIXES)})", hint="point --baseline-dir at samples",
                        path=str(folder))
    return files


def drift_baseline(task: Any, files: list[Path], *, seed: int = 0) -> tuple[bytes | None, str]:
    """A baseline calibrated on the task's drift features of ``files``, checked by feeding a monitor.

    Returns (bytes or None, a one-line reason).  Never a baseline the agent would not use.
    """
    from core.imageio import load_input
    from core.tasks import Prepared  # noqa: F401 - typing only

    try:
        from core.drift import DriftMonitor
        from core.drift_calibrate import calibrate_heldout
        from core.drift_features import DriftFeatures
    except ImportError as exc:
        return None, f"no drift baseline: this edgeloop cannot calibrate {task.kind} drift ({exc.name})"
    feats = []
    for f in files:
        p = task.prepare(load_input(f))
        outs = task.run(p)
        feats.append(task.drift_features(p, outs, task.decode(outs, p)))
    fields = feats[0].kinds
    held = DriftFeatures(**{k: np.concatenate([getattr(f, k) for f in feats]) for k in fields})
    try:
        baseline = calibrate_heldout(held, seed=seed)
        monitor = DriftMonitor(baseline)
        monitor.update(feats[0])  # the agent will feed exactly this
    except EdgeloopError as exc:
        return None, f"no drift baseline: {exc}"
    return baseline.to_bytes(), f"drift baseline from {len(files)} samples ({', '.join(fields)})"


# ------------------------------------------------------------------------------------ the command


def open_or_fail(model_path: Path) -> tuple[str, Backend]:
    """(format, loaded backend), or one ExportError line naming the model, the reason and what to try."""
    try:
        return model_format(model_path), open_model(model_path)
    except EdgeloopError as exc:
        raise ExportError(f"edgeloop cannot run {model_path.name}: {exc.args[0] if exc.args else exc}",
                          hint=exc.hint or "check the file, or re-export it with standard operators") from exc


def create_bundle(args: argparse.Namespace) -> int:
    """Handler of ``edgeloop bundle create``: write the bundle and report what went in."""
    model_path: Path = args.model
    fmt, backend = open_or_fail(model_path)
    try:
        return _create(args, model_path, fmt, backend)
    finally:
        backend.close()


def _create(args: argparse.Namespace, model_path: Path, fmt: str, backend: Backend) -> int:
    from core.tasks import build_task

    name = model_path.name
    facts = inspect_model(model_path, fmt, backend)
    try:
        plan = plan_model(args, backend, facts, name)
    except ConfigError:
        raise
    except EdgeloopError as exc:
        raise ExportError(f"edgeloop cannot run {name}: {exc.args[0] if exc.args else exc}",
                          hint=exc.hint or "check the flags (edgeloop bundle create --help)") from exc
    precision = detect_precision(model_path, fmt)
    vid = f"{fmt}-{precision}"
    manifest = Manifest(
        name=args.name, version=args.version, created=utc_now(), variants=(
            Variant(id=vid, format=fmt, precision=precision, file=f"models/{vid}.{fmt}",
                    options={"source": model_path.name}),),
        baseline=None, health="reference.npz", lineage=Lineage(
            dataset=None if args.baseline_dir is None else str(args.baseline_dir)), **build_manifest_parts(plan))
    try:
        task = build_task(manifest, backend)
        items = synthetic_inputs(plan, backend)
        task.predict(items[0])  # the whole path once: decoding errors surface here, not on the device
        quantized = precision.startswith("int8") or plan.input.scale is not None
        reference = health_reference(task, items, [(vid, backend, quantized)])
    except EdgeloopError as exc:
        raise ExportError(f"edgeloop cannot run {name}: {exc.args[0] if exc.args else exc}",
                          hint=exc.hint or "check the flags (edgeloop bundle create --help)") from exc
    baseline, drift_note = None, "no drift baseline (give --baseline-dir)"
    if args.baseline_dir is not None:
        baseline, drift_note = drift_baseline(task, _sample_files(args.baseline_dir))
    if baseline is not None:
        manifest = Manifest(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__},
                               "baseline": "baseline.npz"})
    key = load_signing_key(args.sign)
    metrics: dict[str, Any] = {"byom": True, "model": model_path.name, "precision": precision,
                               "task": plan.task.kind, "notes": plan.notes + [drift_note]}
    files: dict[str, Any] = {f"models/{vid}.{fmt}": model_path}
    if not plan.labels:
        files["labels.txt"] = b""
    path = pack_bundle(args.out, manifest, files, reference=reference, baseline=baseline, metrics=metrics,
                       signing_key=key)
    data = {"bundle": str(path), "name": args.name, "version": args.version, "variant": vid,
            "task": plan.task.kind, "task_options": plan.task.options, "input": manifest.input,
            "preprocessing": plan.pre, "outputs": [t for t in plan.outputs.tensors], "labels": len(plan.labels),
            "baseline": baseline is not None, "notes": plan.notes + [drift_note],
            "signed_by": None if key is None else key.key_id}
    inp = manifest.input
    q = f" (scale {inp.scale:g}, zero point {inp.zero_point})" if inp.scale is not None else ""
    lines = [f"wrote {path}: {plan.task.kind}, {vid}, input {inp.name} {list(inp.shape)} {inp.dtype}{q} {inp.layout}, "
             f"{len(plan.labels)} labels, {'signed ' + key.key_id if key else 'unsigned'}"]
    lines += [f"  {n}" for n in plan.notes + [drift_note]]
    emit(args, data, "\n".join(lines))
    return 0
