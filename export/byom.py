"""``edgeloop bundle create``: bundle your own ``.onnx`` / ``.tflite`` model (bring your own model).

The input spec comes from the model file itself (checked against ``--size`` and
``--channels``), preprocessing from the flags, and the drift baseline and health-check
reference from an optional folder of sample images (read recursively; at least 20
images for a baseline).  No training run, no accuracy gate: the owner vouches for the
model, the bundle makes it deployable and verifiable.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from core.cliutil import emit
from core.errors import ConfigError, DataError
from core.manifest import InputSpec, Lineage, Manifest, OutputSpec, Preprocessing, Variant
from core.runtime import model_format, open_model

from .pack import baseline_npz, load_signing_key, pack_bundle, reference_npz, utc_now

__all__ = ["create_bundle", "detect_precision", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".npy", ".bmp")


def detect_precision(path: Path, fmt: str) -> str:
    """``fp32`` / ``fp16`` / ``int8-static`` / ``int8-dynamic`` (ONNX) or ``fp32`` / ``int8`` (TFLite)."""
    if fmt == "tflite":
        return "fp32" if open_model(path).input_dtype == "float32" else "int8"
    import onnx

    model = onnx.load(str(path))
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
        labels = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}", key="labels", path=str(path)) from exc
    if len(labels) < 2:
        raise ConfigError(f"{path} lists {len(labels)} label(s); need at least 2, one per line", key="labels")
    return labels


def _sample_images(folder: Path, spec: Preprocessing) -> np.ndarray:
    from core.preprocess import load_image, preprocess

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})", hint="point --baseline-dir at sample images",
                        path=str(folder))
    return preprocess([load_image(p) for p in files], spec)


def create_bundle(args: argparse.Namespace) -> int:
    """Handler of ``edgeloop bundle create``: write the bundle and report what went in."""
    model_path: Path = args.model
    fmt = model_format(model_path)
    labels = _read_labels(args.labels)
    channels = int(args.channels)
    spec = Preprocessing(size=tuple(args.size), channels=channels,
                         mean=tuple(args.mean) if args.mean else (0.0,) * channels,
                         std=tuple(args.std) if args.std else (1.0,) * channels)
    backend = open_model(model_path)
    want = (channels, *spec.size)
    if tuple(backend.input_shape[1:]) != want:
        raise ConfigError(f"{model_path.name} takes input {list(backend.input_shape)}, but the flags say "
                          f"{list(want)} (channels, height, width)", hint="fix --size / --channels")
    probe = backend.run(np.zeros((1, *want), np.float32))
    if probe.logits.ndim != 2 or probe.logits.shape[1] != len(labels):
        raise ConfigError(f"{model_path.name} outputs {list(probe.logits.shape)} but {args.labels} has "
                          f"{len(labels)} labels", hint="one label per model output", key="labels")
    precision = detect_precision(model_path, fmt)
    vid = f"{fmt}-{precision}"
    input_name = backend.input_name or "input"
    files: dict[str, Path] = {f"models/{vid}.{fmt}": model_path}
    reference = baseline = None
    if args.baseline_dir is not None:
        x = _sample_images(args.baseline_dir, spec)
        out = backend.run(x)
        baseline = baseline_npz(x, out.logits, out.embedding)
        reference = reference_npz(x[:8], out.logits[:8], {vid: out.logits[:8]}, {vid: precision.startswith("int8")})
    key = load_signing_key(args.sign)
    manifest = Manifest(
        name=args.name, version=args.version, created=utc_now(), labels=labels,
        input=InputSpec(input_name, (-1 if backend.input_shape[0] < 0 else backend.input_shape[0], *want)),
        outputs=OutputSpec(embedding="embedding" if probe.embedding is not None else None,
                           embedding_dim=None if probe.embedding is None else int(probe.embedding.shape[1])),
        preprocessing=spec, variants=(Variant(id=vid, format=fmt, precision=precision, file=f"models/{vid}.{fmt}",
                                              options={"source": model_path.name}),),
        baseline="baseline.npz" if baseline is not None else None,
        health="reference.npz" if reference is not None else None,
        lineage=Lineage(dataset=None if args.baseline_dir is None else str(args.baseline_dir)))
    metrics: dict[str, Any] = {"byom": True, "model": model_path.name, "precision": precision}
    path = pack_bundle(args.out, manifest, files, reference=reference, baseline=baseline, metrics=metrics,
                       signing_key=key)
    data = {"bundle": str(path), "name": args.name, "version": args.version, "variant": vid,
            "input": list(manifest.input.shape), "labels": len(labels), "baseline": baseline is not None,
            "signed_by": None if key is None else key.key_id}
    emit(args, data, f"wrote {path}: {vid}, input {list(manifest.input.shape)}, {len(labels)} labels, "
                     f"{'with' if baseline is not None else 'no'} drift baseline, "
                     f"{'signed ' + key.key_id if key else 'unsigned'}")
    return 0
