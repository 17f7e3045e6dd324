"""``edgeloop export RUN``: a training run to a signed bundle of gated variants.

Imports nothing heavy at module level; torch, onnx and litert-torch load inside the
handler.  Also registers ``edgeloop keys`` / ``edgeloop bundle`` from
:mod:`export.cli_bundle`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.cliutil import add_json_flag, emit
from core.errors import ConfigError
from core.progress import progress

from . import DEFAULT_MAX_DROP_PP

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``export`` (and the ``keys`` / ``bundle`` groups) to the ``edgeloop`` parser."""
    p = subparsers.add_parser("export", help="export a training run to a signed bundle (ONNX, INT8, TFLite)")
    p.add_argument("run", type=Path, metavar="RUN", help="training run directory (from `edgeloop train`)")
    p.add_argument("--out", type=Path, metavar="FILE", help="bundle file or directory (default: RUN/NAME-VERSION.elb)")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP_PP, metavar="PP",
                   help="largest accuracy drop a variant may have, in percentage points (default %(default)s)")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="INT8 calibration method (default minmax)")
    p.add_argument("--calib-samples", type=int, default=200, metavar="N",
                   help="training images used to calibrate INT8 (default 200)")
    p.add_argument("--formats", default="onnx,tflite", metavar="LIST", help="comma-separated: onnx,tflite")
    p.add_argument("--no-tflite", action="store_true", help="skip TFLite (no litert-torch needed)")
    p.add_argument("--onnx-precisions", default="fp32,int8-static", metavar="LIST",
                   help="comma-separated ONNX variants: fp32,int8-static,int8-dynamic,fp16 (default fp32,int8-static)")
    p.add_argument("--sign", type=Path, metavar="KEY", help="private key to sign the bundle with (`edgeloop keys new`)")
    p.add_argument("--version", dest="bundle_version", metavar="V", help="bundle version (default: UTC timestamp)")
    p.add_argument("--parent-version", metavar="V", help="version this model was retrained from (lineage)")
    p.add_argument("--name", help="model name (default: <dataset>-<model>)")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="keep intermediate files here")
    p.add_argument("--drift-windows", default="25,50,100", metavar="LIST",
                   help="drift window sizes to calibrate the baseline for (default 25,50,100)")
    add_json_flag(p)
    p.set_defaults(func=_export)
    from . import cli_bundle

    cli_bundle.register(subparsers)


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def export_steps(formats: tuple[str, ...], onnx_precisions: tuple[str, ...]) -> int:
    """The steps ``export_run`` announces: ONNX FP32, one per further variant, then latency, drift
    baseline and the bundle (the bar's count; a step more than foreseen only extends it)."""
    variants = len([p for p in onnx_precisions if p != "fp32"]) if "onnx" in formats else 0
    return 1 + variants + (2 if "tflite" in formats else 0) + 3


def _export(args: argparse.Namespace) -> int:
    from .calibration import CalibrationConfig
    from .pipeline import export_run

    formats = tuple(f for f in _split(args.formats) if not (args.no_tflite and f == "tflite"))
    if not formats:
        raise ConfigError("no export format left", hint="use --formats onnx or drop --no-tflite")
    calibration = CalibrationConfig(method=args.calibration, samples=args.calib_samples)
    precisions = _split(args.onnx_precisions)
    with progress("export", total=export_steps(formats, precisions)) as bar:  # stderr, also with --json
        report = export_run(args.run, out=args.out, max_drop=args.max_drop, formats=formats,
                            onnx_precisions=precisions, calibration=calibration, sign_key=args.sign,
                            version=args.bundle_version, parent_version=args.parent_version, name=args.name,
                            workdir=args.workdir, progress=bar.step,
                            drift_windows=tuple(int(w) for w in _split(args.drift_windows)))
    emit(args, report.to_dict(), report.table())  # the table names the bundle written
    return 0
