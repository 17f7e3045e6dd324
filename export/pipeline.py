"""``export_run``: a training run in, a signed bundle and an export report out.

Every candidate variant is converted, evaluated in the device runtime on the test
split and gated against the FP32 ONNX accuracy; only variants within the budget go
into the bundle, and the report says why each of the others was left out.  The fleet
manager calls this for retraining, so it is a plain Python API; ``edgeloop export`` is
a thin wrapper.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.drift_domains import DEFAULT_DOMAIN
from core.errors import ConfigError, EdgeloopError, ExportError
from core.manifest import InputSpec, Lineage, Manifest, OutputSpec, Variant
from core.preprocess import preprocess
from core.signing import PrivateKey

from . import DEFAULT_MAX_DROP_PP
from .calibration import DEFAULT_CALIBRATION, CalibrationConfig, select_samples
from .gate import AccuracyGateResult, check_variant, gate_static_int8
from .measure import latency_ms, run_model
from .onnx_export import INPUT_NAME, export_onnx, torch_outputs
from .pack import default_version, load_signing_key, pack_bundle, reference_npz, utc_now
from .quantize import convert_fp16, preprocess_for_quantization, quantize_dynamic_int8
from .report import ExportReport, VariantReport

__all__ = ["export_run", "FORMATS", "ONNX_PRECISIONS", "DEFAULT_ONNX_PRECISIONS", "REFERENCE_INPUTS"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
ONNX_PRECISIONS = ("fp32", "int8-static", "int8-dynamic", "fp16")
DEFAULT_ONNX_PRECISIONS = ("fp32", "int8-static")
REFERENCE_INPUTS = 8
Progress = Callable[[str], None]
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_MIN_WINDOW = 2  # the smallest window a baseline can have (calibrate_heldout: W reference + 2 W calibration)


def _bundle_path(out: str | os.PathLike[str] | None, run_dir: Path, name: str, version: str) -> Path:
    filename = f"{name}-{version}.elb"
    if out is None:
        return run_dir / filename
    p = Path(out)
    return p / filename if p.is_dir() or str(out).endswith(os.sep) else p


def _default_name(params: dict[str, Any]) -> str:
    """``<dataset>-<model>``, e.g. ``digits-tiny-cnn``."""
    model = params.get("model", "model")
    model = model.get("name", "model") if isinstance(model, dict) else model
    return f"{Path(str(params.get('dataset', 'data'))).name}-{model}"


def _variant_report(gate: AccuracyGateResult, fmt: str, precision: str, seconds: float, *, diff: float | None = None,
                    options: dict[str, Any] | None = None) -> VariantReport:
    return VariantReport(id=gate.variant_id, format=fmt, precision=precision, kept=gate.passed, reason=gate.reason,
                         accuracy=gate.accuracy, drop_pp=gate.drop_pp, float_nodes=gate.float_nodes,
                         options={**(options or {}), **gate.options}, max_abs_diff=diff, seconds=round(seconds, 3),
                         attempts=tuple(dataclasses.asdict(a) for a in gate.attempts), file=gate.path)


def _failed(vid: str, fmt: str, precision: str, exc: EdgeloopError, seconds: float) -> VariantReport:
    log.warning("variant %s failed: %s", vid, exc)
    return VariantReport(id=vid, format=fmt, precision=precision, kept=False, reason=f"conversion failed: {exc}",
                         seconds=round(seconds, 3))


def export_run(run_dir: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
               max_drop: float = DEFAULT_MAX_DROP_PP, formats: Sequence[str] = FORMATS,
               onnx_precisions: Sequence[str] = DEFAULT_ONNX_PRECISIONS,
               calibration: CalibrationConfig = DEFAULT_CALIBRATION,
               sign_key: str | os.PathLike[str] | PrivateKey | None = None, version: str | None = None,
               parent_version: str | None = None, name: str | None = None,
               workdir: str | os.PathLike[str] | None = None, progress: Progress | None = None,
               drift_windows: Sequence[int] | None = None, drift_images: np.ndarray | None = None,
               drift_domains: Mapping[str, np.ndarray] | None = None,
               clean_images: np.ndarray | None = None) -> ExportReport:
    """Export a training run to a bundle of gated variants and return the report.

    ``formats``: ``onnx`` and/or ``tflite`` (TFLite needs ``edgeloop[tflite-export]``).
    ``onnx_precisions``: any of :data:`ONNX_PRECISIONS` (FP32 is always built: it is the
    reference).  ``max_drop``: largest accuracy drop, percentage points, a variant may
    have.  ``workdir``: keep intermediate files there (default: a temporary directory).
    ``drift_windows``: window sizes the drift baseline is calibrated for (default 25, 50,
    100; sizes the held-out data is too small for are skipped and reported).
    ``clean_images``: the raw held-out images ``baseline.npz`` (the default drift domain)
    is calibrated on (default: the run's validation + test splits).
    ``drift_domains``: name -> raw held-out images (never trained on) of a further domain
    the model must serve, e.g. a retraining's held-out drift samples: each gets its own
    baseline, ``baselines/<name>.npz``, listed in ``manifest.drift_domains``; the agent
    then alarms only on windows that match no domain (``core.drift_domains``).  A domain
    too small for any window is left out, with the reason in ``metrics.json``.
    ``drift_images`` (older callers; not with ``drift_domains``): extra images pooled into
    the one baseline -- which fits neither domain's pure windows (issue 11 §2).
    """
    from train.api import load_run
    from train.evaluate import evaluate_logits

    t_start = time.perf_counter()
    say = progress or (lambda msg: log.info("%s", msg))
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS] + [p for p in onnx_precisions if p not in ONNX_PRECISIONS]
    if bad or not formats:
        raise ConfigError(f"unknown export format/precision {bad or formats}",
                          hint=f"formats: {', '.join(FORMATS)}; ONNX precisions: {', '.join(ONNX_PRECISIONS)}")
    if not 0.0 <= max_drop <= 100.0:
        raise ConfigError(f"max_drop must be in [0, 100] percentage points, got {max_drop}", key="max_drop")
    if drift_domains and drift_images is not None:
        raise ConfigError("pass drift_domains or drift_images, not both",
                          hint="drift_domains: one baseline per domain (drift_images pools them into one)")
    bad_names = [d for d in (drift_domains or {}) if not _DOMAIN_NAME.fullmatch(d) or d == DEFAULT_DOMAIN]
    if bad_names:
        raise ConfigError(f"drift domain names {bad_names}: use letters, digits, '-', '_' (not {DEFAULT_DOMAIN!r})",
                          key="drift_domains")
    signing_key = load_signing_key(sign_key)
    if "tflite" in formats:
        from .tflite_export import require_litert_torch

        require_litert_torch()  # fail before minutes of work, naming the extra

    run = load_run(run_dir)
    x_tr, y_tr = run.arrays("train")
    x_va, y_va = run.arrays("val")
    x_te, y_te = run.arrays("test")
    name = name or _default_name(run.params)
    version = version or default_version()
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="edgeloop-export-")
    work = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        reports: list[VariantReport] = []
        x_ref = x_te[:REFERENCE_INPUTS]
        torch_ref = torch_outputs(run.model, x_ref)[0]

        say("ONNX FP32: export and compare with PyTorch")
        t0 = time.perf_counter()
        onnx32 = export_onnx(run.model, work / "onnx-fp32.onnx", x_tr[:1], check_inputs=x_te[:64])
        fp32_out = run_model(onnx32.path, x_te)
        fp32_gate = check_variant("onnx-fp32", onnx32.path, x_te, y_te,
                                  float(np.mean(np.argmax(fp32_out.logits, 1) == y_te)), max_drop=max_drop)
        reference = float(fp32_gate.accuracy or 0.0)
        torch_logits, _ = torch_outputs(run.model, x_te)
        torch_acc = float(np.mean(np.argmax(torch_logits, 1) == y_te))
        reports.append(_variant_report(fp32_gate, "onnx", "fp32", time.perf_counter() - t0, diff=onnx32.max_abs_diff,
                                       options={"opset": onnx32.opset, "nodes": onnx32.nodes_after}))
        calib = select_samples(x_tr, y_tr, calibration.samples, seed=calibration.seed)
        calibration = dataclasses.replace(calibration, samples=len(calib))

        if "onnx" in formats:
            reports += _onnx_variants(onnx32.path, work, onnx_precisions, calib, calibration, (x_va, y_va),
                                      (x_te, y_te), reference, max_drop, say)
        else:
            reports[0] = dataclasses.replace(reports[0], kept=False, reason="onnx not in formats (reference only)")
        if "tflite" in formats:
            reports += _tflite_variants(run.model, work, x_tr[:1], calib, x_ref, torch_ref,
                                        (x_te, y_te), reference, max_drop, say)

        kept = [r for r in reports if r.kept]
        if not kept:
            raise ExportError("no variant passed the accuracy gate", hint="raise --max-drop or retrain",
                              run=str(run_dir))
        say("measuring batch-1 latency and building the health-check reference")
        variant_logits: dict[str, np.ndarray] = {}
        final: list[VariantReport] = []
        for r in reports:
            if r.kept and r.file is not None:
                variant_logits[r.id] = run_model(r.file, x_ref).logits
                diff = r.max_abs_diff
                if diff is None:  # quantized variants: how far they move from PyTorch's logits
                    diff = float(np.max(np.abs(variant_logits[r.id] - torch_ref)))
                r = dataclasses.replace(r, size_bytes=r.file.stat().st_size, latency_ms=latency_ms(r.file, x_ref),
                                        max_abs_diff=diff)
            final.append(r)
        ref_bytes = reference_npz(x_ref, fp32_out.logits[:REFERENCE_INPUTS], variant_logits,
                                  {r.id: r.precision.startswith("int8") for r in final})
        say("drift baseline from the held-out splits (validation + test)" if clean_images is None else
            f"drift baseline from {len(clean_images)} held-out clean images"
            + (f"; one per drift domain ({', '.join(drift_domains)})" if drift_domains else ""))
        prior = np.bincount(y_tr, minlength=len(run.labels)).astype(np.float64)
        held = (x_va, x_te) if clean_images is None else (preprocess(np.asarray(clean_images), run.preprocessing),)
        base_bytes, drift_summary = _drift_baseline(onnx32.path, run, held, drift_images, drift_windows, prior)
        domain_bytes, domain_summary = _domain_baselines(onnx32.path, run, drift_domains or {}, drift_windows, prior,
                                                         drift_summary if base_bytes is not None else None)
        domain_files = {}
        for dom, data in domain_bytes.items():
            (work / "baselines").mkdir(exist_ok=True)
            domain_files[f"baselines/{dom}.npz"] = work / "baselines" / f"{dom}.npz"
            domain_files[f"baselines/{dom}.npz"].write_bytes(data)

        variants = tuple(Variant(id=r.id, format=r.format, precision=r.precision, file=f"models/{r.id}.{r.format}",
                                 test_accuracy=r.accuracy, accuracy_drop=r.drop_pp, latency_ms=r.latency_ms,
                                 float_nodes=r.float_nodes, options=r.options) for r in final if r.kept)
        pre = run.preprocessing
        manifest = Manifest(
            name=name, version=version, created=utc_now(), labels=tuple(run.labels),
            input=InputSpec(INPUT_NAME, (-1, pre.channels, *pre.size)),
            outputs=OutputSpec(embedding="embedding" if onnx32.embedding_dim else None,
                               embedding_dim=onnx32.embedding_dim),
            preprocessing=pre, variants=variants, reference_accuracy=reference, accuracy_budget=max_drop,
            baseline="baseline.npz" if base_bytes is not None else None,
            drift_domains={dom: f"baselines/{dom}.npz" for dom in domain_bytes},
            metrics={"test_accuracy": reference, "torch_test_accuracy": torch_acc, "test_samples": int(len(y_te)),
                     "onnx_max_abs_diff": onnx32.max_abs_diff},
            lineage=Lineage(run_id=run.run_id, data_hash=run.data_hash, params=dict(run.params),
                            parent_version=parent_version, dataset=str(run.params.get("dataset"))))
        report = ExportReport(bundle=_bundle_path(out, Path(run_dir), name, version), name=name, version=version,
                              run_id=run.run_id, reference_accuracy=reference, torch_accuracy=torch_acc,
                              max_drop=max_drop, variants=tuple(final),
                              signed_by=None if signing_key is None else signing_key.key_id,
                              seconds=0.0, onnx_max_abs_diff=onnx32.max_abs_diff,
                              calibration=dataclasses.asdict(calibration), test_samples=int(len(y_te)))
        metrics = {"report": report.to_dict(),
                   "evaluation": evaluate_logits(fp32_out.logits, y_te, run.labels).to_dict(),
                   "training": run.metrics, "drift_baseline": drift_summary}
        if drift_domains:
            metrics["drift_domains"] = domain_summary
        say(f"writing {report.bundle}")
        members = {f"models/{r.id}.{r.format}": r.file for r in final if r.kept and r.file} | domain_files
        pack_bundle(report.bundle, manifest, members,
                    reference=ref_bytes, baseline=base_bytes, metrics=metrics, signing_key=signing_key)
        return dataclasses.replace(report, seconds=round(time.perf_counter() - t_start, 2))
    finally:
        if tmp is not None:
            tmp.cleanup()


def _drift_features(fp32: Path, x: np.ndarray) -> Any:
    """What the device feeds the drift monitor for preprocessed inputs ``x``: the FP32 model's outputs."""
    from core.drift_features import DriftFeatures

    from .pack import softmax

    out = run_model(fp32, x)
    return DriftFeatures(inputs=x, probs=softmax(out.logits), embedding=out.embedding)


def _drift_baseline(fp32: Path, run: Any, held: Sequence[np.ndarray], extra: np.ndarray | None,
                    windows: Sequence[int] | None, class_counts: np.ndarray) -> tuple[bytes | None, dict[str, Any]]:
    """The drift baseline from held-out inputs run through the FP32 model (what the device feeds)."""
    from .calibration import drift_baseline

    parts = list(held)
    if extra is not None and len(extra):
        parts.append(preprocess(np.asarray(extra), run.preprocessing))
    x = np.concatenate([np.asarray(p, np.float32) for p in parts])
    data, summary = drift_baseline(_drift_features(fp32, x), windows=windows, class_prior=class_counts)
    summary["held_out_images"] = int(len(x))
    summary["extra_domain_images"] = int(0 if extra is None else len(extra))
    return data, summary


def _domain_baselines(fp32: Path, run: Any, domains: Mapping[str, np.ndarray], windows: Sequence[int] | None,
                      class_counts: np.ndarray, default: dict[str, Any] | None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One baseline per drift domain, each calibrated on that domain's raw held-out images alone.

    ``default``: the default baseline's summary (None without one: then no domain either,
    the agent needs the default beside them).  A domain too small for any window is left
    out, its summary says why; one without the default's window is kept, with a note (the
    agent leaves it out at that window).
    """
    from .calibration import drift_baseline

    out: dict[str, bytes] = {}
    summaries: dict[str, Any] = {}
    for name, raw in domains.items():
        n = int(len(raw))
        data: bytes | None = None
        if default is None:
            summary: dict[str, Any] = {"error": "no default drift baseline to go with it"}
        elif n < 3 * _MIN_WINDOW:
            summary = {"error": f"{n} images: too few for any drift window"}
        else:
            x = np.asarray(preprocess(np.asarray(raw), run.preprocessing), np.float32)
            data, summary = drift_baseline(_drift_features(fp32, x), windows=windows, class_prior=class_counts)
        summary = {**summary, "held_out_images": n, "member": f"baselines/{name}.npz" if data else None}
        if data is None:
            log.warning("drift domain %s left out of the bundle: %s", name, summary.get("error"))
        else:
            out[name] = data
            if default is not None and default["default_window"] not in summary["windows"]:
                summary["note"] = (f"not calibrated for the default window {default['default_window']}: "
                                   "agents at that window leave this domain out (hold out more images)")
                log.warning("drift domain %s: %s", name, summary["note"])
        summaries[name] = summary
    return out, summaries


def _onnx_variants(fp32: Path, work: Path, precisions: Sequence[str], calib: np.ndarray,
                   calibration: CalibrationConfig, val: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray], reference: float, max_drop: float,
                   say: Progress) -> list[VariantReport]:
    out: list[VariantReport] = []
    pre = fp32
    if any(p.startswith("int8") for p in precisions):
        pre = preprocess_for_quantization(fp32, work / "onnx-pre.onnx")
    if "int8-static" in precisions:
        say(f"ONNX INT8 static: calibrate on {len(calib)} training images ({calibration.method}), gate")
        t0 = time.perf_counter()
        try:
            gate = gate_static_int8(pre, work / "int8-static", calib, test, reference, max_drop=max_drop,
                                    calibration=calibration, select=val)
            if gate.passed and gate.path is not None:
                final = work / "onnx-int8-static.onnx"
                shutil.copyfile(gate.path, final)
                gate = dataclasses.replace(gate, path=final)
            out.append(_variant_report(gate, "onnx", "int8-static", time.perf_counter() - t0))
        except EdgeloopError as exc:
            out.append(_failed("onnx-int8-static", "onnx", "int8-static", exc, time.perf_counter() - t0))
    simple = {"int8-dynamic": (quantize_dynamic_int8, {"ops": ["MatMul", "Gemm"], "weight_type": "int8"}),
              "fp16": (convert_fp16, {"io": "float32"})}
    for precision, (convert, options) in simple.items():
        if precision not in precisions:
            continue
        say(f"ONNX {precision}: convert, gate")
        vid, t0 = f"onnx-{precision}", time.perf_counter()
        try:
            path = convert(pre if precision.startswith("int8") else fp32, work / f"{vid}.onnx")
            gate = check_variant(vid, path, *test, reference, max_drop=max_drop, options=options)
            out.append(_variant_report(gate, "onnx", precision, time.perf_counter() - t0))
        except EdgeloopError as exc:
            out.append(_failed(vid, "onnx", precision, exc, time.perf_counter() - t0))
    return out


def _tflite_variants(model: Any, work: Path, sample: np.ndarray, calib: np.ndarray, x_ref: np.ndarray,
                     torch_ref: np.ndarray, test: tuple[np.ndarray, np.ndarray], reference: float, max_drop: float,
                     say: Progress) -> list[VariantReport]:
    from .tflite_export import export_tflite_fp32, export_tflite_int8

    out: list[VariantReport] = []
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("fp32", lambda: export_tflite_fp32(model, work / "tflite-fp32.tflite", sample)),
        ("int8", lambda: export_tflite_int8(model, work / "tflite-int8.tflite", sample, calib)),
    ]
    for precision, job in jobs:
        vid, t0 = f"tflite-{precision}", time.perf_counter()
        say(f"TFLite {precision.upper()}: convert with litert-torch, run in LiteRT, gate")
        try:
            res = job()
            diff = float(np.max(np.abs(run_model(res.path, x_ref).logits - torch_ref)))
            gate = check_variant(vid, res.path, *test, reference, max_drop=max_drop, options=res.options)
            out.append(_variant_report(gate, "tflite", precision, time.perf_counter() - t0, diff=diff))
        except EdgeloopError as exc:
            out.append(_failed(vid, "tflite", precision, exc, time.perf_counter() - t0))
    return out
