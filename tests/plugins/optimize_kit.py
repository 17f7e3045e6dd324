"""Small ONNX models built here (onnx.helper) and data sets written to tmp for ``edgeloop optimize``.

* :func:`stripes_classifier`: Conv (horizontal / vertical line detectors) -> Relu ->
  GlobalAveragePool -> Gemm, fixed weights that tell horizontal from vertical stripes;
  :func:`write_stripes` writes such images, in class sub-folders (``h`` / ``v``) or not.
* fixtures ``stripes`` / ``ppocr_optimized``: ``edgeloop optimize`` run once per session on
  the stripes classifier / the real PP-OCR classifier of ../shared/models.
* :func:`cell_detector`: a YOLOv8-style raw-head detector (fixed cell boxes scored by the
  cells' mean red / green); :func:`blob_image` draws scenes for it, reference or shifted.
* :func:`tensor_model`: MatMul -> Add -> Relu -> MatMul, a tensor model (``[N, 16]`` in,
  ``[N, 8]`` out) with seeded weights; :func:`write_vectors` writes ``.npy`` inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

__all__ = ["stripes_classifier", "write_stripes", "tensor_model", "write_vectors", "STRIPE_LABELS", "stripes",
           "ppocr_optimized", "cell_detector", "blob_image"]

STRIPE_LABELS = ("h", "v")


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def stripes_classifier(path: Path, size: int = 16) -> Path:
    """[N, 1, size, size] float32 (0..1) -> logits [N, 2]: class 0 horizontal stripes, 1 vertical."""
    from onnx import TensorProto, helper, numpy_helper

    line = np.array([[-1, -1, -1], [2, 2, 2], [-1, -1, -1]], np.float32)
    conv_w = np.stack([line, -line, line.T, -line.T])[:, None]  # (4, 1, 3, 3)
    fc = np.array([[1, -1], [1, -1], [-1, 1], [-1, 1]], np.float32)  # features -> classes
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc")]
    inits = [numpy_helper.from_array(conv_w, "cw"), numpy_helper.from_array(np.zeros(4, np.float32), "cb"),
             numpy_helper.from_array(fc, "fw"), numpy_helper.from_array(np.zeros(2, np.float32), "fb")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)


def stripe_image(label: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A uint8 grey image of horizontal (``h``) or vertical (``v``) stripes with noise."""
    period = rng.integers(3, 7)
    wave = 128 + rng.uniform(50, 110) * np.sign(np.sin(2 * np.pi * (np.arange(size) + rng.uniform(0, period)) / period))
    img = np.repeat(wave[:, None], size, 1) if label == "h" else np.repeat(wave[None, :], size, 0)
    return np.clip(np.rint(img + rng.normal(0, 12, (size, size))), 0, 255).astype(np.uint8)


def write_stripes(folder: Path, n: int, *, seed: int, by_class: bool, size: int = 16) -> Path:
    """``n`` PNG stripe images, half of each class; in ``folder/<label>/`` when ``by_class``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        label = STRIPE_LABELS[i % 2]
        d = folder / label if by_class else folder
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripe_image(label, rng, size)).save(d / f"{label}{i:04d}.png")
    return folder


def cell_detector(path: Path, size: int = 32, cell: int = 8) -> Path:
    """A YOLOv8-style detector [1, 4 + 2, cells]: one fixed box per ``cell`` x ``cell`` cell, scored by the cell's
    mean red (class 0) and green (class 1) in 0..1 -- bright blobs are detected where they are."""
    from onnx import TensorProto, helper, numpy_helper

    g = size // cell
    cy, cx = np.meshgrid((np.arange(g) + 0.5) * cell, (np.arange(g) + 0.5) * cell, indexing="ij")
    boxes = np.stack([cx.ravel(), cy.ravel(), np.full(g * g, cell), np.full(g * g, cell)])[None].astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["images"], ["pool"], kernel_shape=[cell, cell], strides=[cell, cell]),
             helper.make_node("Reshape", ["pool", "shape"], ["flat"]),
             helper.make_node("Slice", ["flat", "start", "end", "axis"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1)]
    inits = [numpy_helper.from_array(boxes, "boxes"), numpy_helper.from_array(np.array([1, 3, g * g], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "start"), numpy_helper.from_array(np.array([2], np.int64), "end"),
             numpy_helper.from_array(np.array([1], np.int64), "axis")]
    return _save(path, nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                 [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, g * g])], inits)


def blob_image(rng: np.random.Generator, *, size: int = 32, shift: bool = False) -> np.ndarray:
    """Dark RGB noise with 1-3 red squares; ``shift``: a brighter, green-tinted scene with more, greener blobs."""
    img = rng.normal(40 + (70 if shift else 0), 12, (size, size, 3))
    if shift:
        img[..., 1] += 60
    for _ in range(rng.integers(1, 4 + (3 if shift else 0))):
        y, x = rng.integers(0, size - 8, 2)
        img[y:y + 8, x:x + 8, 1 if shift and rng.random() < 0.6 else 0] = rng.uniform(150, 255)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def tensor_model(path: Path, n_in: int = 16, hidden: int = 32, n_out: int = 8, seed: int = 0) -> Path:
    """[N, n_in] float32 -> y [N, n_out]: two seeded dense layers with a Relu between."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu1"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], inits)


def write_vectors(folder: Path, n: int, *, seed: int, dim: int = 16, shift: float = 0.0) -> Path:
    """``n`` ``.npy`` float32 vectors of ``dim`` values, standard normal plus ``shift``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"v{i:04d}.npy", (rng.standard_normal(dim) + shift).astype(np.float32))
    return folder


@pytest.fixture(scope="session")
def stripes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stripes classifier optimized once from the CLI: paths of model, data, bundle, report."""
    from tests.plugins.agent_kit import keys
    from tests.plugins.models import cli

    d = tmp_path_factory.mktemp("optimize-stripes")
    paths = {"model": stripes_classifier(d / "stripes.onnx"), "calib": write_stripes(d / "calib", 32, seed=1, by_class=False),
             "eval": write_stripes(d / "eval", 60, seed=2, by_class=True), "labels": d / "labels.txt",
             "bundle": d / "stripes.elb", "test": write_stripes(d / "test", 4, seed=3, by_class=True)}
    paths["labels"].write_text("\n".join(STRIPE_LABELS) + "\n")
    rc, out = cli(["optimize", paths["model"], "--calib", paths["calib"], "--eval", paths["eval"], "--labels",
                   paths["labels"], "--max-drop", "1", "--rounds", "2", "--name", "stripes", "--version", "1.0.0",
                   "--sign", keys().private, "--out", paths["bundle"]])
    assert rc == 0, out
    return paths


@pytest.fixture(scope="session")
def ppocr_optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PP-OCR text-line classifier optimized once (augmented copies of its two reference lines)."""
    from benchmarks.byom_data import ppocr_sets
    from tests.plugins.agent_kit import keys
    from tests.plugins.models import SHARED, cli, require_models

    require_models()
    m = SHARED["ppocr"]
    d = tmp_path_factory.mktemp("optimize-ppocr")
    calib, ev = ppocr_sets(d, n_calib=16, n_eval=40, models=m.dir.parent)
    (d / "labels.txt").write_text("0\n180\n")
    out = d / "ppocr.elb"
    rc, text = cli(["optimize", m.path, "--calib", calib, "--eval", ev, "--labels", d / "labels.txt", *m.flags,
                    "--max-drop", "1", "--precisions", "int8-static", "--rounds", "3", "--name", "ppocr",
                    "--version", "1.0.0", "--sign", keys().private, "--out", out])
    assert rc == 0, text
    return out
