"""INT8 / FP16 through the real ONNX Runtime, and the accuracy gate on a quantization-sensitive model.

The sensitive model is a small CNN trained on the 8x8 digits, then rewritten so that
one channel of its first convolution is 1000x larger and the next convolution
compensates: the float function is unchanged, but the activation tensor's range is
1000x wider, so per-tensor INT8 rounds every other channel to zero.  Every static
recipe collapses; the gate must find that layer and keep it in float.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.runtime import open_model
from export.calibration import CalibrationConfig, ImageCalibrationReader, select_samples
from export.gate import check_variant, exclusion_units, gate_static_int8
from export.measure import accuracy
from export.quantize import (
    StaticSettings,
    convert_fp16,
    count_ops,
    preprocess_for_quantization,
    quantize_dynamic_int8,
    quantize_static_int8,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Sensitive:
    fp32: Path
    pre: Path
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    reference: float


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sensitive]:
    import torch
    from sklearn.datasets import load_digits

    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, va, te = idx[:1100], idx[1100:1450], idx[1450:]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward_with_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.c2(torch.relu(self.c1(t))))
            emb = h.amax(dim=(2, 3))
            return self.fc(emb), emb

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.forward_with_embedding(t)[0]

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _ in range(80):  # full batch: 8x8 digits, a few seconds
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    with torch.no_grad():  # the outlier channel; ReLU is positively homogeneous, so float outputs are unchanged
        net.c1.weight[0] *= 1000.0
        net.c1.bias[0] *= 1000.0
        net.c2.weight[:, 0] /= 1000.0
    work = tmp_path_factory.mktemp("sensitive")
    fp32 = export_onnx(net, work / "fp32.onnx", x[:1], check_inputs=x[te[:16]], atol=1e-3).path
    pre = preprocess_for_quantization(fp32, work / "pre.onnx")
    reference = accuracy(fp32, x[te], y[te])
    assert reference > 0.85, "the float model must be good for the test to mean anything"
    yield Sensitive(fp32, pre, (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), reference)


def test_calibration_reader_yields_batch1_then_none() -> None:
    images = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    reader = ImageCalibrationReader(images, "input")
    items = [reader.get_next() for _ in range(4)]
    assert [None if i is None else i["input"].shape for i in items] == [(1, 1, 4, 4)] * 3 + [None]
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], images[:1])  # type: ignore[index]
    assert len(list(reader)) == 3


def test_select_samples_is_stratified_and_bounded() -> None:
    x = np.zeros((100, 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = np.arange(100)
    y = np.repeat(np.arange(10), 10)
    picked = select_samples(x, y, 20, seed=1)
    classes = y[picked[:, 0, 0, 0].astype(int)]
    assert np.bincount(classes, minlength=10).tolist() == [2] * 10
    assert len(select_samples(x, y, 500)) == 100


def test_calibration_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="calibration method"):
        CalibrationConfig(method="kl")
    with pytest.raises(ConfigError, match="samples"):
        CalibrationConfig(samples=0)


def test_static_int8_has_qdq_nodes_and_runs_in_ort(sensitive: Sensitive, tmp_path: Path) -> None:
    calib = select_samples(*sensitive.train, 64)
    out = quantize_static_int8(sensitive.pre, tmp_path / "q.onnx", calib,
                               StaticSettings("u8s8-reduce-range", reduce_range=True),
                               calibration=CalibrationConfig(method="percentile"))
    ops = count_ops(out)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    assert ops["Conv"] == 2  # QDQ keeps the float op between DequantizeLinear / QuantizeLinear pairs
    assert out.stat().st_size < sensitive.fp32.stat().st_size
    result = open_model(out).run(sensitive.test[0][:4])
    assert result.logits.shape == (4, 10) and result.embedding is not None


def test_dynamic_int8_and_fp16_run(sensitive: Sensitive, tmp_path: Path) -> None:
    dyn = quantize_dynamic_int8(sensitive.pre, tmp_path / "dyn.onnx")
    ops = count_ops(dyn)
    assert ops["DynamicQuantizeLinear"] >= 1 and "ConvInteger" not in ops  # Gemm/MatMul only
    half = convert_fp16(sensitive.fp32, tmp_path / "fp16.onnx")
    assert open_model(half).input_dtype == "tensor(float)"  # float32 I/O kept
    gate = check_variant("onnx-fp16", half, *sensitive.test, sensitive.reference, max_drop=0.5)
    assert gate.passed, gate.reason


def test_exclusion_unit_keeps_a_layers_output_float(sensitive: Sensitive) -> None:
    units = exclusion_units(sensitive.pre)
    first, second = list(units)[:2]
    assert units[first][0] == first and second in units[first]  # conv1 -> relu -> conv2


def test_gate_finds_the_outlier_layer_and_keeps_it_in_float(sensitive: Sensitive, tmp_path: Path) -> None:
    calib = select_samples(*sensitive.train, 100)
    # 347 test images: one image is 0.29 pp, so a 1-point budget leaves room for three.
    result = gate_static_int8(sensitive.pre, tmp_path, calib, sensitive.test, sensitive.reference, max_drop=1.0,
                              select=sensitive.val)
    plain = [a for a in result.attempts if not a.float_nodes]
    assert len(plain) == 3 and not any(a.passed for a in plain)  # every recipe collapses on the outlier
    assert max(a.drop_pp for a in plain) > 10
    assert result.passed, result.reason
    assert result.drop_pp is not None and result.drop_pp <= 1.0
    first_conv = next(iter(exclusion_units(sensitive.pre)))
    assert first_conv in result.float_nodes
    assert max(result.sensitivity, key=result.sensitivity.__getitem__) == first_conv
    assert "kept in float" in result.reason
    assert result.path is not None and count_ops(result.path)["QuantizeLinear"] >= 1  # the rest stays INT8


def test_gate_rejects_when_it_may_not_keep_layers_in_float(sensitive: Sensitive, tmp_path: Path) -> None:
    calib = select_samples(*sensitive.train, 50)
    result = gate_static_int8(sensitive.pre, tmp_path, calib, sensitive.test, sensitive.reference, max_drop=0.5,
                              max_float_layers=0)
    assert not result.passed and result.path is None
    assert "no static INT8 recipe within 0.5 pp" in result.reason
