"""Bundle builders shared by the core, agent and fleet tests: placeholder members and a manifest."""

from __future__ import annotations

from core.manifest import InputSpec, Manifest, OutputSpec, Preprocessing, Variant

__all__ = ["FILES", "make_manifest"]

FILES: dict[str, bytes] = {
    "models/onnx-fp32.onnx": b"\x08\x07fake-onnx-fp32" * 500,
    "models/tflite-int8.tflite": b"TFL3fake-int8" * 100,
    "baseline.npz": b"PK-fake-baseline",
    "reference.npz": b"PK-fake-reference",
    "metrics.json": b'{"test_accuracy": 0.98}',
}


def make_manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="digits", version="1.2.0", created="2025-01-01T00:00:00+00:00",
        labels=tuple(str(i) for i in range(10)),
        input=InputSpec("input", (-1, 1, 32, 32)), outputs=OutputSpec(embedding_dim=64),
        preprocessing=Preprocessing(size=(32, 32), mean=(0.5,), std=(0.25,)),
        variants=(Variant("onnx-fp32", "onnx", "fp32", "models/onnx-fp32.onnx", test_accuracy=0.98, latency_ms=0.4),
                  Variant("tflite-int8", "tflite", "int8", "models/tflite-int8.tflite", test_accuracy=0.975,
                          accuracy_drop=0.5, float_nodes=("head",), options={"calibration": "minmax"})),
        reference_accuracy=0.98, metrics={"val_accuracy": 0.99},
    )
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]
