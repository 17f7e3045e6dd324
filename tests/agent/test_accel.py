"""Accelerators: what the installed wheels offer, timed by ``auto`` as ``variant@accelerator``, served after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import RuntimeBackendError
from core.runtime import open_model
from edge_agent import accel
from edge_agent.agent import Agent
from edge_agent.updater import slot_choice
from tests.plugins.agent_kit import agent_config

MODELS = Path(__file__).resolve().parents[2] / ".." / "shared" / "models"
TOYCAR = MODELS / "06_toycar_anomaly_autoencoder_tflite" / "ad01_int8.tflite"


def test_available_lists_cpu_first_and_only_compute_providers() -> None:
    import onnxruntime as ort

    onnx = accel.available("onnx")
    assert onnx[0].id == accel.CPU and all(a.format == "onnx" for a in onnx)
    assert all(a.id.removeprefix("ort:") in accel.COMPUTE_PROVIDERS for a in onnx[1:])
    assert "ort:AzureExecutionProvider" not in {a.id for a in onnx}  # a cloud call, not an accelerator
    assert {a.id for a in onnx[1:]} == {f"ort:{p}" for p in ort.get_available_providers() if p in accel.COMPUTE_PROVIDERS}
    tfl = accel.available("tflite")
    assert [a.id for a in tfl][:2] == [accel.CPU, "litert:builtin"]
    assert accel.split_key("onnx-fp32@ort:CUDAExecutionProvider") == ("onnx-fp32", "ort:CUDAExecutionProvider")
    assert accel.split_key("tflite-int8") == ("tflite-int8", "cpu")


def test_auto_times_every_accelerator_and_serves_the_choice_after_a_restart(
        tiny_bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An execution provider besides the default (here ORT's CPU provider named explicitly, the one
    every wheel has) is timed, recorded in slot.json, shown in the status and reopened on start."""
    real = accel.available
    extra = accel.Accelerator("ort:CPUExecutionProvider", "onnx", "test: the CPU provider as an explicit EP")
    monkeypatch.setattr(accel, "available", lambda fmt=None, **kw: real(fmt, **kw) + ([extra] if fmt == "onnx" else []))
    cfg = agent_config(tmp_path / "state")
    with Agent(cfg).start(connect=False) as agent:
        result = agent.install(tiny_bundles["v1"])
        c = result.choice
        assert set(c.latency_ms) == {"onnx-fp32", "onnx-fp32@ort:CPUExecutionProvider"}
        assert c.accelerator in ("cpu", "ort:CPUExecutionProvider")
        assert agent.model.accelerator == c.accelerator
        assert agent.predict(np.zeros((8, 8), np.uint8)).label
        st = agent.status()
        assert st.choice is not None and st.choice.accelerator == c.accelerator
        assert slot_choice(agent.slots, st.slot).accelerator == c.accelerator
        assert "onnx:cpu" in agent.device_state().hardware["accelerators"]
    with Agent(cfg).start(connect=False) as again:  # a restart opens the slot on the recorded accelerator
        assert again.model.accelerator == c.accelerator


def test_litert_builtin_kernels_give_the_default_kernels_answer() -> None:
    if not TOYCAR.is_file():
        pytest.skip(f"third-party models not found at {MODELS}")
    pytest.importorskip("ai_edge_litert")
    default = open_model(TOYCAR)
    builtin = accel.open_accelerated(TOYCAR, None, "litert:builtin")
    spec = default.inputs[0]
    x = np.random.default_rng(0).integers(-20, 20, size=(1, *spec.shape[1:])).astype(spec.dtype)
    a, b = default.run_raw(x), builtin.run_raw(x)
    assert a.keys() == b.keys()
    for k in a:  # int8 kernels may round differently by one step
        assert np.max(np.abs(a[k].astype(np.int32) - b[k].astype(np.int32))) <= 1


def test_missing_delegate_or_unknown_accelerator_is_a_one_line_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if not TOYCAR.is_file():
        pytest.skip(f"third-party models not found at {MODELS}")
    pytest.importorskip("ai_edge_litert")
    monkeypatch.setenv("EDGELOOP_EDGETPU_LIB", str(tmp_path / "libedgetpu.so.1"))  # configured but not there
    assert "litert:edgetpu" not in {a.id for a in accel.available("tflite")}
    with pytest.raises(RuntimeBackendError) as err:
        accel.open_accelerated(TOYCAR, None, "litert:edgetpu")
    assert "not available for tflite models" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RuntimeBackendError, match="not available for tflite models"):
        accel.open_accelerated(TOYCAR, None, "ort:CUDAExecutionProvider")
