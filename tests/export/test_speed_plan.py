"""export.speed: the INT8 speed plan's logic on tiny hand-built graphs, quantized by real ORT tools."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import ConfigError, QuantizationError
from export.calibration import ImageCalibrationReader
from export.speed import (
    Int8Plan,
    apply_plan,
    candidate_plans,
    cpu_needs_reduce_range,
    depthwise_weights,
    float_stem,
    island_adjacent_convs,
    plan_int8,
)

C = 4


def _w(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3, name)


def _save(nodes: list, inits: list, path: Path, out_shape: list[int]) -> Path:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def island_model(tmp_path_factory) -> Path:
    """stem Conv A -> Relu -> MaxPool -> Conv B -> hard-swish (HardSigmoid, Mul) -> Conv C -> Relu
    -> depthwise Conv D -> GlobalAveragePool -> Flatten -> Gemm."""
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "wa"], ["a"], name="A", pads=[1, 1, 1, 1]),
        n("Relu", ["a"], ["ar"], name="A_relu"),
        n("MaxPool", ["ar"], ["p"], name="pool", kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
        n("Conv", ["p", "wb"], ["b"], name="B"),
        n("HardSigmoid", ["b"], ["hs"], name="hs", alpha=1 / 6, beta=0.5),
        n("Mul", ["b", "hs"], ["bs"], name="hswish"),
        n("Conv", ["bs", "wc"], ["c"], name="C"),
        n("Relu", ["c"], ["cr"], name="C_relu"),
        n("Conv", ["cr", "wd"], ["d"], name="D", group=C, pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["d"], ["g"], name="gap"),
        n("Flatten", ["g"], ["f"], name="flat"),
        n("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1),
    ]
    inits = [_w("wa", (C, C, 3, 3), 1), _w("wb", (C, C, 1, 1), 2), _w("wc", (C, C, 1, 1), 3),
             _w("wd", (C, 1, 3, 3), 4), _w("wg", (3, C), 5), _w("bg", (3,), 6)]
    return _save(nodes, inits, tmp_path_factory.mktemp("speed") / "island.onnx", [1, 3])


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """Two ReLU convs: no float islands, no matrix product."""
    n = helper.make_node
    nodes = [n("Conv", ["input", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]), n("Relu", ["a"], ["ar"], name="r1"),
             n("Conv", ["ar", "w2"], ["logits"], name="c2")]
    return _save(nodes, [_w("w1", (C, C, 3, 3), 7), _w("w2", (C, C, 1, 1), 8)],
                 tmp_path_factory.mktemp("speed") / "plain.onnx", [1, C, 8, 8])


def _reader() -> ImageCalibrationReader:
    return ImageCalibrationReader(np.random.default_rng(0).standard_normal((4, C, 8, 8)).astype(np.float32), "input")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x})[0])


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse4_1 avx2 fma", True),                 # AVX2 without VNNI: saturating u8s8 kernels
    ("sse4_1 avx2 avx512f avx512_vnni", False),
    ("sse4_1 avx2 avx_vnni", False),
    ("fp asimd asimddp", False),                   # ARM
])
def test_reduce_range_follows_vnni(flags: str, expected: bool):
    assert cpu_needs_reduce_range(f"processor\t: 0\nflags\t\t: {flags}\n") is expected


def test_plan_validates_and_round_trips():
    with pytest.raises(ConfigError):
        Int8Plan("x", quant_format="qlinear")
    with pytest.raises(ConfigError):
        Int8Plan("x", per_channel="yes")
    with pytest.raises(ConfigError):
        Int8Plan("x", weight_type="int4")
    plan = Int8Plan("p", op_types=("Conv",), nodes_to_exclude=("B",), fp32_ms=2.0, int8_ms=1.0,
                    candidates=(("p", 0.5),))
    assert plan.ratio == 0.5
    assert Int8Plan.from_dict(plan.to_dict()) == plan
    assert Int8Plan("q").ratio is None


def test_graph_analysis(island_model: Path):
    model = onnx.load(str(island_model))
    # B writes into the hard-swish island, C reads from it; A and D touch only Relu/pool ops.
    assert island_adjacent_convs(model) == ("B", "C")
    assert float_stem(model) == ("A", "pool")
    assert depthwise_weights(model) == ("wd",)


def test_candidates_depend_on_the_graph(island_model: Path, plain_model: Path):
    names = [p.name for p in candidate_plans(island_model, reduce_range=True)]
    assert names[0] == "qdq-all"
    assert {"qdq-skip-float-islands", "qdq-matmul-only", "qdq-integer-ops"} <= set(names)
    assert "qdq-float-stem" not in names  # its MaxPool would break ORT's NHWC chain
    skip = next(p for p in candidate_plans(island_model) if p.name == "qdq-skip-float-islands")
    assert skip.nodes_to_exclude == ("B", "C") and "Gemm" in skip.op_types
    plain = [p.name for p in candidate_plans(plain_model, reduce_range=False)]
    assert "qdq-skip-float-islands" not in plain and "qdq-matmul-only" not in plain
    assert "qdq-float-stem" in plain
    assert all(not p.reduce_range for p in candidate_plans(plain_model, reduce_range=False))


def test_apply_plan_excludes_nodes_and_stays_close_to_fp32(island_model: Path, tmp_path: Path):
    plan = next(p for p in candidate_plans(island_model) if p.name == "qdq-skip-float-islands")
    out = apply_plan(plan, island_model, tmp_path / "q.onnx", _reader())
    q = onnx.load(str(out))
    producers = {o: nd for nd in q.graph.node for o in nd.output}
    convs = {nd.name: nd for nd in q.graph.node if nd.op_type == "Conv"}
    # Excluded convs read their float weights directly; quantized ones through DequantizeLinear.
    assert convs["B"].input[1] == "wb" and convs["C"].input[1] == "wc"
    assert producers[convs["A"].input[1]].op_type == "DequantizeLinear"
    assert Counter(nd.op_type for nd in q.graph.node)["QuantizeLinear"] >= 2
    x = np.random.default_rng(1).standard_normal((1, C, 8, 8)).astype(np.float32)
    ref, got = _run(island_model, x), _run(out, x)
    assert np.abs(got - ref).max() < 0.1 * (np.abs(ref).max() + 1e-6)


def test_per_channel_only_for_depthwise(island_model: Path, tmp_path: Path):
    out = apply_plan(Int8Plan("pc", per_channel="depthwise"), island_model, tmp_path / "pc.onnx", _reader())
    q = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    scale_of = {nd.input[0]: inits.get(nd.input[1]) for nd in q.graph.node if nd.op_type == "DequantizeLinear"}
    weight_scales = {k: v for k, v in scale_of.items() if k.startswith(("wa", "wb", "wd")) and v is not None}
    by_weight = {k[:2]: v for k, v in weight_scales.items()}
    assert by_weight["wd"].size == C  # depthwise: one scale per channel
    assert by_weight["wa"].size == 1 and by_weight["wb"].size == 1


def test_plan_int8_without_measuring_is_structural(island_model: Path, plain_model: Path):
    assert plan_int8(island_model, _reader, measure=False).name == "qdq-skip-float-islands"
    assert plan_int8(plain_model, _reader, measure=False).name == "qdq-all"


def test_plan_int8_measures_and_respects_the_accuracy_check(island_model: Path, tmp_path: Path):
    plans = [Int8Plan("qdq-matmul-only", op_types=("Gemm",)), Int8Plan("qdq-all")]
    seen: list[str] = []

    def accept(path: Path) -> bool:
        seen.append(path.stem)
        return path.stem != "qdq-all"

    best = plan_int8(island_model, _reader, candidates=plans, accept=accept, rounds=1, runs_per_round=1,
                     workdir=tmp_path)
    assert sorted(seen) == ["qdq-all", "qdq-matmul-only"]
    assert best.name == "qdq-matmul-only"
    assert [n for n, _ in best.candidates] == ["qdq-matmul-only"]
    assert best.fp32_ms is not None and best.int8_ms is not None and best.ratio is not None
    assert list(tmp_path.iterdir()) == []  # temporary files cleaned up
    with pytest.raises(QuantizationError):
        plan_int8(island_model, _reader, candidates=plans, accept=lambda _p: False, rounds=1, runs_per_round=1)
    with pytest.raises(ConfigError):
        plan_int8(island_model, _reader, candidates=[])


def test_plan_with_other_settings_is_a_new_plan():
    base = Int8Plan("a")
    assert replace(base, reduce_range=False) != base
