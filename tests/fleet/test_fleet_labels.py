"""Labels: CSV import/export for outside tools, teacher pseudo-labels with a confidence threshold."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from core import signing
from core.bundle import write_bundle
from core.errors import DataError, SignatureError
from core.manifest import InputSpec, Manifest, OutputSpec, Preprocessing, Variant
from core.sampling import DriftSample, encode_sample
from fleet.labels import export_labels_csv, import_labels_csv, pseudo_label
from fleet.registry import Registry
from fleet.samples import SampleStore, sample_record


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Registry, SampleStore]:
    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    store = SampleStore(tmp_path / "samples")
    return reg, store


def add_sample(reg: Registry, store: SampleStore, sid: str, gray: int) -> None:
    image = np.full((8, 8), gray, dtype=np.uint8)
    data = encode_sample(DriftSample(sid, "cam-1", time.time(), "1", 0, 0.5, 1.0, "drift", image))
    reg.add_samples([sample_record(store, "cam-1", sid, data, {})])


def brightness_teacher(path: Path, key: signing.PrivateKey) -> Path:
    """A real 2-class ONNX model: class "1" for bright images, "0" for dark, unsure for mid-gray."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.stack([np.full(64, -0.5), np.full(64, 0.5)], axis=1).astype(np.float32)
    b = np.array([16.0, -16.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])], "teacher",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = Manifest(name="teacher", version="1", created="2025-01-01T00:00:00+00:00", labels=("0", "1"),
                        input=InputSpec("input", (1, 1, 8, 8)), outputs=OutputSpec(embedding=None),
                        preprocessing=Preprocessing(size=(8, 8)),
                        variants=(Variant("onnx-fp32", "onnx", "fp32", "models/onnx-fp32.onnx"),),
                        baseline=None, health=None)
    return write_bundle(path, manifest, {"models/onnx-fp32.onnx": model.SerializeToString()}, signing_key=key)


def test_csv_export_then_import_round_trip(fleet: tuple[Registry, SampleStore], tmp_path: Path) -> None:
    reg, store = fleet
    for i in range(3):
        add_sample(reg, store, f"s{i}", 10 * i)
    out = tmp_path / "export.csv"
    assert export_labels_csv(reg, store, out) == 3
    rows = list(csv.DictReader(out.open()))
    assert [r["sample_id"] for r in rows] == ["s0", "s1", "s2"]
    assert all(Path(r["path"]).is_file() for r in rows)  # outside tools open the payloads directly
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\ns0,4\ns2,5\nlater,6\n")
    res = import_labels_csv(reg, labels)
    assert (res.rows, res.labelled, res.pending) == (3, 2, 1)
    s2 = reg.sample("s2")
    assert s2 is not None and s2.label == "5" and s2.label_source == "import"
    assert export_labels_csv(reg, store, out, labelled=False) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("id,class\ns0,1\n")
    with pytest.raises(DataError, match="sample_id and label"):
        import_labels_csv(reg, bad)


def test_teacher_labels_only_confident_samples(fleet: tuple[Registry, SampleStore], tmp_path: Path) -> None:
    reg, store = fleet
    priv, pub = signing.generate_keypair()
    teacher = brightness_teacher(tmp_path / "teacher-1.elb", priv)
    add_sample(reg, store, "dark", 0)
    add_sample(reg, store, "bright", 255)
    add_sample(reg, store, "unsure", 128)
    add_sample(reg, store, "known", 255)
    reg.label_samples([("known", "0", "operator")])  # a true label is never overwritten
    res = pseudo_label(reg, store, teacher, trusted_key=pub, threshold=0.9)
    assert (res.considered, res.labelled, res.below_threshold, res.unreadable) == (3, 2, 1, 0)
    dark, bright, unsure, known = (reg.sample(s) for s in ("dark", "bright", "unsure", "known"))
    assert dark is not None and dark.label == "0" and dark.label_source == "teacher"
    assert dark.label_confidence is not None and dark.label_confidence > 0.9
    assert bright is not None and bright.label == "1"
    assert unsure is not None and unsure.label is None
    assert known is not None and known.label == "0" and known.label_source == "operator"
    other, _ = signing.generate_keypair()
    with pytest.raises(SignatureError):  # a teacher is verified like any bundle
        pseudo_label(reg, store, brightness_teacher(tmp_path / "t2.elb", other), trusted_key=pub)
