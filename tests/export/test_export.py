"""export_run end to end (one shared export per session), ONNX vs PyTorch, TFLite in LiteRT, BYOM, CLI."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from core.bundle import open_bundle
from core.errors import ExportError
from core.runtime import open_model

pytestmark = pytest.mark.slow

EXPECTED = {"onnx-fp32", "onnx-int8-static", "tflite-fp32", "tflite-int8"}


def test_bundle_is_signed_and_verifies(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = open_bundle(exported_bundle, trusted_key=exported_bundle.public_key)
    m = bundle.manifest
    assert {v.id for v in m.variants} == EXPECTED
    assert bundle.signed_by == exported_bundle.report.signed_by
    assert m.version == "1.0.0" and m.accuracy_budget == 0.5
    assert m.outputs.embedding == "embedding" and m.outputs.embedding_dim
    assert m.lineage.run_id == exported_bundle.report.run_id and m.lineage.data_hash
    for v in m.variants:
        assert v.accuracy_drop is not None and v.accuracy_drop <= 0.5
        assert v.latency_ms is not None and v.latency_ms > 0 and v.size > 0
    int8 = m.variant("onnx-int8-static")
    # Which recipe the gate needed depends on the CPU (ORT's u8s8 saturates on AVX2 but not with
    # AVX-512 VNNI) and on the training run, so the bundle only has to say which one it used.  The
    # fallback itself is tested with the decision forced (tests/export/test_gate_fallback.py) and on
    # a model built to need it (tests/export/test_quantize.py).
    assert {"activation_type", "weight_type", "reduce_range", "calibration"} <= set(int8.options)
    fp32_size = m.variant("onnx-fp32").size
    assert int8.size < (0.5 if not int8.float_nodes else 1.0) * fp32_size
    assert {"baseline.npz", "reference.npz", "metrics.json"} <= set(m.members)


def test_reference_and_baseline_members(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    from core.drift import Baseline

    bundle = open_bundle(exported_bundle, trusted_key=exported_bundle.public_key)
    with np.load(io.BytesIO(bundle.read("reference.npz"))) as z:
        ref = {k: z[k] for k in z.files}
    assert ref["x"].shape[0] == 8 and ref["logits"].shape == (8, len(bundle.manifest.labels))
    for vid in EXPECTED:
        assert ref[f"logits/{vid}"].shape == ref["logits"].shape and float(ref[f"tolerance/{vid}"]) > 0
        # each variant reproduces its own expected logits in the device runtime
        model = open_model(exported_bundle.workdir / f"{vid}.{vid.split('-')[0]}")
        np.testing.assert_allclose(model.run(ref["x"]).logits, ref[f"logits/{vid}"], atol=1e-4)
    Baseline.load(bundle.read("baseline.npz"))
    metrics = json.loads(bundle.read("metrics.json"))
    assert metrics["report"]["kept"] and "evaluation" in metrics


def test_report_lists_every_variant_with_its_figures(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    report = exported_bundle.report
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data["kept"]) == EXPECTED and data["excluded"] == {}
    for v in data["variants"]:
        for key in ("accuracy", "drop_pp", "size_bytes", "latency_ms", "kept", "reason", "float_nodes",
                    "max_abs_diff", "seconds", "attempts"):
            assert key in v, key
    static = report.variant("onnx-int8-static")
    assert static.attempts and static.attempts[-1]["passed"]
    assert "within budget" in static.reason
    assert report.reference_accuracy > 0.85
    assert "onnx-int8-static" in report.table()


def test_onnx_matches_pytorch_with_two_named_outputs(exported_bundle, digits_loaded) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from export.onnx_export import torch_outputs

    path = exported_bundle.workdir / "onnx-fp32.onnx"
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["logits", "embedding"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    x, _ = digits_loaded.arrays("test")
    got = open_model(path).run(x[:32])
    logits, emb = torch_outputs(digits_loaded.model, x[:32])
    np.testing.assert_allclose(got.logits, logits, atol=1e-4)
    np.testing.assert_allclose(got.embedding, emb, atol=1e-4)
    assert exported_bundle.report.onnx_max_abs_diff < 1e-4


def test_tflite_variants_run_in_litert(exported_bundle, digits_loaded) -> None:  # type: ignore[no-untyped-def]
    from export.onnx_export import torch_outputs

    x, y = digits_loaded.arrays("test")
    fp32 = open_model(exported_bundle.workdir / "tflite-fp32.tflite")
    assert fp32.name == "litert" and fp32.input_dtype == "float32"
    logits, _ = torch_outputs(digits_loaded.model, x[:8])
    np.testing.assert_allclose(fp32.run(x[:8]).logits, logits, atol=1e-3)
    int8 = open_model(exported_bundle.workdir / "tflite-int8.tflite")
    assert int8.input_dtype == "int8"
    acc = float(np.mean(np.argmax(int8.run(x).logits, 1) == y))
    assert abs(acc - exported_bundle.report.variant("tflite-int8").accuracy) < 1e-9


def test_missing_litert_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.tflite_export import require_litert_torch

    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(ExportError, match=r"edgeloop\[tflite-export\]"):
        require_litert_torch()


def test_bring_your_own_model_bundle(exported_bundle, digits_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from export.byom import create_bundle

    images, _ = digits_loaded.images("val")
    folder = tmp_path / "samples"
    folder.mkdir()
    assert len(images) >= 80, "the digits validation split is the held-out set the drift baseline needs"
    for i, img in enumerate(images[:80]):  # W = 25 needs 25 reference + 50 calibration images
        np.save(folder / f"{i}.npy", img)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(digits_loaded.labels) + "\n")
    pre = digits_loaded.preprocessing
    from edgeloop.cli import build_parser

    argv = ["bundle", "create", "--model", str(exported_bundle.workdir / "onnx-int8-static.onnx"), "--labels", str(labels),
            "--name", "byom", "--version", "0.1.0", "--size", *map(str, pre.size), "--channels", str(pre.channels),
            "--mean", *map(str, pre.mean), "--std", *map(str, pre.std), "--baseline-dir", str(folder),
            "--sign", str(exported_bundle.private_key), "--out", str(tmp_path / "byom.elb"), "--json"]
    args = build_parser().parse_args(argv)  # every flag's default, as the CLI gives them
    assert create_bundle(args) == 0
    m = open_bundle(tmp_path / "byom.elb", trusted_key=exported_bundle.public_key).manifest
    assert [v.id for v in m.variants] == ["onnx-int8-static"]
    assert m.baseline == "baseline.npz" and m.health == "reference.npz"
    assert m.input.shape == (-1, pre.channels, *pre.size)


def test_cli_export_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeloop.cli import main

    assert main(["export", str(tmp_path / "no-such-run"), "--no-tflite", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
