"""``edgeloop optimize``: a user's FP32 ONNX model -> gated FP16 / INT8 variants in a signed bundle.

The metrics (top-1, mAP@0.5 against a hand-computed case, cosine / max |delta|) are pure
tests; the conversions run once per session fixture on small ONNX graphs built here
(tests/plugins/optimize_kit.py) and once on the real PP-OCR classifier of ../shared/models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.optimize_metrics import GroundTruth, Predicted, average_precision, map50, tensor_agreement, top1
from tests.plugins.agent_kit import keys
from tests.plugins.models import SHARED, agent_toml, cli

# -------------------------------------------------------------------------------- metrics (pure)


def test_map50_matches_a_hand_computed_case() -> None:
    a, b, c, d = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [5, 5, 15, 15]
    truths = [GroundTruth(np.array([a, b], float), np.array([0, 0])), GroundTruth(np.array([c, d], float), np.array([0, 1]))]
    preds = [
        Predicted(np.array([[0, 0, 10, 10], [21, 21, 31, 31], [50, 50, 60, 60], [0, 0, 9, 9]], float),
                  np.array([0, 0, 0, 2]), np.array([0.9, 0.6, 0.7, 0.95])),  # TP, TP (IoU 0.68), FP; class 2: no truth
        Predicted(np.array([[30, 30, 40, 40], [5, 5, 15, 15], [5, 5, 15, 15]], float),
                  np.array([0, 1, 1]), np.array([0.5, 0.4, 0.3])),  # FP (c missed), TP, duplicate (FP after the TP)
    ]
    # class 0, best first: TP FP TP FP over 3 truths -> recall 1/3 1/3 2/3 2/3, precision 1 .5 .67 .5;
    # envelope 1 .67 .67 .5; the 101 recall points: 0..0.33 -> 1 (34), 0.34..0.66 -> 2/3 (33), rest 0
    ap0 = (34 * 1.0 + 33 * 2 / 3) / 101
    assert average_precision(np.array([0.9, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0], bool), 3) == pytest.approx(ap0)
    assert map50(preds, truths) == pytest.approx((ap0 + 1.0) / 2)  # class 1: AP 1; class 2 has no truth: not counted
    assert map50(preds, truths, iou=0.7) < map50(preds, truths)  # the IoU 0.68 match no longer counts


def test_map50_edge_cases() -> None:
    t = [GroundTruth(np.array([[0, 0, 4, 4]], float), np.array([3]))]
    assert map50([Predicted(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))], t) == 0.0
    assert map50([Predicted(np.array([[0, 0, 4, 4]], float), np.array([3]), np.array([0.1]))], t) == 1.0


def test_top1_and_tensor_agreement() -> None:
    assert top1([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    ref = [np.array([1.0, 0.0, 2.0]), np.zeros(3)]
    mean, low, delta = tensor_agreement([np.array([1.0, 0.1, 2.0]), np.zeros(3)], ref)
    cos = 5.0 / (np.sqrt(5.01) * np.sqrt(5.0))
    assert mean == pytest.approx((cos + 1.0) / 2) and low == pytest.approx(cos) and delta == pytest.approx(0.1)


# -------------------------------------------------------------------------------- synthetic models (fixtures:
# tests/plugins/optimize_kit.py, one conversion per session)


@pytest.mark.slow
def test_optimize_ships_a_gated_int8_variant(stripes: dict[str, Path]) -> None:
    from core.bundle import read_manifest_unverified

    m = read_manifest_unverified(stripes["bundle"])
    ids = {v.id: v for v in m.variants}
    assert "onnx-fp32" in ids and "onnx-int8-static" in ids
    assert m.reference_accuracy == 1.0 and m.accuracy_budget == 1.0
    for v in m.variants:
        assert v.accuracy_drop is not None and v.accuracy_drop <= 1.0
        assert v.latency_ms is not None and v.latency_ms > 0 and v.size > 0
    assert ids["onnx-fp32"].sha256 == __import__("hashlib").sha256(stripes["model"].read_bytes()).hexdigest()
    report = json.loads(stripes["bundle"].with_name("stripes.elb.report.json").read_text())
    assert report["task"] == "classification" and "top-1 on 60 labelled inputs" in report["metric"]
    rows = {r["id"]: r for r in report["variants"]}
    assert rows["onnx-int8-static"]["kept"] and rows["onnx-int8-static"]["options"]["plan"]
    assert rows["onnx-fp32"]["latency_ratio"] == 1.0 and rows["onnx-int8-static"]["latency_ratio"] > 0
    assert "| onnx-int8-static | yes |" in stripes["bundle"].with_name("stripes.elb.report.md").read_text()


@pytest.mark.slow
def test_optimized_bundle_verifies_installs_and_predicts(stripes: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = cli(["bundle", "verify", stripes["bundle"], "--key", keys().public], capsys)
    assert rc == 0 and out.startswith("OK stripes 1.0.0"), out
    cfg = agent_toml(tmp_path / "agent.toml", tmp_path / "state", keys().public)
    rc, out = cli(["agent", "install", "-c", cfg, stripes["bundle"]], capsys)
    assert rc == 0, out
    for label in ("h", "v"):
        for f in sorted((stripes["test"] / label).iterdir()):
            rc, out = cli(["agent", "predict", "-c", cfg, f, "--json"], capsys)
            assert rc == 0, out
            assert json.loads(out)["label"] == label


@pytest.mark.slow
def test_tensor_model_gated_on_cosine_and_rejected_variants_reported(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from core.bundle import read_manifest_unverified
    from tests.plugins.optimize_kit import tensor_model, write_vectors

    model = tensor_model(tmp_path / "t.onnx")
    calib, ev = write_vectors(tmp_path / "calib", 24, seed=1), write_vectors(tmp_path / "eval", 24, seed=2)
    out_file = tmp_path / "t.elb"
    rc, out = cli(["optimize", model, "--calib", calib, "--eval", ev, "--max-drop", "0", "--rounds", "1",
                   "--precisions", "int8-static,int8-dynamic", "--out", out_file, "--json"], capsys)
    assert rc == 0, out
    report = json.loads(out)
    assert "mean cosine vs FP32" in report["metric"] and report["reference"] == 1.0
    # INT8 moves a float model's outputs a little: with a zero budget both are reported and left out
    assert set(report["excluded"]) == {"onnx-int8-static", "onnx-int8-dynamic"}
    assert all("exceeds the 0.0 pp budget" in why or "best drop" in why for why in report["excluded"].values())
    assert [v.id for v in read_manifest_unverified(out_file).variants] == ["onnx-fp32"]
    assert any("max |delta|" in n for n in report["notes"])
    # with a budget the same variants ship, each with its cosine and max |delta| in the notes
    rc, out = cli(["optimize", model, "--calib", calib, "--eval", ev, "--max-drop", "1", "--rounds", "1",
                   "--precisions", "int8-dynamic", "--out", out_file, "--json"], capsys)
    assert rc == 0, out
    report = json.loads(out)
    assert report["kept"] == ["onnx-fp32", "onnx-int8-dynamic"]
    assert any(n.startswith("onnx-int8-dynamic: mean cosine 0.99") for n in report["notes"])


def _one_error_line(err: str) -> bool:
    """One ``edgeloop: error: ...`` line and no traceback (progress lines before it are fine: stderr)."""
    return sum(line.startswith("edgeloop: error") for line in err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_errors_are_one_line_naming_model_reason_and_fix(stripes: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "eval" / "diagonal"
    bad.mkdir(parents=True)
    (bad / "x.npy").write_bytes(b"")
    rc, err = cli(["optimize", stripes["model"], "--calib", stripes["calib"], "--eval", tmp_path / "eval", "--labels",
                   stripes["labels"], "--out", tmp_path / "x.elb"], capsys)
    assert rc == 2 and _one_error_line(err) and "'diagonal' is not a label" in err and "name each sub-folder" in err
    from tests.plugins.optimize_kit import tensor_model

    (tmp_path / "model.tflite").write_bytes(tensor_model(tmp_path / "t.onnx").read_bytes())
    rc, err = cli(["optimize", tmp_path / "model.tflite", "--calib", stripes["calib"]], capsys)
    assert rc == 2 and _one_error_line(err) and "model.tflite" in err
    assert not (tmp_path / "x.elb").exists()


# -------------------------------------------------------------------------------- the real PP-OCR classifier

@pytest.mark.slow
def test_ppocr_gets_a_gated_int8_variant_that_still_reads_the_reference(ppocr_optimized: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from core.bundle import read_manifest_unverified

    m = read_manifest_unverified(ppocr_optimized)
    int8 = m.variant("onnx-int8-static")
    assert int8.accuracy_drop is not None and int8.accuracy_drop <= 1.0 and m.reference_accuracy >= 0.9
    cfg = agent_toml(tmp_path / "agent.toml", tmp_path / "state", keys().public, variant="onnx-int8-static")
    rc, out = cli(["agent", "install", "-c", cfg, ppocr_optimized], capsys)
    assert rc == 0, out
    rc, out = cli(["agent", "predict", "-c", cfg, SHARED["ppocr"].dir / "text_cls.jpg", "--json"], capsys)
    assert rc == 0, out
    pred = json.loads(out)
    assert pred["variant"] == "onnx-int8-static" and pred["label"] == "180"  # RapidOCR's test_only_cls
