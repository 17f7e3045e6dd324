"""The benchmark code's logic on tiny inputs: statistics, report writing, --compare, one real cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.measure import CellSpec, measure_cell
from benchmarks.model_bench import BenchConfig, ModelEntry, run_matrix
from benchmarks.report import compare, load_result, markdown_table, rows, write_report
from benchmarks.stats import pareto_front, summarize
from core.errors import BenchmarkError
from edgeloop.cli import main


def test_summarize_percentiles_and_throughput():
    s = summarize([float(i) for i in range(1, 101)], batch=8)
    assert s.n == 100 and s.min_ms == 1 and s.max_ms == 100
    assert s.p50_ms == pytest.approx(50.5) and s.p99_ms == pytest.approx(99.01)
    assert s.throughput_per_s == pytest.approx(8 * 1000 / 50.5)
    with pytest.raises(ValueError):
        summarize([])


def test_pareto_front_minimises_latency_and_maximises_accuracy():
    pts = [(1.0, 90.0), (2.0, 95.0), (3.0, 94.0), (0.5, 80.0), (2.0, 96.0)]
    assert pareto_front(pts) == [0, 3, 4]


def _fake_result(p50: float, size: int = 1000) -> dict:
    lat = {"1": {"n": 200, "mean_ms": p50, "std_ms": 0.1, "min_ms": p50 / 2, "p50_ms": p50, "p90_ms": p50 * 1.2,
                 "p99_ms": p50 * 1.5, "max_ms": p50 * 2, "batch": 1, "throughput_per_s": 1000 / p50}}
    entry = {"id": "onnx-fp32", "runtime": "onnxruntime", "precision": "fp32", "path": "m.onnx",
             "size_bytes": size, "input_shape": [1, 8, 8], "accuracy": 0.98}
    return {"system": {"cpu": "test", "cores": 2, "command": "edgeloop bench x"},
            "cells": [{"entry": entry, "threads": 1, "load_ms": 3.0, "peak_rss_mb": 50.0, "latency": lat}]}


def test_report_files_and_compare(tmp_path: Path):
    a, b = _fake_result(2.0), _fake_result(1.0, size=500)
    pa = write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    assert pa["json"].exists() and "onnx-fp32" in pa["markdown"].read_text()
    assert "| onnx-fp32 | onnxruntime | 1 | 1 | 2.000" in markdown_table(a)
    ratios = compare(load_result(tmp_path / "a" / "bench.json"), load_result(tmp_path / "b" / "bench.json"))
    assert ratios[0]["p50_ms_ratio"] == pytest.approx(0.5)
    assert ratios[0]["size_bytes_ratio"] == pytest.approx(0.5)
    assert rows(a)[0]["throughput_per_s"] == pytest.approx(500)


def test_compare_cli(tmp_path: Path, capsys):
    write_report(_fake_result(2.0), tmp_path / "a")
    write_report(_fake_result(3.0), tmp_path / "b")
    assert main(["bench", "--compare", str(tmp_path / "a/bench.json"), str(tmp_path / "b/bench.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["p50_ms_ratio"] == pytest.approx(1.5)


def test_cli_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["bench", str(tmp_path / "missing.elb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["bench", "--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")]) == 2
    assert "not a benchmark result" in capsys.readouterr().err
    with pytest.raises(BenchmarkError):
        BenchConfig(threads=(0,))


def _tiny_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 3], np.random.default_rng(0).standard_normal(192).astype(np.float32).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_real_cell_in_fresh_process(tmp_path: Path):
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    entry = ModelEntry(id="onnx-fp32", runtime="onnxruntime", precision="fp32", path=str(path),
                       size_bytes=path.stat().st_size, input_shape=(1, 8, 8), accuracy=None)
    cells = run_matrix([entry], BenchConfig(threads=(1,), batches=(1, 4), runs=30, warmup=2, time_budget_s=5))
    (cell,) = cells
    assert cell.result.get("error") is None, cell.result
    assert set(cell.result["latency"]) == {"1", "4"}
    assert cell.result["latency"]["4"]["n"] == 30
    assert cell.result["peak_rss_mb"] >= cell.result["baseline_rss_mb"] > 0
    # in-process measurement agrees on structure
    res = measure_cell(CellSpec(path=str(path), runtime="onnxruntime", threads=1, batches=(2,), input_shape=(1, 8, 8),
                                warmup=1, runs=5))
    assert res.latency[2].n == 5 and res.load_ms > 0


def test_more_threads_than_cores_is_warned_and_marked(tmp_path: Path, capsys, monkeypatch):
    from benchmarks import model_bench
    from benchmarks.model_bench import oversubscription

    assert oversubscription((1, 2), 2) is None
    warning = oversubscription((1, 2, 4), 2)
    assert warning and "--threads 4 exceeds the 2 cores" in warning and "--threads 1,2" in warning
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setattr(model_bench, "usable_cores", lambda: 1)
    rc = main(["bench", str(path), "--threads", "2", "--batch", "1", "--runs", "5", "--warmup", "1",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: --threads 2 exceeds the 1 core this machine" in err
    result = load_result(tmp_path / "out" / "bench.json")
    assert result["warnings"] and result["cores_usable"] == 1
    md = markdown_table(result)
    assert "| 2 (> 1 cores) |" in md and "**Warning:**" in md


def test_latency_accuracy_plot_draws_the_pareto_front_as_a_staircase(tmp_path: Path):
    from benchmarks.report import _front_steps, plot

    # one point on the front still gives a visible line: up to it, then right to the edge
    assert _front_steps([(1.0, 90.0)], 5.0, 80.0) == ([1.0, 1.0, 5.0], [80.0, 90.0, 90.0])
    xs, ys = _front_steps([(1.0, 90.0), (2.0, 95.0)], 5.0, 80.0)
    assert xs == [1.0, 1.0, 2.0, 2.0, 5.0] and ys == [80.0, 90.0, 90.0, 95.0, 95.0]
    result = _fake_result(2.0)
    fast = json.loads(json.dumps(result["cells"][0]))
    fast["entry"].update(id="onnx-int8", accuracy=0.97)
    fast["latency"]["1"]["p50_ms"] = 1.0
    result["cells"].append(fast)
    names = {p.name for p in plot(result, tmp_path)}
    assert names == {"latency_vs_accuracy.png", "sizes.png"}


@pytest.mark.parametrize("line, want", [
    (["a.elb", "b.elb"], ["a.elb", "b.elb"]),
    ([], []),  # no bundle: the benchmark builds digits and MobileNetV2
    (["a.elb", "--pipeline", "--runs", "50"], ["a.elb", "--pipeline", "--runs", "50"]),
])
def test_bench_agent_overhead_passes_the_rest_of_the_line_on(monkeypatch, tmp_path: Path, line: list[str],
                                                            want: list[str]) -> None:  # type: ignore[no-untyped-def]
    import benchmarks.agent_overhead

    seen: list[list[str]] = []
    monkeypatch.setattr(benchmarks.agent_overhead, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--out", str(tmp_path), "--agent-overhead", *line]) == 0
    assert seen == [["--out", str(tmp_path), *want]]
