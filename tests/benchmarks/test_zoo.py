"""benchmarks.zoo: the summary table, entries and CLI validation (no 224x224 model is built here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.zoo import GOALS, INPUT_SHAPE, ZOO_MODELS, ZooModel, _entries, main, summary_table
from export.speed import Int8Plan


def _summary(model: str, fp32: float, naive: float, planned: float, plan: Int8Plan) -> dict:
    return {"model": model, "fp32_ms": fp32, "naive_int8_ms": naive, "plan_int8_ms": planned,
            "naive_ratio": naive / fp32, "plan_ratio": planned / fp32, "goal_ratio": GOALS[model],
            "plan": plan.to_dict()}


def test_goals_cover_every_zoo_model():
    assert set(GOALS) == set(ZOO_MODELS)
    assert INPUT_SHAPE == (3, 224, 224)


def test_summary_table_states_ratio_goal_and_plan():
    gemm = Int8Plan("qdq-matmul-only", op_types=("Gemm",), candidates=(("qdq-all", 2.5), ("qdq-matmul-only", 0.9)))
    skip = Int8Plan("qdq-skip-float-islands", op_types=("Conv", "Gemm"), nodes_to_exclude=("a", "b"),
                    candidates=(("qdq-all", 0.55),))
    text = summary_table([_summary("mobilenet_v3_small", 2.0, 5.0, 1.8, gemm),
                          _summary("resnet18", 40.0, 22.0, 21.0, skip)])
    lines = text.splitlines()
    assert lines[0].startswith("| model | FP32 p50 ms")
    assert "| mobilenet_v3_small | 2.00 | 5.00 (2.50x) | 1.80 | 0.90x | <= 1.0x (met) | `qdq-matmul-only`" in text
    assert "ops Gemm" in text
    assert "| resnet18 | 40.00 | 22.00 (0.55x) | 21.00 | 0.53x | <= 0.5x (missed)" in text
    assert "2 nodes kept float" in text
    assert "- mobilenet_v3_small: qdq-all 2.50x, qdq-matmul-only 0.90x" in text


def test_entries_describe_the_three_variants(tmp_path: Path):
    files = {}
    for kind in ("fp32", "naive", "plan"):
        files[kind] = tmp_path / f"{kind}.onnx"
        files[kind].write_bytes(b"x" * {"fp32": 400, "naive": 100, "plan": 120}[kind])
    zm = ZooModel(name="resnet18", fp32=files["fp32"], naive=files["naive"], planned=files["plan"],
                  plan=Int8Plan("qdq-all"))
    entries = _entries(zm)
    assert [e.id for e in entries] == ["resnet18-fp32", "resnet18-int8-naive", "resnet18-int8-plan:qdq-all"]
    assert [e.size_bytes for e in entries] == [400, 100, 120]
    assert all(e.runtime == "onnxruntime" and e.input_shape == INPUT_SHAPE for e in entries)
    assert [e.precision for e in entries] == ["fp32", "int8-static", "int8-static"]


def test_cli_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--models", "alexnet"])
    assert exc.value.code == 2
    assert "alexnet" in capsys.readouterr().err
