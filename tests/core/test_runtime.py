"""core.runtime: both backends on real files, the error paths, no torch on import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError, RuntimeBackendError
from core.runtime import BACKENDS, LiteRTBackend, OnnxBackend, open_model, quantize


def _tiny_onnx(path: Path, *, batch: int | str = "N") -> Path:
    """A 1x4x4 -> (logits 3, embedding 16) graph built with onnx.helper (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 3)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["embedding"], axis=1),
             helper.make_node("MatMul", ["embedding", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3]),
                               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 16])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_backend_runs_and_names_outputs(tmp_path: Path) -> None:
    backend = open_model(_tiny_onnx(tmp_path / "m.onnx"), threads=1)
    assert isinstance(backend, OnnxBackend) and backend.name == "onnxruntime"
    assert backend.input_shape == (-1, 1, 4, 4)
    x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    out = backend.run(x)
    assert out.logits.shape == (2, 3) and out.embedding is not None
    np.testing.assert_allclose(out.embedding, x.reshape(2, 16))


def test_run_trusted_gives_run_outputs_exactly(tmp_path: Path) -> None:
    """The serving path's unchecked run: the same named float32 outputs as the checked one."""
    backend = open_model(_tiny_onnx(tmp_path / "t.onnx"), threads=1)
    x = np.random.default_rng(2).normal(size=(1, 1, 4, 4)).astype(np.float32)
    want, got = backend.run_outputs({"input": x}), backend.run_trusted({"input": x})
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])


def test_fixed_batch_onnx_model_loops_over_the_batch(tmp_path: Path) -> None:
    backend = open_model(_tiny_onnx(tmp_path / "b1.onnx", batch=1))
    assert backend.input_shape == (1, 1, 4, 4)
    x = np.random.default_rng(1).normal(size=(3, 1, 4, 4)).astype(np.float32)
    out = backend.run(x)
    np.testing.assert_allclose(out.logits[1:2], backend.run(x[1:2]).logits)


def test_wrong_shape_and_dtype_name_expected_and_got(tmp_path: Path) -> None:
    backend = open_model(_tiny_onnx(tmp_path / "m.onnx"))
    with pytest.raises(InputError) as exc:
        backend.run(np.zeros((1, 1, 5, 4), np.float32))
    assert "1x1x5x4" in str(exc.value) and "Nx1x4x4" in str(exc.value)
    assert exc.value.context["expected"] == "Nx1x4x4"
    with pytest.raises(InputError, match="float32, got float64"):
        backend.run(np.zeros((1, 1, 4, 4)))
    with pytest.raises(InputError, match="numpy array"):
        backend.run([[0.0]])  # type: ignore[arg-type]


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(RuntimeBackendError, match="does not exist"):
        open_model(tmp_path / "nope.onnx")
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    with pytest.raises(RuntimeBackendError, match="unknown model format"):
        open_model(other)
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(RuntimeBackendError, match="cannot load"):
        open_model(corrupt)


def test_missing_runtime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny_onnx(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(RuntimeBackendError) as exc:
        open_model(path)
    assert "edgeloop[agent]" in str(exc.value)
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeBackendError, match=r"edgeloop\[tflite\]"):
        open_model(tfl)


def test_backends_come_from_a_table() -> None:
    assert BACKENDS == {"onnx": OnnxBackend, "tflite": LiteRTBackend}


def test_importing_the_runtime_does_not_import_torch() -> None:
    code = "import sys, core.runtime; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.slow
def test_litert_int8_quantizes_inputs_and_loops_fixed_batch(exported_bundle, digits_loaded) -> None:  # type: ignore[no-untyped-def]
    backend = open_model(exported_bundle.workdir / "tflite-int8.tflite")
    assert isinstance(backend, LiteRTBackend) and backend.name == "litert"
    assert backend.input_dtype == "int8" and backend.input_shape[0] == 1  # litert-torch exports batch 1
    x, _ = digits_loaded.arrays("test")
    out = backend.run(x[:5])
    assert out.logits.dtype == np.float32 and out.logits.shape == (5, len(digits_loaded.labels))
    assert out.embedding is not None and out.embedding.shape[0] == 5
    np.testing.assert_allclose(out.logits[3:4], backend.run(x[3:4]).logits)
    with pytest.raises(InputError):
        backend.run(x[:1, :, :-1])
    feed = {backend.inputs[0].name: quantize(x[:1], backend.inputs[0])}
    want, got = backend.run_outputs(feed), backend.run_trusted(feed)  # dequantized alike
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
