"""``edgeloop optimize MODEL.onnx``: a user's FP32 ONNX model -> gated FP16 / INT8 variants in a signed bundle.

What ``edgeloop export`` does for the models edgeloop trains, for a model the user brings:

1. the model is planned exactly as ``bundle create`` plans it (``export.byom``: the same
   flags, the same reading of the file) and ``--calib`` / ``--eval`` are prepared through
   the bundle's own task, as the agent will prepare its inputs (``export.optimize_data``);
2. the metric follows the task: top-1 on the class sub-folders of ``--eval``, mAP@0.5 on
   a COCO annotation file, or -- without labels -- agreement with the FP32 model's own
   answers (top-1 / mAP against its detections / mean cosine of a tensor model's outputs);
3. static INT8 is chosen by the INT8 speed plan (``export.speed.plan_int8``: the fastest
   candidate the accuracy gate accepts, timed interleaved with FP32; a detector whose head
   joins its outputs in a Concat also gets ``qdq-float-head``); when no plan is within
   budget, the export's static gate (``export.gate.gate_static_int8``: recipes, then the
   head in float, then the shortest float prefix, then per-layer float fallback) takes
   over.  Dynamic INT8 (MatMul/Gemm) and FP16 are converted and gated (``export.quantize``);
4. every variant that passes goes into the bundle with its drop, latency (all variants
   timed interleaved in one run) and size; the others are reported and left out.  The
   FP32 model itself is always in, byte for byte.

Dynamic height / width are fixed to the preprocessing size in a working copy (the
quantizer and the timing need shapes; batch stays dynamic), whose opset is raised to 13
when older (per-channel INT8 weights need it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.cliutil import emit
from core.errors import ConfigError, EdgeloopError, ExportError, QuantizationError
from core.manifest import Lineage, Manifest, Variant
from core.progress import in_progress
from core.progress import progress as progress_bar

from .byom import (
    build_manifest_parts,
    detect_precision,
    drift_baseline,
    health_reference,
    open_or_fail,
    plan_model,
    synthetic_inputs,
)
from .byom_inspect import inspect_model
from .calibration import CalibrationConfig
from .gate import AccuracyGateResult, check_scored, gate_static_int8, head_nodes
from .optimize_data import (
    ArrayCalibration,
    EvalSet,
    agreement_eval,
    check_eval_kind,
    classification_eval,
    detection_eval,
    input_files,
    prepare_files,
)
from .optimize_report import OptimizeReport
from .pack import default_version, load_signing_key, pack_bundle, utc_now
from .quantize import (
    QUANTIZABLE_OPS,
    convert_fp16,
    count_ops,
    preprocess_for_quantization,
    quantize_dynamic_int8,
)
from .report import VariantReport
from .speed import Int8Plan, apply_plan, candidate_plans, interleaved_latency_ms, plan_int8

__all__ = ["optimize_model", "PRECISIONS", "fix_input_dims", "int8_layers"]

log = logging.getLogger(__name__)

PRECISIONS = ("int8-static", "int8-dynamic", "fp16")
MIN_OPSET = 13
Progress = Callable[[str], None]


def _fail(model: str, reason: str, fix: str) -> ExportError:
    return ExportError(f"edgeloop optimize {model}: {reason}", hint=fix)


def fix_input_dims(src: Path, dst: Path, dims: tuple[int, ...], *, min_opset: int = MIN_OPSET) -> Path:
    """The working copy of ``src``: its first input's non-batch axes set to ``dims`` (0 keeps one as it
    is) and the default opset raised to ``min_opset`` (per-channel INT8 needs DequantizeLinear's axis, opset 13)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    shape = model.graph.input[0].type.tensor_type.shape
    for d, want in zip(list(shape.dim)[1:], dims, strict=False):
        if want > 0 and not (d.HasField("dim_value") and d.dim_value > 0):
            d.Clear()
            d.dim_value = int(want)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), min_opset)
    if opset < min_opset:
        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise QuantizationError(f"cannot convert opset {opset} to {min_opset}: {exc}",
                                    hint="re-export the model with opset >= 13") from exc
    onnx.save(model, str(dst))
    return dst


def _model_dims(plan: Any) -> tuple[int, ...]:
    pre = plan.pre
    if pre is None:
        return ()
    h, w = pre.size
    return {"NCHW": (pre.channels, h, w), "NHWC": (h, w, pre.channels), "NHW": (h, w)}[pre.layout]


def _report(gate: AccuracyGateResult, precision: str, seconds: float, options: dict[str, Any]) -> VariantReport:
    return VariantReport(id=gate.variant_id, format="onnx", precision=precision, kept=gate.passed, reason=gate.reason,
                         accuracy=gate.accuracy, drop_pp=gate.drop_pp, float_nodes=gate.float_nodes,
                         options={**options, **gate.options}, seconds=round(seconds, 3),
                         attempts=tuple(dataclasses.asdict(a) for a in gate.attempts), file=gate.path)


def _failed(vid: str, precision: str, exc: EdgeloopError, seconds: float) -> VariantReport:
    log.warning("variant %s failed: %s", vid, exc)
    first = str(exc).splitlines()[0][:300]
    return VariantReport(id=vid, format="onnx", precision=precision, kept=False, reason=f"conversion failed: {first}",
                         seconds=round(seconds, 3))


def _static_int8(pre: Path, work: Path, calib: ArrayCalibration, ev: EvalSet, reference: float, max_drop: float,
                 calibration: CalibrationConfig, say: Progress) -> VariantReport:
    """The INT8 speed plan among the plans the gate accepts; else the gate's recipes and float fallback."""
    vid, t0 = "onnx-int8-static", time.perf_counter()

    scores: dict[str, float | None] = {}

    def accept(path: Path) -> bool:
        if not int8_layers(path):  # as the gate: never an "INT8" variant with every layer in float
            scores[path.stem] = None
            attempts.advance(status=f"{path.stem}: no layer left in INT8")
            return False
        gate = check_scored(vid, path, ev, reference, max_drop=max_drop)
        scores[path.stem] = gate.drop_pp
        drop = "not scored" if gate.drop_pp is None else f"drop {gate.drop_pp:.2f} pp"
        attempts.advance(status=f"{path.stem}: {drop}, {'accepted' if gate.passed else 'rejected'}")
        return gate.passed

    say("INT8 static: speed plan (every candidate gated, the accepted ones timed against FP32)")
    try:
        candidates = _candidates(pre)
        with progress_bar("INT8 gate attempts", total=len(candidates), every_s=0.0, enabled=in_progress()) as attempts:
            plan = plan_int8(pre, calib.reader, candidates=candidates, accept=accept, workdir=work, progress=say)
        out = apply_plan(plan, pre, work / f"{vid}.onnx", calib.reader())
        gate = check_scored(vid, out, ev, reference, max_drop=max_drop)
        if gate.passed:
            options = {"plan": plan.name, "quant_format": plan.quant_format, "per_channel": plan.per_channel,
                       "reduce_range": plan.reduce_range, "op_types": list(plan.op_types),
                       "plan_ratio": plan.ratio, "plan_candidates": [list(c) for c in plan.candidates],
                       "plan_drops_pp": dict(scores),
                       "calibration": calibration.method, "calibration_samples": len(calib)}
            gate = dataclasses.replace(gate, reason=f"{gate.reason}; speed plan {plan.name}",
                                       float_nodes=plan.nodes_to_exclude)
            return _report(gate, "int8-static", time.perf_counter() - t0, options)
    except QuantizationError as exc:
        say(f"INT8 static: no speed plan within budget ({exc}); the gate's recipes and per-layer float fallback")
    log.info("INT8 speed plans, drop pp (None: no layer left in INT8): %s", scores)
    gate = gate_static_int8(pre, work / "int8-static", calib, ev, reference, max_drop=max_drop,  # type: ignore[arg-type]
                            calibration=calibration, head=float_head(pre), float_prefix=True)
    if gate.passed and gate.path is not None:
        final = work / f"{vid}.onnx"
        shutil.copyfile(gate.path, final)
        gate = dataclasses.replace(gate, path=final)
    return _report(gate, "int8-static", time.perf_counter() - t0, {"plan": "gate-fallback", "plan_drops_pp": scores})


def _candidates(pre: Path) -> list[Int8Plan]:
    """The speed plan's candidates, plus ``qdq-float-head`` when the model's head joins several layers'
    outputs in a Concat (a raw detector head: box regressions and scores in one tensor, which one INT8
    scale would flatten): quantize all but that head (:func:`float_head`)."""
    plans = candidate_plans(pre)
    head = float_head(pre)
    if head:
        plans.append(dataclasses.replace(plans[0], name="qdq-float-head", nodes_to_exclude=head))
    return plans


def float_head(pre: Path) -> tuple[str, ...]:
    """The model's head (``export.gate.head_nodes``) when it joins outputs in a Concat, else ()."""
    import onnx

    head = head_nodes(pre)
    ops = {n.name: n.op_type for n in onnx.load(str(pre), load_external_data=False).graph.node}
    return head if any(ops.get(n) == "Concat" for n in head) else ()


def int8_layers(path: Path) -> int:
    """How many Conv / Gemm / MatMul layers of a quantized model run in INT8 (QDQ weights or QOperator ops)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    qdq = sum(1 for n in graph.node if n.op_type in QUANTIZABLE_OPS and len(n.input) > 1 and n.input[1] in dq)
    return qdq + sum(1 for n in graph.node if n.op_type in ("QLinearConv", "QLinearMatMul", "MatMulInteger",
                                                            "ConvInteger", "QGemm"))


def _simple(precision: str, src: Path, work: Path, ev: EvalSet, reference: float, max_drop: float,
            say: Progress) -> VariantReport:
    vid, t0 = f"onnx-{precision}", time.perf_counter()
    if precision == "int8-dynamic" and not set(count_ops(src)) & {"MatMul", "Gemm"}:
        return VariantReport(id=vid, format="onnx", precision=precision, kept=False,
                             reason="no MatMul/Gemm: dynamic INT8 would leave the model as it is")
    say(f"{precision}: convert, gate")
    convert, options = ((quantize_dynamic_int8, {"ops": ["MatMul", "Gemm"], "weight_type": "int8"})
                        if precision == "int8-dynamic" else (convert_fp16, {"io": "float32"}))
    out = convert(src, work / f"{vid}.onnx")
    return _report(check_scored(vid, out, ev, reference, max_drop=max_drop, options=options), precision,
                   time.perf_counter() - t0, {})


def _eval_set(args: argparse.Namespace, task: Any, manifest: Manifest, model: Path,
              calib_items: list[Any]) -> EvalSet:
    kind = manifest.task.kind
    check_eval_kind(kind, args)
    if kind == "classification" and args.eval is not None:
        return classification_eval(task, manifest, args.eval)
    if kind == "detection" and args.eval_annotations is not None:
        if args.eval is None:
            raise ConfigError("--eval-annotations needs --eval DIR (the annotated images)", hint="give --eval DIR")
        return detection_eval(task, manifest, args.eval, args.eval_annotations)
    if args.eval is not None:
        items = prepare_files(task, input_files(args.eval, "inputs", "--eval"))
        return agreement_eval(manifest, model, items, str(args.eval))
    return agreement_eval(manifest, model, calib_items, "the calibration inputs: give --eval for an independent set")


def optimize_model(args: argparse.Namespace, progress: Progress | None = None) -> OptimizeReport:
    """Plan, convert, gate, time and pack; returns the report (also written next to the bundle)."""
    say = progress or (lambda msg: log.info("%s", msg))
    model_path: Path = args.model
    name = model_path.name
    t_start = time.perf_counter()
    if not 0.0 <= args.max_drop <= 100.0:
        raise ConfigError(f"--max-drop must be in [0, 100] percentage points, got {args.max_drop}", key="max_drop")
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"unknown precision(s) {bad}", hint=f"--precisions takes {', '.join(PRECISIONS)}")
    fmt, backend = open_or_fail(model_path)
    try:
        if fmt != "onnx":
            raise _fail(name, f"optimize converts ONNX models; this is a {fmt} file",
                        "bundle a TFLite model as it is with `edgeloop bundle create`")
        precision = detect_precision(model_path, fmt)
        if precision != "fp32" or backend.inputs[0].dtype != "float32":
            raise _fail(name, f"the model is {precision} with a {backend.inputs[0].dtype} input; optimize needs an "
                              "FP32 model with a float32 input", "give the FP32 export of the model")
        facts = inspect_model(model_path, fmt, backend)
        try:
            plan = plan_model(args, backend, facts, name)
        except ConfigError:
            raise
        except EdgeloopError as exc:
            raise _fail(name, str(exc.args[0] if exc.args else exc), exc.hint or "check the flags") from exc
        version = args.version or default_version()
        model_name = args.name or model_path.stem
        fp32 = Variant(id="onnx-fp32", format="onnx", precision="fp32", file="models/onnx-fp32.onnx",
                       options={"source": name})
        manifest = Manifest(name=model_name, version=version, created=utc_now(), variants=(fp32,), baseline=None,
                            health="reference.npz", lineage=Lineage(dataset=str(args.calib)),
                            **build_manifest_parts(plan))
        from core.tasks import build_task

        task = build_task(manifest, backend)
        key = load_signing_key(args.sign)
        with tempfile.TemporaryDirectory(prefix="edgeloop-optimize-", dir=args.workdir) as tmp:
            work = Path(tmp)
            return _optimize(args, task, manifest, plan, work, precisions, key, say, t_start)
    finally:
        backend.close()


def _calibration(args: argparse.Namespace, task: Any) -> tuple[ArrayCalibration, list[Any]]:
    files = input_files(args.calib, "representative inputs", "--calib")
    if len(files) > args.calib_samples:
        pick = np.sort(np.random.default_rng(0).choice(len(files), args.calib_samples, replace=False))
        files = [files[i] for i in pick]
    items = prepare_files(task, files)
    name = task.input.name
    return ArrayCalibration(np.concatenate([p.feeds[name] for p in items]).astype(np.float32), name), items


def _optimize(args: argparse.Namespace, task: Any, manifest: Manifest, plan: Any, work: Path,
              precisions: tuple[str, ...], key: Any, say: Progress, t_start: float) -> OptimizeReport:
    model_path: Path = args.model
    name = model_path.name
    say(f"preparing --calib {args.calib} through the bundle's preprocessing")
    calib, calib_items = _calibration(args, task)
    ev = _eval_set(args, task, manifest, model_path, calib_items)
    say(f"metric: {ev.description}")
    try:
        fixed = fix_input_dims(model_path, work / "onnx-fp32.onnx", _model_dims(plan))
    except QuantizationError as exc:
        raise _fail(name, str(exc), exc.hint or "re-export the model with opset >= 13") from exc
    reference = ev.score(fixed)
    if reference <= 0.0:
        raise _fail(name, f"the FP32 model scores 0 on {ev.description}",
                    "check the preprocessing flags and the --eval labels (sub-folder names / annotation categories)")
    reports = [VariantReport(id="onnx-fp32", format="onnx", precision="fp32", kept=True, reason="FP32 reference",
                             accuracy=reference, drop_pp=0.0, options={"source": name}, file=fixed)]
    calibration = CalibrationConfig(method=args.calibration, samples=len(calib))
    pre = preprocess_for_quantization(fixed, work / "onnx-pre.onnx") if any(
        p.startswith("int8") for p in precisions) else fixed
    for precision in precisions:
        t0 = time.perf_counter()
        try:
            if precision == "int8-static":
                reports.append(_static_int8(pre, work, calib, ev, reference, args.max_drop, calibration, say))
            else:
                reports.append(_simple(precision, pre if precision.startswith("int8") else fixed, work, ev, reference,
                                       args.max_drop, say))
        except EdgeloopError as exc:
            reports.append(_failed(f"onnx-{precision}", precision, exc, time.perf_counter() - t0))
    kept = [r for r in reports if r.kept and r.file is not None]
    say(f"timing FP32 and {len(kept) - 1} variant(s) interleaved, batch 1, one thread")
    ms = interleaved_latency_ms([r.file for r in kept], threads=1, rounds=args.rounds, runs_per_round=10)  # type: ignore[misc]
    timed = {r.id: t for r, t in zip(kept, ms, strict=True)}
    final = []
    for r in reports:
        if r.id == "onnx-fp32":
            r = dataclasses.replace(r, size_bytes=model_path.stat().st_size, latency_ms=round(timed[r.id], 4))
        elif r.kept and r.file is not None:
            r = dataclasses.replace(r, size_bytes=r.file.stat().st_size, latency_ms=round(timed[r.id], 4))
        final.append(r)
    return _pack(args, task, manifest, plan, ev, reference, final, calibration, key, t_start)


def _pack(args: argparse.Namespace, task: Any, manifest: Manifest, plan: Any, ev: EvalSet, reference: float,
          final: list[VariantReport], calibration: CalibrationConfig, key: Any, t_start: float) -> OptimizeReport:
    from core.runtime import open_model

    model_path: Path = args.model
    notes = list(plan.notes)
    shipped = [r for r in final if r.kept]
    variants = tuple(Variant(id=r.id, format="onnx", precision=r.precision, file=f"models/{r.id}.onnx",
                             test_accuracy=r.accuracy, accuracy_drop=r.drop_pp, latency_ms=r.latency_ms,
                             float_nodes=r.float_nodes, options=r.options) for r in shipped)
    files: dict[str, Any] = {f"models/{r.id}.onnx": (model_path if r.id == "onnx-fp32" else r.file) for r in shipped}
    backends = [(r.id, open_model(files[f"models/{r.id}.onnx"]), r.precision.startswith("int8")) for r in shipped]
    try:
        reference_bytes = health_reference(task, synthetic_inputs(plan, task.backend), backends)
    finally:
        for _, b, _ in backends:
            b.close()
    baseline, drift_note = None, "no drift baseline (give --baseline-dir)"
    if args.baseline_dir is not None:
        baseline, drift_note = drift_baseline(task, input_files(args.baseline_dir, "samples", "--baseline-dir"))
    notes.append(drift_note)
    if not plan.labels:
        files["labels.txt"] = b""
    out = args.out or Path(f"{manifest.name}-{manifest.version}.elb")
    manifest = dataclasses.replace(manifest, variants=variants, reference_accuracy=reference,
                                   accuracy_budget=args.max_drop, baseline="baseline.npz" if baseline else None)
    report = OptimizeReport(
        bundle=Path(out), model=model_path.name, name=manifest.name, version=manifest.version, task=manifest.task.kind,
        metric=ev.description, reference=reference, max_drop=args.max_drop, variants=tuple(final),
        signed_by=None if key is None else key.key_id, seconds=0.0,
        calibration={**dataclasses.asdict(calibration), "source": str(args.calib)},
        latency={"method": f"median batch-1 ms, one thread, all variants interleaved in one process "
                           f"({args.rounds} rounds x 10 runs, export.speed.interleaved_latency_ms)"},
        notes=tuple(notes + [f"{d}: {v}" for d, v in _details(ev, final).items()]))
    report = dataclasses.replace(report, seconds=round(time.perf_counter() - t_start, 2))
    metrics = {"byom": True, "model": model_path.name, "task": manifest.task.kind, "optimize": report.to_dict(),
               "notes": list(report.notes)}
    pack_bundle(Path(out), manifest, files, reference=reference_bytes, baseline=baseline, metrics=metrics,
                signing_key=key)
    write_report(report)
    return report


def _details(ev: EvalSet, final: list[VariantReport]) -> dict[str, str]:
    """Tensor models: min cosine and max |delta| per variant (the gate uses the mean cosine)."""
    out = {}
    for r in final:
        d = ev.details.get(str(r.file)) if r.file is not None else None
        if d:
            out[r.id] = f"mean cosine {d['mean_cosine']:.6f}, min cosine {d['min_cosine']:.6f}, " \
                        f"max |delta| {d['max_abs_delta']:.4g}"
    return out


def report_paths(bundle: Path) -> tuple[Path, Path]:
    """``<bundle>.report.json`` and ``<bundle>.report.md``."""
    return bundle.with_name(bundle.name + ".report.json"), bundle.with_name(bundle.name + ".report.md")


def write_report(report: OptimizeReport) -> None:
    import json

    js, md = report_paths(report.bundle)
    js.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    md.write_text(report.markdown())


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``edgeloop optimize``."""
    with progress_bar("optimize") as bar:  # stderr, also with --json; -q silences it
        report = optimize_model(args, bar.step)
    js, md = report_paths(report.bundle)
    emit(args, report.to_dict(), report.table() + f"\nreport: {js}, {md}")
    return 0
