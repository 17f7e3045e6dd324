"""The export's accuracy gate: no variant ships that loses more than ``max_drop`` points.

``max_drop`` is in percentage points of test accuracy against FP32 ONNX;
:data:`DEFAULT_MAX_DROP_PP` is its one default (``edgeloop export --max-drop``, the
pipeline and this module).  Not to be confused with the fleet's *candidate* gate
(``[acceptance]`` in fleet.toml, :class:`fleet.policy.CandidateGate`), which decides
whether a retrained model may replace the one in service.

Every variant is evaluated in the runtime the device uses, on the test split, against
the FP32 ONNX accuracy.  Static INT8 gets repaired rather than rejected outright:

1. try each recipe of :data:`export.quantize.STATIC_ATTEMPTS` in turn (ORT's default
   first; it collapses on AVX2 CPUs without VNNI);
2. when none is within budget and the caller names a ``head`` (``edgeloop optimize``, for a
   detector: :func:`head_nodes`, the Concat / Reshape / Transpose / Sigmoid after the last
   Conv/Gemm/MatMul, where box regressions and scores are joined in one tensor that one
   INT8 scale would flatten), try it in float; it stays float in later attempts when that helped;
3. when asked (``float_prefix``: ``edgeloop optimize``), the shortest run of layers from the
   input kept in float that passes (binary search; noise that builds up through a deep
   backbone is nobody's single layer);
4. when still not within budget, measure per-layer sensitivity on the validation split:
   for each Conv/Gemm/MatMul, re-quantize with that layer *and the activation it
   produces* kept in float (excluding the layer alone would leave its output tensor
   quantized by its consumers) and see how much accuracy comes back;
5. keep the most sensitive layers in float, one more at a time, until the variant is
   within budget, or give up after ``max_float_layers`` and leave it out of the bundle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import DEFAULT_MAX_DROP_PP
from .calibration import DEFAULT_CALIBRATION, CalibrationConfig
from .measure import accuracy, percentage_points
from .quantize import QUANTIZABLE_OPS, STATIC_ATTEMPTS, StaticSettings, quantize_static_int8

__all__ = ["DEFAULT_MAX_DROP_PP", "Attempt", "AccuracyGateResult", "check_variant", "check_scored", "exclusion_units",
           "head_nodes", "gate_static_int8"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One quantization attempt and what the accuracy gate measured."""

    settings: str
    float_nodes: tuple[str, ...]
    accuracy: float
    drop_pp: float
    passed: bool


@dataclass(frozen=True)
class AccuracyGateResult:
    """The accuracy gate's verdict on one variant; ``path`` is the file to ship (None when rejected)."""

    variant_id: str
    path: Path | None
    accuracy: float | None
    drop_pp: float | None
    passed: bool
    reason: str
    float_nodes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    attempts: tuple[Attempt, ...] = ()
    sensitivity: dict[str, float] = field(default_factory=dict)  # layer -> val accuracy recovered (pp)


def check_variant(variant_id: str, path: Path, x: np.ndarray, y: np.ndarray, reference: float, *,
                  max_drop: float, options: dict[str, Any] | None = None) -> AccuracyGateResult:
    """Evaluate one finished variant file and accept or reject it."""
    return check_scored(variant_id, path, (x, y), reference, max_drop=max_drop, options=options)


def _score(path: Path, data: Any) -> float:
    """Top-1 accuracy on ``data = (x, y)``, or ``data.score(path)`` for an evaluation set that scores a
    model file itself (``export.optimize_data.EvalSet``: mAP@0.5, agreement with FP32), as a fraction."""
    score = getattr(data, "score", None)
    return float(score(path)) if callable(score) else accuracy(path, *data)


def check_scored(variant_id: str, path: Path, data: Any, reference: float, *, max_drop: float,
                 options: dict[str, Any] | None = None) -> AccuracyGateResult:
    """:func:`check_variant` on ``data``: ``(x, y)`` or an evaluation set with ``score(path)``."""
    acc = _score(path, data)
    drop = percentage_points(reference, acc)
    ok = drop <= max_drop
    reason = (f"within budget ({drop:.2f} <= {max_drop} pp)" if ok
              else f"accuracy drop {drop:.2f} pp exceeds the {max_drop} pp budget")
    return AccuracyGateResult(variant_id, path if ok else None, acc, drop, ok, reason, options=dict(options or {}),
                      attempts=(Attempt(variant_id, (), acc, drop, ok),))


def exclusion_units(model_path: Path) -> dict[str, tuple[str, ...]]:
    """For each quantizable layer: the nodes to keep in float so its output activation stays float.

    That is the layer itself plus every node reached from its outputs through
    non-quantizable ops (Relu, pooling, reshapes...) up to and including the next
    quantizable layers: ORT quantizes a tensor whenever any node touching it is quantized.
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    units: dict[str, tuple[str, ...]] = {}
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        unit, frontier, seen = [node.name], list(node.output), set()
        while frontier:
            tensor = frontier.pop()
            for nxt in consumers.get(tensor, []):
                if nxt.name in seen:
                    continue
                seen.add(nxt.name)
                unit.append(nxt.name)
                if nxt.op_type not in QUANTIZABLE_OPS:
                    frontier.extend(nxt.output)
        units[node.name] = tuple(dict.fromkeys(unit))
    return units


def head_nodes(model_path: Path) -> tuple[str, ...]:
    """The nodes after the last quantizable layers: every node from which no Conv/Gemm/MatMul is reachable.

    For a raw-head detector (YOLOX, YOLOv5/8) that is the Sigmoid of the scores and the
    Concat / Reshape / Transpose that join box regressions and scores into the output
    tensor; for a classifier, its Softmax / Flatten.  Graph order (topological in ONNX).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_layer: dict[str, bool] = {}  # node name -> a quantizable layer is downstream
    for node in reversed(graph.node):
        feeds_layer[node.name] = any(c.op_type in QUANTIZABLE_OPS or feeds_layer.get(c.name, False)
                                     for o in node.output for c in consumers.get(o, []))
    return tuple(n.name for n in graph.node if n.op_type not in QUANTIZABLE_OPS and not feeds_layer[n.name])


def _try(pre_path: Path, out: Path, calib: np.ndarray, settings: StaticSettings, exclude: tuple[str, ...],
         calibration: CalibrationConfig, cache: Path, data: tuple[np.ndarray, np.ndarray],
         reference: float, max_drop: float) -> Attempt:
    quantize_static_int8(pre_path, out, calib, settings, calibration=calibration, nodes_to_exclude=exclude,
                         cache_path=cache)
    acc = _score(out, data)
    drop = percentage_points(reference, acc)
    return Attempt(settings.name, exclude, acc, drop, drop <= max_drop)


def gate_static_int8(pre_path: Path, workdir: Path, calib: np.ndarray, test: tuple[np.ndarray, np.ndarray],
                     reference: float, *, max_drop: float = DEFAULT_MAX_DROP_PP, calibration: CalibrationConfig = DEFAULT_CALIBRATION,
                     select: tuple[np.ndarray, np.ndarray] | None = None,
                     attempts: tuple[StaticSettings, ...] = STATIC_ATTEMPTS, max_float_layers: int = 8,
                     variant_id: str = "onnx-int8-static", head: tuple[str, ...] = (),
                     float_prefix: bool = False) -> AccuracyGateResult:
    """Quantize ``pre_path`` statically until the test accuracy is within ``max_drop`` points.

    ``select`` (the validation split) ranks layer sensitivity, so the test split only judges.  ``head``
    (e.g. :func:`head_nodes`) is tried in float before the per-layer search, and kept in float during it
    when that helped.  ``float_prefix``: before the per-layer search, look for the shortest run of layers
    from the input kept in float (:func:`_float_prefix`).  Returns the passing file or a rejected
    :class:`AccuracyGateResult` whose ``reason`` says what was tried.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"calibration-{calibration.method}.json"
    cache.unlink(missing_ok=True)  # ranges belong to this model only
    tried: list[Attempt] = []
    for i, settings in enumerate(attempts):
        out = workdir / f"int8-{i}-{settings.name}.onnx"
        att = _try(pre_path, out, calib, settings, (), calibration, cache, test, reference, max_drop)
        tried.append(att)
        log.info("static INT8 %s: accuracy %.4f, drop %.2f pp", settings.name, att.accuracy, att.drop_pp)
        if att.passed:
            return _accepted(variant_id, out, att, settings, calibration, tried, {})

    # No recipe is good enough: the head in float, then the most sensitive layers in float.
    best_i = int(np.argmax([a.accuracy for a in tried]))
    settings = attempts[best_i]
    best_file = workdir / f"int8-{best_i}-{settings.name}.onnx"
    base: tuple[str, ...] = ()
    if head:
        out = workdir / "int8-float-head.onnx"
        att = _try(pre_path, out, calib, settings, head, calibration, cache, test, reference, max_drop)
        tried.append(att)
        log.info("static INT8 %s, head in float (%d nodes): accuracy %.4f, drop %.2f pp", settings.name, len(head),
                 att.accuracy, att.drop_pp)
        if att.passed:
            return _accepted(variant_id, out, att, settings, calibration, tried, {})
        if att.accuracy > tried[best_i].accuracy:
            base, best_file = head, out
    if float_prefix:
        found = _float_prefix(pre_path, workdir, calib, settings, base, calibration, cache, test, reference,
                              max_drop, tried)
        if found is not None:
            out, att, n = found
            acc = _accepted(variant_id, out, att, settings, calibration, tried, {})
            return replace(acc, reason=f"{acc.reason} (the first {n} layers)",
                           options={**acc.options, "float_prefix_layers": n})
    sel = select if select is not None else test
    base_sel = _score(best_file, sel)
    units = {layer: tuple(dict.fromkeys(base + unit)) for layer, unit in exclusion_units(pre_path).items()}
    gains: dict[str, float] = {}
    probe = workdir / "int8-probe.onnx"
    for layer, unit in units.items():
        quantize_static_int8(pre_path, probe, calib, settings, calibration=calibration, nodes_to_exclude=unit,
                             cache_path=cache)
        gains[layer] = round((_score(probe, sel) - base_sel) * 100.0, 4)
    ranked = sorted(gains, key=lambda k: -gains[k])
    log.info("layer sensitivity (pp recovered on %s): %s", "val" if select is not None else "test",
             {k: gains[k] for k in ranked[:8]})
    exclude: tuple[str, ...] = base
    for k, layer in enumerate(ranked[:max_float_layers], start=1):
        exclude = tuple(dict.fromkeys(exclude + units[layer]))
        if set(units) <= set(exclude):  # nothing left in INT8: that is the FP32 model, not a variant
            break
        out = workdir / f"int8-float{k}.onnx"
        att = _try(pre_path, out, calib, settings, exclude, calibration, cache, test, reference, max_drop)
        tried.append(att)
        if att.passed:
            return _accepted(variant_id, out, att, settings, calibration, tried, gains)
    best = max(tried, key=lambda a: a.accuracy)
    return AccuracyGateResult(variant_id, None, best.accuracy, best.drop_pp, False,
                      f"no static INT8 recipe within {max_drop} pp: tried {', '.join(s.name for s in attempts)}"
                      f"{', the head in float' if head else ''}{', float prefixes' if float_prefix else ''} and up to {min(max_float_layers, len(ranked))} float layers; best drop {best.drop_pp:.2f} pp",
                      attempts=tuple(tried), sensitivity=gains)


def _float_prefix(pre_path: Path, workdir: Path, calib: Any, settings: StaticSettings, base: tuple[str, ...],
                  calibration: CalibrationConfig, cache: Path, test: Any, reference: float, max_drop: float,
                  tried: list[Attempt]) -> tuple[Path, Attempt, int] | None:
    """The shortest prefix of layers (graph order, each with its exclusion unit) kept in float that passes.

    Quantization noise builds up from the input through a deep backbone: in YOLOX-Nano the
    activations are at 24 dB SQNR after the stem and 7 dB after the third convolution, and no
    single layer is to blame.  Binary search on the prefix length (a longer float prefix is
    assumed never worse): about log2(layers) attempts, where the per-layer search needs one
    per layer.  None when even the longest prefix that leaves a layer in INT8 fails.
    """
    units = exclusion_units(pre_path)
    layers = list(units.values())

    def exclude(n: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(base + tuple(x for unit in layers[:n] for x in unit)))

    def attempt(n: int) -> tuple[Path, Attempt, int]:
        out = workdir / f"int8-prefix{n}.onnx"
        att = _try(pre_path, out, calib, settings, exclude(n), calibration, cache, test, reference, max_drop)
        tried.append(att)
        log.info("static INT8 %s, first %d of %d layers in float: accuracy %.4f, drop %.2f pp", settings.name, n,
                 len(layers), att.accuracy, att.drop_pp)
        return out, att, n

    top = len(layers) - 1
    while top >= 1 and set(units) <= set(exclude(top)):  # every layer float: the FP32 model, not a variant
        top -= 1
    if top < 1:
        return None
    found = attempt(top)
    if not found[1].passed:
        return None
    lo, hi = 1, top - 1
    while lo <= hi:
        got = attempt((lo + hi) // 2)
        if got[1].passed:
            found, hi = got, got[2] - 1
        else:
            lo = got[2] + 1
    return found


def _accepted(variant_id: str, path: Path, att: Attempt, settings: StaticSettings, calibration: CalibrationConfig,
              tried: list[Attempt], gains: dict[str, float]) -> AccuracyGateResult:
    options = {**settings.to_dict(), "calibration": calibration.method, "calibration_samples": calibration.samples,
               "format": "QDQ"}
    reason = f"within budget with {settings.name}"
    if att.float_nodes:
        reason += f", {len(att.float_nodes)} nodes kept in float"
    if len(tried) > 1:
        reason += f" after {len(tried) - 1} rejected attempt(s)"
    return replace(AccuracyGateResult(variant_id, path, att.accuracy, att.drop_pp, True, reason),
                   float_nodes=att.float_nodes, options=options, attempts=tuple(tried), sensitivity=gains)
