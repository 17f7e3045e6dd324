"""Static INT8 of a raw-head detector: the head after the last layers can stay in float.

A YOLO-style head joins box regressions (pixels) and sigmoid scores (0..1) in one Concat;
one INT8 scale for that tensor flattens the scores.  ``export.gate.head_nodes`` finds the
nodes after the last Conv/Gemm/MatMul, the gate tries them in float before its per-layer
search, and ``edgeloop optimize`` adds a ``qdq-float-head`` speed-plan candidate.  No
quantization runs here (seconds): only the graph analysis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.gate import head_nodes  # noqa: E402
from tests.plugins.optimize_kit import stripes_classifier  # noqa: E402


def raw_head_detector(path: Path) -> Path:
    """Conv stem -> box Conv and score Conv -> Sigmoid -> Concat -> Reshape -> Transpose ([1, N, 4 + 2])."""
    rng = np.random.default_rng(0)

    def conv(name: str, cin: int, cout: int, x: str, y: str) -> tuple:
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), f"{name}_w")
        return helper.make_node("Conv", [x, f"{name}_w"], [y], name=name), w

    stem, w0 = conv("stem", 3, 8, "images", "s")
    box, w1 = conv("box", 8, 4, "s", "b")
    cls, w2 = conv("cls", 8, 2, "s", "c")
    nodes = [stem, box, cls, helper.make_node("Sigmoid", ["c"], ["cs"], name="sig"),
             helper.make_node("Concat", ["b", "cs"], ["cat"], axis=1, name="cat"),
             helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="reshape"),
             helper.make_node("Transpose", ["flat"], ["output"], perm=[0, 2, 1], name="transpose")]
    inits = [w0, w1, w2, numpy_helper.from_array(np.array([1, 6, 16], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_head_nodes_are_the_nodes_after_the_last_layers(tmp_path: Path) -> None:
    assert head_nodes(raw_head_detector(tmp_path / "det.onnx")) == ("sig", "cat", "reshape", "transpose")
    assert head_nodes(stripes_classifier(tmp_path / "cls.onnx")) == ()  # ends in its Gemm


def test_optimize_adds_a_float_head_plan_only_for_a_joining_head(tmp_path: Path) -> None:
    from export.optimize import _candidates

    det = {p.name: p for p in _candidates(raw_head_detector(tmp_path / "det.onnx"))}
    assert det["qdq-float-head"].nodes_to_exclude == ("sig", "cat", "reshape", "transpose")
    assert det["qdq-float-head"].op_types == () and not det["qdq-all"].nodes_to_exclude
    assert "qdq-float-head" not in {p.name for p in _candidates(stripes_classifier(tmp_path / "cls.onnx"))}


def _scripted_gate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, passes, n_layers: int = 10):  # type: ignore[no-untyped-def]
    """The gate with quantization replaced by a script: ``passes(exclude)`` says which attempts are within budget."""
    import export.gate as gate

    calls: list[tuple[str, ...]] = []

    def fake_try(pre_path, out, calib, settings, exclude, calibration, cache, data, reference, max_drop):  # type: ignore[no-untyped-def]
        calls.append(exclude)
        acc = reference if passes(exclude) else reference - 0.3
        return gate.Attempt(settings.name, exclude, acc, gate.percentage_points(reference, acc), passes(exclude))

    units = {f"L{i}": (f"L{i}", f"act{i}") for i in range(n_layers)}
    monkeypatch.setattr(gate, "_try", fake_try)
    monkeypatch.setattr(gate, "exclusion_units", lambda pre: units)
    monkeypatch.setattr(gate, "quantize_static_int8", lambda *a, **k: None)  # the per-layer probes
    monkeypatch.setattr(gate, "accuracy", lambda path, x, y: 0.5)
    data = (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))
    result = gate.gate_static_int8(tmp_path / "pre.onnx", tmp_path / "work", data[0], data, 0.95, max_drop=1.0,
                                   head=("sig", "cat"), float_prefix=True)
    return result, calls


def test_gate_finds_the_shortest_float_prefix_by_binary_search(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    # within budget once the first 4 layers are float (noise that builds up from the input)
    r, calls = _scripted_gate(monkeypatch, tmp_path, lambda ex: {"L0", "L1", "L2", "L3"} <= set(ex))
    assert r.passed and r.options["float_prefix_layers"] == 4 and "the first 4 layers" in r.reason
    assert set(r.float_nodes) == {"L0", "act0", "L1", "act1", "L2", "act2", "L3", "act3"}
    assert calls[3] == ("sig", "cat")  # after the 3 recipes: the head in float
    prefix = calls[4:]
    assert len(prefix) <= 5 and len(prefix[0]) == 2 * 9  # the longest prefix first (9 of 10 layers), then halving
    assert not any(set(c) >= {f"L{i}" for i in range(10)} for c in calls)  # never every layer in float


def test_gate_without_a_passing_prefix_goes_on_to_the_per_layer_search(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    r, calls = _scripted_gate(monkeypatch, tmp_path, lambda ex: False)
    assert not r.passed and "float prefixes" in r.reason and "the head in float" in r.reason
    assert len(calls) == 3 + 1 + 1 + 8  # recipes, head, the longest prefix (fails: no search), 8 float layers
