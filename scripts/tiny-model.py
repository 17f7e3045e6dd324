#!/usr/bin/env python3
"""Write a tiny stand-in model for the quick-starts: ``python scripts/tiny-model.py OUT_DIR``.

OUT_DIR/model.onnx   an 8x8 grey digit classifier (a 64-32-10 MLP, trained here with numpy
                     on scikit-learn's digits in about a second; input N x 1 x 8 x 8, 0..1)
OUT_DIR/labels.txt   the ten class names
OUT_DIR/images/      twenty 8x8 PNG digits to predict (named <index>-<true digit>.png)
OUT_DIR/calib/       100 held-out digits to calibrate INT8 with (`edgeloop optimize --calib`)
OUT_DIR/eval/D/      300 held-out digits, one sub-folder per class (`edgeloop optimize --eval`)

Needs numpy, scikit-learn, onnx and Pillow (the [train] extra).  Replace it with your own
model: docs/models.md shows how to bundle any .onnx / .tflite file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _train(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(0, 0.2, (64, 32)), np.zeros(32)
    w2, b2 = rng.normal(0, 0.2, (32, 10)), np.zeros(10)
    t = np.eye(10)[y]
    for _ in range(300):  # full-batch gradient descent on softmax cross-entropy
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - t) / len(x)
        gh = (g @ w2.T) * (h > 0)
        for w, gw in ((w1, x.T @ gh), (b1, gh.sum(0)), (w2, h.T @ g), (b2, g.sum(0))):
            w -= 0.5 * gw
    return [a.astype(np.float32) for a in (w1, b1, w2, b2)]


def _onnx(weights: list[np.ndarray]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for a, n in zip(weights, ("w1", "b1", "w2", "b2"), strict=True)]
    inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "flat_shape"))
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["embedding"]),
             helper.make_node("Gemm", ["embedding", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny_digits", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def main(out: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)  # 0..16 -> 0..255 grey
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    weights = _train(x[:1000], d.target[:1000])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(_onnx(weights))
    (out / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    (out / "images").mkdir(exist_ok=True)
    for i in range(1000, 1020):
        Image.fromarray(images[i], mode="L").save(out / "images" / f"{i}-{d.target[i]}.png")
    (out / "calib").mkdir(exist_ok=True)
    for i in range(1020, 1120):
        Image.fromarray(images[i], mode="L").save(out / "calib" / f"{i}.png")
    for i in range(1120, 1420):
        (out / "eval" / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(out / "eval" / str(d.target[i]) / f"{i}.png")
    print(f"wrote {out / 'model.onnx'}, {out / 'labels.txt'}, 20 images in {out / 'images'}, "
          f"100 in {out / 'calib'} and 300 in {out / 'eval'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
