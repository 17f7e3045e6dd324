"""Stateful TFLite models: state is reset before each prediction unless the bundle declares streaming.

Two tiny models are written here as TFLite flatbuffers (LiteRT's own schema module), one
for each way TFLite keeps state between invocations:

- ``svdf``: an SVDF op with a *variable tensor* (the LSTM/RNN/SVDF kind of state); its
  memory of 3 steps sums the last three inputs' features, so y = 3, 6, 9 for x = [1, 2].
- ``resource``: *resource variables* as the TF converter writes a ``tf.Variable``
  (VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE, initialised by a CALL_ONCE subgraph):
  y = x + acc; acc = y, so y = x, 2x, 3x.  LiteRT's ``reset_all_variables()`` does not
  reset these; the runtime re-creates the interpreter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.runtime import LiteRTBackend, open_model
from tests.plugins.models import cli

schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
flatbuffers = pytest.importorskip("flatbuffers")

X = np.array([1.0, 2.0], np.float32)


def _tensor(name: str, shape: list[int], ttype: int, buf: int, variable: bool = False):  # type: ignore[no-untyped-def]
    t = schema.TensorT()
    t.name, t.shape, t.type, t.buffer, t.isVariable = name, shape, ttype, buf, variable
    return t


def _op(code: int, ins: list[int], outs: list[int], opt_type: int = 0, opt: object = None):  # type: ignore[no-untyped-def]
    o = schema.OperatorT()
    o.opcodeIndex, o.inputs, o.outputs, o.builtinOptionsType, o.builtinOptions = code, ins, outs, opt_type, opt
    return o


def _buffer(arr: np.ndarray | None = None):  # type: ignore[no-untyped-def]
    b = schema.BufferT()
    b.data = None if arr is None else np.frombuffer(np.ascontiguousarray(arr, np.float32).tobytes(), np.uint8)
    return b


def _write(path: Path, codes: list[int], subgraphs: list, buffers: list) -> Path:
    ops = []
    for c in codes:
        oc = schema.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = c, min(c, 127), 1
        ops.append(oc)
    m = schema.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers, m.description = 3, ops, subgraphs, buffers, "edgeloop test"
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def _subgraph(name: str, tensors: list, ops: list, inputs: list[int], outputs: list[int]):  # type: ignore[no-untyped-def]
    sg = schema.SubGraphT()
    sg.name, sg.tensors, sg.operators, sg.inputs, sg.outputs = name, tensors, ops, inputs, outputs
    return sg


def svdf_model(path: Path) -> Path:
    """x [1,2] -> SVDF(rank 1, 1 filter, memory 3, feature weights [1,1], time weights [1,1,1]) -> y [1,1]."""
    f32, op = schema.TensorType.FLOAT32, schema.BuiltinOperator
    opt = schema.SVDFOptionsT()
    opt.rank = 1
    tensors = [_tensor("x", [1, 2], f32, 1), _tensor("weights_feature", [1, 2], f32, 2),
               _tensor("weights_time", [1, 3], f32, 3), _tensor("state", [1, 3], f32, 0, variable=True),
               _tensor("y", [1, 1], f32, 0)]
    main = _subgraph("main", tensors, [_op(0, [0, 1, 2, -1, 3], [4], schema.BuiltinOptions.SVDFOptions, opt)], [0], [4])
    return _write(path, [op.SVDF], [main],
                  [_buffer(), _buffer(), _buffer(np.ones((1, 2))), _buffer(np.ones((1, 3)))])


def resource_variable_model(path: Path) -> Path:
    """y = x + acc; acc = y -- a tf.Variable as the TF converter writes it (zero-initialised by CALL_ONCE)."""
    f32, res, op, opts = (schema.TensorType.FLOAT32, schema.TensorType.RESOURCE, schema.BuiltinOperator,
                          schema.BuiltinOptions)

    def handle():  # type: ignore[no-untyped-def]
        o = schema.VarHandleOptionsT()
        o.container, o.sharedName = "", "acc"
        return o

    once = schema.CallOnceOptionsT()
    once.initSubgraphIndex = 1
    call_once, var_handle, read, add, assign = range(5)
    main = _subgraph("main", [_tensor("x", [1, 2], f32, 0), _tensor("acc", [], res, 0), _tensor("read", [1, 2], f32, 0),
                              _tensor("y", [1, 2], f32, 0)],
                     [_op(call_once, [], [], opts.CallOnceOptions, once),
                      _op(var_handle, [], [1], opts.VarHandleOptions, handle()), _op(read, [1], [2]),
                      _op(add, [0, 2], [3], opts.AddOptions, schema.AddOptionsT()), _op(assign, [1, 3], [])], [0], [3])
    init = _subgraph("init", [_tensor("acc", [], res, 0), _tensor("zeros", [1, 2], f32, 1)],
                     [_op(var_handle, [], [0], opts.VarHandleOptions, handle()), _op(assign, [0, 1], [])], [], [])
    return _write(path, [op.CALL_ONCE, op.VAR_HANDLE, op.READ_VARIABLE, op.ADD, op.ASSIGN_VARIABLE], [main, init],
                  [_buffer(), _buffer(np.zeros((1, 2)))])


# model builder, and the outputs of three predictions on X in a row when the state is kept
MODELS = {"svdf": (svdf_model, np.array([[3.0], [6.0], [9.0]])),
          "resource": (resource_variable_model, np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))}


def _first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())), np.float32).ravel()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("op_resolver", [None, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"])
def test_backend_reset_state_restores_the_initial_state(tmp_path: Path, kind: str, op_resolver: str | None) -> None:
    build, steps = MODELS[kind]
    be = LiteRTBackend(build(tmp_path / f"{kind}.tflite"), op_resolver=op_resolver)
    assert be.stateful
    feed = X[None]
    np.testing.assert_allclose(np.stack([_first(be.run_outputs(feed)) for _ in range(3)]), steps, rtol=1e-6)
    be.reset_state()
    np.testing.assert_allclose(_first(be.run_outputs(feed)), steps[0], rtol=1e-6)
    be.close()


def test_a_model_without_state_is_not_stateful(tmp_path: Path) -> None:
    f32 = schema.TensorType.FLOAT32
    main = _subgraph("main", [_tensor("x", [1, 2], f32, 0), _tensor("y", [1, 2], f32, 0)],
                     [_op(0, [0, 0], [1], schema.BuiltinOptions.AddOptions, schema.AddOptionsT())], [0], [1])
    be = open_model(_write(tmp_path / "plain.tflite", [schema.BuiltinOperator.ADD], [main], [_buffer()]))
    assert not be.stateful
    be.reset_state()  # a no-op, not an error
    np.testing.assert_allclose(_first(be.run_outputs(X[None])), 2 * X)
    be.close()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("streaming", [False, True])
def test_bundle_resets_state_unless_streaming(tmp_path: Path, capsys, kind: str, streaming: bool) -> None:  # type: ignore[no-untyped-def]
    from core.bundle import open_bundle
    from edge_agent.inference import LoadedModel

    build, steps = MODELS[kind]
    model = build(tmp_path / f"{kind}.tflite")
    rc, out = cli(["bundle", "create", "--model", model, "--name", "state", "--version", "1", "--task", "tensor",
                   *(["--streaming"] if streaming else []), "--out", tmp_path / "b.elb"], capsys)
    assert rc == 0, out
    assert ("state kept between predictions" if streaming else "state reset before each prediction") in out
    b = open_bundle(tmp_path / "b.elb", require_signature=False)
    assert b.manifest.task.streaming is streaming
    m = LoadedModel(Path(b.extract_to(tmp_path / "slot")), b.manifest.variants[0].id, drift=False)
    got = [_first(m.predict_result(X).outputs) for _ in range(3)]
    m.close()
    # streaming: the state accumulates from one prediction to the next; else the same input, the same answer
    np.testing.assert_allclose(np.stack(got), steps if streaming else np.stack([steps[0]] * 3), rtol=1e-6)
