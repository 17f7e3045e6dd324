"""Models edgeloop has never seen: small ONNX graphs built here (onnx.helper) covering
layouts x dtypes x output kinds x tasks, each through ``bundle create`` and the task layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.preprocess import preprocess
from core.tasks import softmax
from tests.plugins.models import cli

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

_DT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8,
       "int8": TensorProto.INT8}
W = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0]], np.float32)  # channels x classes


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def classifier(path: Path, layout: str, dtype: str, probs: bool, h: int = 6, w: int = 5) -> Path:
    """Per-channel mean -> MatMul -> (Softmax): class scores depend on every channel's position."""
    shape = {"NCHW": ["N", 3, h, w], "NHWC": ["N", h, w, 3], "NHW": ["N", h, w], "none": ["N", 3, 7]}[layout]
    axes = {"NCHW": [2, 3], "NHWC": [1, 2], "NHW": [1, 2], "none": [2]}[layout]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["xf"], ["m"], axes=axes, keepdims=0)]
    weight = W if layout != "NHW" else W[:1]
    if layout == "NHW":
        nodes.append(helper.make_node("Unsqueeze", ["m", "one"], ["m2"]))
    nodes.append(helper.make_node("MatMul", ["m2" if layout == "NHW" else "m", "w"], ["logits" if not probs else "z"]))
    if probs:
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([1], np.int64), "one")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", _DT[dtype], shape)],
                 [helper.make_tensor_value_info("probs" if probs else "logits", TensorProto.FLOAT, ["N", 3])], inits)


def _open(bundle: Path, tmp: Path):  # type: ignore[no-untyped-def]
    from core.bundle import open_bundle
    from edge_agent.inference import LoadedModel

    b = open_bundle(bundle, require_signature=False)
    slot = b.extract_to(tmp / "slot")
    return LoadedModel(Path(slot), b.manifest.variants[0].id, drift=False)


def _labels(tmp: Path) -> Path:
    (tmp / "labels.txt").write_text("a\nb\nc\n")
    return tmp / "labels.txt"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("probs", [False, True])
def test_image_classifiers(tmp_path: Path, layout: str, dtype: str, probs: bool) -> None:
    model = classifier(tmp_path / "m.onnx", layout, dtype, probs)
    flags = ["--layout", layout] + (["--channel-order", "BGR"] if layout != "NHW" else [])
    rc, _ = cli(["bundle", "create", "--model", model, "--labels", _labels(tmp_path), "--name", "syn", "--version", "1",
                 *flags, "--out", tmp_path / "b.elb"])
    assert rc == 0
    m = _open(tmp_path / "b.elb", tmp_path)
    assert m.manifest.input.dtype == dtype and m.manifest.input.layout == layout
    assert m.task.activation == ("none" if probs else "softmax")  # read from the model, never softmax twice
    img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    got = m.predict_result(img)
    # reference: edgeloop's own preprocessing, by hand: 0..255 for uint8 inputs, else 0..1; BGR; per-channel mean
    pre = m.manifest.preprocessing
    x = preprocess([img], pre)
    if dtype == "uint8":
        x = np.rint(x)
    elif dtype == "float16":
        x = x.astype(np.float16).astype(np.float32)
    chan = x.mean(axis=(2, 3)) if layout == "NCHW" else x.mean(axis=(1, 2)) if layout == "NHWC" else x.mean(axis=(1, 2))[:, None]
    want = softmax(chan @ (W if layout != "NHW" else W[:1]))[0]
    np.testing.assert_allclose(got.probs, want, atol=2e-3 if dtype == "float16" else 1e-5)
    assert got.label == "abc"[int(np.argmax(want))]
    m.close()


def test_tensor_input_classifier_and_dtype_errors(tmp_path: Path) -> None:
    from core.errors import InputError

    model = classifier(tmp_path / "m.onnx", "none", "int8", probs=False)
    rc, _ = cli(["bundle", "create", "--model", model, "--labels", _labels(tmp_path), "--name", "t", "--version", "1",
                 "--out", tmp_path / "b.elb"])
    assert rc == 0
    m = _open(tmp_path / "b.elb", tmp_path)
    assert m.manifest.preprocessing is None and m.task.kind == "classification"
    x = np.arange(-10, 11, dtype=np.int8).reshape(3, 7)
    got = m.predict_result(x)  # batch axis added
    np.testing.assert_allclose(got.probs, softmax(x.mean(axis=1, dtype=np.float32)[None] @ W)[0], atol=1e-5)
    with pytest.raises(InputError, match="without quantization parameters"):
        m.predict_result(x.astype(np.float32))  # ONNX int8 input has no scale: floats cannot be quantized
    with pytest.raises(InputError, match=r"shape 4x7.*takes Nx3x7"):
        m.predict_result(np.zeros((4, 7), np.int8))
    m.close()


def _const_detector(path: Path, raw: np.ndarray, in_shape: list) -> Path:
    """A detector head whose output is ``raw`` (+ 0 x the input mean, so the input is used)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["m0"]),
             helper.make_node("Add", ["raw", "m0"], ["out"])]
    inits = [numpy_helper.from_array(raw.astype(np.float32), "raw"), numpy_helper.from_array(np.float32(0), "zero")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(raw.shape))], inits)


@pytest.mark.parametrize("head", ["yolov5", "yolov8"])
@pytest.mark.parametrize("fit", ["stretch", "letterbox"])
def test_raw_yolo_heads_decode_nms_and_map_to_image_pixels(tmp_path: Path, head: str, fit: str) -> None:
    # two overlapping boxes of class 1 (NMS keeps the better) and one of class 0, in 64x64 input pixels
    rows = np.array([[20, 20, 10, 10, 0.9, 0.1, 0.9], [21, 20, 10, 10, 0.9, 0.1, 0.6], [48, 40, 8, 16, 0.8, 0.9, 0.0],
                     [5, 5, 2, 2, 0.05, 0.5, 0.5]], np.float32)
    raw = rows[None] if head == "yolov5" else np.concatenate([rows[:, :4], rows[:, 4:5] * rows[:, 5:]], 1).T[None]
    model = _const_detector(tmp_path / "d.onnx", raw, [1, 3, 64, 64])
    rc, _ = cli(["bundle", "create", "--model", model, "--labels", (tmp_path / "l.txt"), "--name", "d", "--version", "1",
                 "--detector", head, "--fit", fit, "--out", tmp_path / "b.elb"]
                ) if (tmp_path / "l.txt").write_text("zero\none\n") else (1, "")
    assert rc == 0
    m = _open(tmp_path / "b.elb", tmp_path)
    got = m.predict_result(np.zeros((128, 256, 3), np.uint8)).detections
    assert [(d.label, round(d.score, 2)) for d in got] == [("one", 0.81), ("zero", 0.72)]
    if fit == "stretch":  # x scaled by 4, y by 2
        np.testing.assert_allclose(got[0].box, [60, 30, 100, 50], atol=1e-3)
    else:  # r = min(64/128, 64/256) = 0.25, the image 32 px high centred (offset y 16); y1 = -4 clipped to 0
        np.testing.assert_allclose(got[0].box, [60, 0, 100, 36], atol=1e-3)
    m.close()


def test_tensor_model_outputs_every_named_output(tmp_path: Path) -> None:
    nodes = [helper.make_node("Mul", ["x", "two"], ["double"]), helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)]
    model = _save(tmp_path / "t.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("double", TensorProto.FLOAT, ["N", 8]),
                   helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
                  [numpy_helper.from_array(np.float32(2), "two")])
    rc, _ = cli(["bundle", "create", "--model", model, "--name", "t", "--version", "1", "--out", tmp_path / "b.elb"])
    assert rc == 0
    m = _open(tmp_path / "b.elb", tmp_path)
    assert m.task.kind == "tensor" and m.manifest.labels == ()
    r = m.predict_result(np.arange(8, dtype=np.float32))
    np.testing.assert_allclose(r.outputs["double"], np.arange(8)[None] * 2.0)
    assert float(r.outputs["total"]) == 28.0
    m.close()


def test_agent_overhead_measures_a_tensor_model(tmp_path: Path) -> None:
    """``bench --agent-overhead`` on a bundle without preprocessing feeds arrays of the model's own input
    (it once failed on ``spec.size`` for every tensor bundle)."""
    from benchmarks.agent_overhead import measure_variant

    nodes = [helper.make_node("Mul", ["x", "two"], ["double"])]
    model = _save(tmp_path / "t.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("double", TensorProto.FLOAT, ["N", 8])],
                  [numpy_helper.from_array(np.float32(2), "two")])
    rc, _ = cli(["bundle", "create", "--model", model, "--name", "t", "--version", "1", "--out", tmp_path / "b.elb"])
    assert rc == 0
    row = measure_variant(tmp_path / "b.elb", "onnx-fp32", runs=40, warmup=5)
    assert row["input"] == [8] and row["agent_ms"]["mean_ms"] > 0 and row["bare_ms"]["mean_ms"] > 0
    assert set(row["stages_us"]) == {"runtime", "bookkeeping"}
