"""Progress on stderr (core/progress.py): steps with and without a count, ``-q``, and the commands that
use it -- ``export``, ``optimize``, ``bench`` -- keep ``--json`` stdout parseable while stderr gets the lines."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.progress import Progress, in_progress, set_quiet
from edgeloop.cli import main


@pytest.fixture(autouse=True)
def _loud() -> Iterator[None]:
    set_quiet(False)
    yield
    set_quiet(False)  # `-q` in one test must not silence the next


def test_counted_steps_number_each_line_and_end_with_a_total() -> None:
    err = io.StringIO()
    with Progress("bench cells", 2, stream=err) as bar:
        bar.step("a (onnxruntime) threads=1")
        bar.step("b (onnxruntime) threads=1")
        bar.step("c (tflite) threads=1")  # one more than foreseen: the count grows, never past 100 %
    lines = err.getvalue().splitlines()
    assert lines[:3] == ["bench cells [1/2]: a (onnxruntime) threads=1", "bench cells [2/2]: b (onnxruntime) threads=1",
                         "bench cells [3/3]: c (tflite) threads=1"]
    assert lines[3].startswith("bench cells: 3/3 done (") and bar.done == 3


def test_uncounted_steps_are_one_line_each_and_quiet_is_silent() -> None:
    err = io.StringIO()
    with Progress("optimize", None, stream=err) as bar:
        assert in_progress()
        bar.step("metric: top-1")
    assert err.getvalue() == "optimize: metric: top-1\n" and not in_progress()
    set_quiet(True)
    with Progress("optimize", None, stream=err) as bar:
        assert not in_progress()  # a library bar opened inside (enabled=in_progress()) stays silent too
        bar.step("metric: top-1")
    assert err.getvalue() == "optimize: metric: top-1\n"


def test_a_bar_inside_a_bar_is_a_row_of_the_same_live_display() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pytest.importorskip("rich")
    err = Tty()
    with Progress("optimize", None, stream=err) as outer:
        outer.step("prepare")
        with Progress("INT8 gate attempts", 2, stream=err, enabled=in_progress()) as inner:
            inner.advance(status="qdq-all: accepted")
            inner.advance(status="qdq-skip: rejected")
        outer.step("timing")
    text = err.getvalue()
    assert "optimize: prepare" in text and "INT8 gate attempts: 2/2" in text and text.rstrip().endswith("(0 s)")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if "--json" in argv else cap.out, cap.err


class _FakeExport:
    def to_dict(self) -> dict[str, Any]:
        return {"bundle": "m.elb", "variants": []}

    def table(self) -> str:
        return "bundle m.elb"


@pytest.mark.parametrize("quiet", [False, True])
def test_export_json_stdout_stays_clean_and_steps_go_to_stderr(quiet: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import export.pipeline

    def fake_export_run(run: Path, *, progress: Any, onnx_precisions: tuple[str, ...], **_: Any) -> _FakeExport:
        for msg in ("ONNX FP32: export and compare with PyTorch", "ONNX int8-static: gate",
                    "measuring batch-1 latency", "drift baseline", "writing m.elb"):
            progress(msg)
        return _FakeExport()

    monkeypatch.setattr(export.pipeline, "export_run", fake_export_run)
    rc, out, err = _run(["export", str(tmp_path), "--no-tflite", "--onnx-precisions", "fp32,int8-static", "--json"]
                        + (["-q"] if quiet else []), capsys)
    assert rc == 0 and out == {"bundle": "m.elb", "variants": []}
    if quiet:
        assert err == ""
    else:
        assert "export [1/5]: ONNX FP32: export and compare with PyTorch" in err
        assert "export [5/5]: writing m.elb" in err and "export: 5/5 done" in err


def test_optimize_json_and_gate_attempts_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.plugins.optimize_kit import STRIPE_LABELS, stripes_classifier, write_stripes

    model = stripes_classifier(tmp_path / "stripes.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(STRIPE_LABELS) + "\n")
    argv = ["optimize", str(model), "--calib", str(write_stripes(tmp_path / "calib", 16, seed=1, by_class=False)),
            "--eval", str(write_stripes(tmp_path / "eval", 30, seed=2, by_class=True)), "--labels", str(labels),
            "--precisions", "int8-static", "--max-drop", "5", "--rounds", "2", "--out", str(tmp_path / "s.elb"),
            "--json"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and out["bundle"].endswith("s.elb")
    assert "optimize: metric: " in err and "INT8 gate attempts: 1/" in err
    assert err.splitlines()[-1].startswith("optimize: timing FP32 and 1 variant(s)")


@pytest.mark.parametrize("quiet", [False, True])
def test_bench_json_and_cells_on_stderr(quiet: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.benchmarks.test_bench import _tiny_onnx

    path = _tiny_onnx(tmp_path / "tiny.onnx")
    rc, out, err = _run(["bench", str(path), "--threads", "1", "--batch", "1", "--runs", "5", "--warmup", "1",
                         "--out", str(tmp_path / "out"), "--json"] + (["-q"] if quiet else []), capsys)
    assert rc == 0 and len(out["cells"]) == 1
    if quiet:
        assert "bench cells" not in err
    else:
        assert "bench cells [1/1]: " in err and "bench cells: 1/1 done" in err


def test_the_demo_announces_its_phases_and_trains_with_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Up to the training only (the whole demo is tests/demo's): a stand-in broker, a stand-in train_run."""
    from types import SimpleNamespace

    import demo.broker
    import train.api
    from core.errors import FleetError
    from demo.run import PHASES, DemoConfig, run_demo

    broker = SimpleNamespace(kind="stand-in", host="127.0.0.1", port=1, protocol="5", stop=lambda: None)
    monkeypatch.setattr(demo.broker, "start_broker", lambda *_a, **_k: broker)
    seen: dict[str, Any] = {}

    def train_run(_config: Any, **kwargs: Any) -> Path:
        seen.update(kwargs)
        raise FleetError("stop after the first phase")

    monkeypatch.setattr(train.api, "train_run", train_run)
    timeline: list[str] = []
    with pytest.raises(FleetError, match="stop after the first phase"):
        run_demo(DemoConfig(out=tmp_path, quick=True), say=timeline.append)
    cap = capsys.readouterr()
    assert seen == {"progress": True} and cap.out == ""
    assert f"demo [1/{len(PHASES)}]: train: tiny-cnn on digits, 6 epochs" in cap.err
    assert timeline and "broker: stand-in" in timeline[0]  # the timeline stays the caller's (stdout without --json)
