"""``edgeloop keys``, ``edgeloop bundle inspect|verify|create`` and ``edgeloop optimize``.

Only ``inspect`` and ``verify`` run on a device, so this module imports nothing but
``edge_agent`` (numpy at most): no onnx, no torch.  ``bundle create`` hands over to
``export.byom`` and ``optimize`` to ``export.optimize`` lazily, inside their handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.cliutil import add_json_flag, emit
from core.errors import ConfigError, ExportError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``keys`` and ``bundle`` command groups to the ``edgeloop`` parser."""
    keys = subparsers.add_parser("keys", help="create Ed25519 signing keys for bundles")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    new = keys_sub.add_parser("new", help="create a key pair (edgeloop.key, mode 0600, and edgeloop.pub)")
    new.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="directory for the key files, created if needed (default: .)")
    new.add_argument("--name", default="edgeloop", help="file stem: NAME.key and NAME.pub (default: edgeloop)")
    new.add_argument("--force", action="store_true", help="replace existing key files")
    add_json_flag(new)
    new.set_defaults(func=_keys_new)

    bundle = subparsers.add_parser("bundle", help="inspect, verify or create signed model bundles (.elb)")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True)

    inspect = bsub.add_parser("inspect", help="show a bundle's manifest (not verified)")
    inspect.add_argument("file", type=Path, metavar="FILE")
    add_json_flag(inspect)
    inspect.set_defaults(func=_inspect)

    verify = bsub.add_parser("verify", help="verify every member's hash and the signature; exit 0 only when valid")
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--key", metavar="PUB", help="trusted public key: a .pub file or its base64 string")
    verify.add_argument("--allow-unsigned", action="store_true",
                        help="accept an unsigned bundle (integrity only; development use)")
    add_json_flag(verify)
    verify.set_defaults(func=_verify)

    create = bsub.add_parser("create", help="bundle your own .onnx / .tflite model (bring your own model)",
                             description="Bundle any ONNX / TFLite model. What the file says (input dtype, shape, "
                                         "quantization, layout, embedded labels, probability outputs, the SSD op) "
                                         "is read from it; the flags override. docs/models.md walks through a "
                                         "classifier, a detector and a tensor model.")
    create.add_argument("--model", type=Path, required=True, metavar="FILE", help="FILE.onnx or FILE.tflite")
    create.add_argument("--labels", type=Path, metavar="FILE",
                        help="class names, one per line (default: from TFLite metadata; none for tensor models)")
    create.add_argument("--name", required=True, help="model name")
    create.add_argument("--version", required=True, help="model version, e.g. 1.0.0")
    add_model_flags(create)
    create.add_argument("--baseline-dir", type=Path, metavar="DIR",
                        help="sample inputs (images or .npy, read recursively) to calibrate the drift baseline from")
    create.add_argument("--sign", type=Path, metavar="KEY", help="private key file to sign the bundle with")
    create.add_argument("--out", type=Path, required=True, metavar="FILE", help="bundle file to write (.elb)")
    add_json_flag(create)
    create.set_defaults(func=_create)
    _register_optimize(subparsers)


def _register_optimize(subparsers: Any) -> None:
    from . import DEFAULT_MAX_DROP_PP

    p = subparsers.add_parser(
        "optimize", help="your FP32 ONNX model -> gated FP16 / INT8 variants in a signed bundle",
        description="FP16, dynamic INT8 and static INT8 variants of your FP32 ONNX model with the accuracy gate, "
                    "per-layer float fallback and INT8 speed plan of `edgeloop export`; the metric follows the task "
                    "(top-1 on --eval class sub-folders, mAP@0.5 on --eval-annotations, else agreement with FP32). "
                    "Variants within --max-drop ship in the bundle; a report (.report.json/.md) goes next to it. "
                    "Task and preprocessing flags as for `bundle create` (docs/models.md).")
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="the FP32 ONNX model")
    p.add_argument("--calib", type=Path, required=True, metavar="DIR",
                   help="representative inputs (images or .npy, read recursively) to calibrate INT8 with")
    p.add_argument("--eval", type=Path, metavar="DIR",
                   help="evaluation inputs: classifiers one sub-folder per label; detectors the images of "
                        "--eval-annotations; tensor models .npy files (default: agreement with FP32 on --calib)")
    p.add_argument("--eval-annotations", type=Path, metavar="FILE.json", help="detectors: COCO-format annotations")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP_PP, metavar="PP",
                   help="largest metric drop a variant may have, percentage points (default %(default)s)")
    p.add_argument("--precisions", default="int8-static,int8-dynamic,fp16", metavar="LIST",
                   help="variants to try besides FP32 (default int8-static,int8-dynamic,fp16)")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="static INT8 calibration method (default minmax)")
    p.add_argument("--calib-samples", type=int, default=200, metavar="N", help="at most N calibration inputs")
    p.add_argument("--rounds", type=int, default=20, metavar="N", help="interleaved timing rounds (default 20)")
    p.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", help="bundle version (default: UTC timestamp)")
    add_model_flags(p)
    p.add_argument("--baseline-dir", type=Path, metavar="DIR", help="samples to calibrate the drift baseline from")
    p.add_argument("--sign", type=Path, metavar="KEY", help="private key file to sign the bundle with")
    p.add_argument("--out", type=Path, metavar="FILE", help="bundle to write (default: NAME-VERSION.elb)")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="parent of the temporary working directory")
    add_json_flag(p)
    p.set_defaults(func=_optimize)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Task, preprocessing and output flags shared by ``bundle create`` and ``optimize``."""
    g = p.add_argument_group("task and outputs")
    g.add_argument("--task", choices=("classification", "detection", "tensor"),
                   help="what the outputs mean (default: guessed: SSD op -> detection, one score per label -> "
                        "classification, else tensor)")
    g.add_argument("--output", metavar="NAME", help="classifier: the class-score output (default: the first)")
    g.add_argument("--output-kind", choices=("logits", "probabilities"),
                   help="classifier: logits (softmax applied) or probabilities (default: read from the model)")
    g.add_argument("--detector", choices=("ssd", "yolox", "yolov5", "yolov8"),
                   help="detection head: ssd (TFLite post-processed), yolox, yolov5 [1,N,5+C], yolov8 [1,4+C,N]")
    g.add_argument("--score-threshold", type=float, metavar="S", help="detection: lowest score kept (default 0.25)")
    g.add_argument("--iou-threshold", type=float, metavar="T", help="detection: NMS IoU (default 0.45)")
    g.add_argument("--max-detections", type=int, metavar="N", help="detection: at most N boxes (default 100)")
    g.add_argument("--strides", type=int, nargs="+", metavar="S", help="yolox: grid strides (default 8 16 32)")
    g.add_argument("--label-offset", type=int, metavar="K", help="detection: add K to a class id to index the labels")
    g.add_argument("--score", choices=("reconstruction-mse",), help="tensor: a per-input score (autoencoders)")
    g.add_argument("--streaming", action="store_true",
                   help="stateful model: keep its state between predictions (default: reset before each)")
    q = p.add_argument_group("preprocessing (image models)")
    q.add_argument("--layout", choices=("NCHW", "NHWC", "NHW", "none"),
                   help="input layout; none = raw tensor input (default: guessed from the input shape)")
    q.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input height and width (default: the model's)")
    q.add_argument("--channels", type=int, choices=(1, 3), help="input channels (default: the model's)")
    q.add_argument("--channel-order", choices=("RGB", "BGR", "GRAY"), help="default RGB (GRAY for 1 channel)")
    q.add_argument("--range", choices=("unit", "pixel", "signed"),
                   help="value range before mean/std: unit 0..1, pixel 0..255, signed -1..1 "
                        "(default pixel for uint8 inputs, else unit)")
    q.add_argument("--mean", type=float, nargs="+", help="per-channel mean, in --range units")
    q.add_argument("--std", type=float, nargs="+", help="per-channel std, in --range units")
    q.add_argument("--resize", choices=("bilinear", "area", "bilinear-cv", "nearest"),
                   help="bilinear: antialiased (PIL); area: box/INTER_AREA; bilinear-cv: OpenCV/TFLite half-pixel, "
                        "no antialias; nearest (default bilinear)")
    q.add_argument("--fit", choices=("stretch", "center-crop", "letterbox", "height"),
                   help="stretch (default), center-crop, letterbox (keep aspect, pad), height (PaddleOCR text lines)")
    q.add_argument("--anchor", choices=("center", "top-left"), help="letterbox placement (default center)")
    q.add_argument("--pad-value", type=float, metavar="V", help="raw pixel value of padding (default 0)")
    q.add_argument("--crop-fraction", type=float, metavar="F", help="center-crop: crop / resized side (e.g. 0.875)")


def _keys_new(args: argparse.Namespace) -> int:
    from core.signing import save_keypair

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a directory", hint="give a directory for the key files")
    paths = save_keypair(args.out / args.name, overwrite=args.force)
    data = {"key_id": paths.key_id, "private_key": str(paths.private), "public_key": str(paths.public)}
    emit(args, data, f"key {paths.key_id}\n  private: {paths.private} (keep secret; sign with --sign)\n"
                     f"  public:  {paths.public} (give to devices; verify with --key)")
    return 0


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _inspect(args: argparse.Namespace) -> int:
    from core.bundle import read_manifest_unverified, read_signature_unverified

    manifest = read_manifest_unverified(args.file)
    sig = read_signature_unverified(args.file)
    data: dict[str, Any] = {"file": str(args.file), "verified": False,
                            "signature": None if sig is None else {"algorithm": sig.algorithm, "key_id": sig.key_id},
                            "manifest": manifest}

    def human() -> None:
        m, pre = manifest, manifest.preprocessing
        print(f"{m.name} {m.version}  (created {m.created})  -- NOT verified; use `edgeloop bundle verify`")
        print(f"signature: {'none (unsigned)' if sig is None else f'{sig.algorithm}, key id {sig.key_id}'}")
        print(f"labels ({len(m.labels)}): {', '.join(m.labels[:10])}{' ...' if len(m.labels) > 10 else ''}")
        q = f" scale {m.input.scale:g} zero point {m.input.zero_point}" if m.input.scale is not None else ""
        print(f"task: {m.task.kind}{' ' + str(m.task.options) if m.task.options else ''}"
              f"{' (streaming)' if m.task.streaming else ''}")
        print(f"input: {m.input.name} {list(m.input.shape)} {m.input.dtype}{q} {m.input.layout}")
        if pre is not None:
            print(f"preprocessing: {pre.size[0]}x{pre.size[1]}, {pre.channels} ch {pre.channel_order}, "
                  f"x*{pre.scale:g} mean {list(pre.mean)} std {list(pre.std)}, resize {pre.resize}, fit {pre.fit}"
                  f"{f' ({pre.anchor}, pad {pre.pad_value:g})' if pre.fit in ('letterbox', 'height') else ''}, "
                  f"{pre.layout}")
        else:
            print("preprocessing: none (raw tensor input)")
        for t in m.outputs.tensors:
            tq = f" scale {t.scale:g} zero point {t.zero_point}" if t.scale is not None else ""
            print(f"output: {t.name} {list(t.shape)} {t.dtype}{tq} -> {t.meaning}")
        if not m.outputs.tensors:
            print(f"outputs: logits {m.outputs.logits}, embedding {m.outputs.embedding}")
        ref = _fmt(None if m.reference_accuracy is None else 100 * m.reference_accuracy, ".2f")
        print(f"reference accuracy: {ref}%  accuracy budget: {m.accuracy_budget} pp")
        rows = [["variant", "format", "precision", "size", "test acc %", "drop pp", "latency ms", "sha256"]]
        for v in m.variants:
            acc = None if v.test_accuracy is None else 100 * v.test_accuracy
            rows.append([v.id, v.format, v.precision, _size(v.size), _fmt(acc, ".2f"),
                         _fmt(v.accuracy_drop, ".2f"), _fmt(v.latency_ms, ".3f"), v.sha256[:12]])
        print(_table(rows))
        others = sorted(set(m.members) - {v.file for v in m.variants})
        print(f"other members: {', '.join(others) if others else '-'}")
        if m.lineage.run_id or m.lineage.parent_version:
            print(f"lineage: run {m.lineage.run_id or '-'}, parent {m.lineage.parent_version or '-'}, "
                  f"data {m.lineage.data_hash or '-'}")

    emit(args, data, human)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from core.bundle import open_bundle

    bundle = open_bundle(args.file, trusted_key=args.key, require_signature=not args.allow_unsigned)
    m = bundle.manifest
    data = {"file": str(args.file), "valid": True, "name": m.name, "version": m.version,
            "signed_by": bundle.signed_by, "manifest_sha256": bundle.manifest_sha256,
            "members": len(m.members), "variants": [v.id for v in m.variants]}
    who = f"signed by key {bundle.signed_by}" if bundle.signed_by else "signature NOT checked (--allow-unsigned)"
    emit(args, data, f"OK {m.name} {m.version}: {len(m.members)} members verified, {who}")
    return 0


def _create(args: argparse.Namespace) -> int:
    try:
        from export.byom import create_bundle  # heavy (onnx / tflite inspection): only when asked
    except ModuleNotFoundError as exc:
        raise ExportError(f"`edgeloop bundle create` needs {exc.name}, which is not installed",
                          hint="install the build extra: pip install 'edgeloop[train]'") from exc
    result = create_bundle(args)
    return int(result) if isinstance(result, int) else 0


def _optimize(args: argparse.Namespace) -> int:
    try:
        from export.optimize import run_cli  # heavy (onnx, the quantizers): only when asked
    except ModuleNotFoundError as exc:
        raise ExportError(f"`edgeloop optimize` needs {exc.name}, which is not installed",
                          hint="install the build extra: pip install 'edgeloop[train]'") from exc
    return run_cli(args)
