"""The static INT8 gate's fallback with the decision forced: which recipe it picks must not
depend on the CPU the tests run on (AVX2, AVX-512 VNNI, ARM) nor on a training run.

``export.gate._try`` (quantize one recipe, measure it) is replaced by a script saying which
attempts pass; the gate's own logic — order of recipes, float-layer fallback, the reason
and options it records — runs for real.  The quantization itself is tested on a model
built to need the fallback in tests/export/test_quantize.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import export.gate as gate
from export.quantize import STATIC_ATTEMPTS


def _script(monkeypatch: pytest.MonkeyPatch,
            passes: Callable[[str, tuple[str, ...]], bool]) -> list[tuple[str, tuple[str, ...]]]:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def fake_try(pre_path, out, calib, settings, exclude, calibration, cache, data, reference, max_drop):  # type: ignore[no-untyped-def]
        calls.append((settings.name, exclude))
        ok = passes(settings.name, exclude)
        acc = reference if ok else reference - 0.3
        return gate.Attempt(settings.name, exclude, acc, gate.percentage_points(reference, acc), ok)

    monkeypatch.setattr(gate, "_try", fake_try)
    return calls


def _run(tmp_path: Path) -> gate.AccuracyGateResult:
    data = (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))
    return gate.gate_static_int8(tmp_path / "pre.onnx", tmp_path / "work", data[0], data, 0.95, max_drop=1.0)


def test_default_recipe_passing_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _script(monkeypatch, lambda name, exclude: True)  # e.g. a VNNI CPU: u8s8 does not saturate
    r = _run(tmp_path)
    assert r.passed and calls == [("u8s8", ())] and r.options["reduce_range"] is False
    assert r.reason == "within budget with u8s8"


def test_saturating_default_falls_back_to_reduce_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _script(monkeypatch, lambda name, exclude: name != "u8s8")  # AVX2: u8s8 saturates
    r = _run(tmp_path)
    assert r.passed and [c[0] for c in calls] == ["u8s8", "u8s8-reduce-range"]
    assert r.options["reduce_range"] is True and r.options["weight_type"] == "int8"
    assert "after 1 rejected attempt(s)" in r.reason and [a.passed for a in r.attempts] == [False, True]


def test_then_uint8_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _script(monkeypatch, lambda name, exclude: name == "u8u8")
    r = _run(tmp_path)
    assert r.passed and r.options["weight_type"] == "uint8" and len(r.attempts) == len(STATIC_ATTEMPTS)


def test_every_recipe_failing_keeps_the_most_sensitive_layer_in_float(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    _script(monkeypatch, lambda name, exclude: "conv1" in exclude)
    monkeypatch.setattr(gate, "exclusion_units", lambda pre: {"conv1": ("conv1", "relu1"), "fc": ("fc",)})
    # the sensitivity probes: excluding conv1 recovers the most accuracy on the validation split
    _probe = [False]
    monkeypatch.setattr(gate, "accuracy", lambda path, x, y: 0.9 if "probe" in str(path) and _probe[0] else 0.5)

    def fake_quantize(pre, out, calib, settings, *, calibration, nodes_to_exclude, cache_path):  # type: ignore[no-untyped-def]
        _probe[0] = "conv1" in nodes_to_exclude

    monkeypatch.setattr(gate, "quantize_static_int8", fake_quantize)
    r = _run(tmp_path)
    assert r.passed and r.float_nodes == ("conv1", "relu1"), r.reason
    assert "nodes kept in float" in r.reason and r.sensitivity["conv1"] > r.sensitivity["fc"]
