"""``edgeloop train`` and ``edgeloop eval`` (torch is imported inside the handlers only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.cliutil import add_json_flag, emit
from core.errors import ConfigError

__all__ = ["register"]

_MODELS = ("tiny-cnn", "mobilenet_v3_small", "mobilenet_v2", "resnet18")  # mirrors train.models.MODELS (no torch here)


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``eval`` sub-commands."""
    p = subparsers.add_parser("train", help="train a model on digits or an image folder",
                              description="Train a classifier and write a run directory (checkpoint, metrics, split).")
    p.add_argument("--dataset", default=None, help="'digits' (built in, offline) or an image folder (default: digits)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR", help="image folder, one sub-folder per class")
    p.add_argument("--model", default=None, choices=_MODELS, help="architecture (default: tiny-cnn)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: 32 tiny-cnn, 64 torchvision)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert folder images to 1 or 3 channels")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default per model; early stopping)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (tiny-cnn, mobilenets)")
    p.add_argument("--no-augment", action="store_true", help="disable the light random affine augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--weights", default=None, metavar="FILE", help="local state_dict/checkpoint to start from (head resized)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the classification head only")
    p.add_argument("--init-from", default=None, metavar="RUN", help="fine-tune from a run directory or checkpoint")
    p.add_argument("--trials", type=int, default=0, help="Optuna trials before the final training (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run directories (default runs/)")
    p.add_argument("--name", default=None, help="run directory name (default: timestamp-model-dataset-xxxx)")
    add_json_flag(p)
    p.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="evaluate a run or every variant of a bundle on its test split",
                              description="Accuracy, per-class metrics, macro-F1, ROC-AUC and confusion matrix.")
    e.add_argument("target", type=Path, metavar="RUN_OR_BUNDLE", help="run directory or .elb bundle")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    e.add_argument("--variant", default=None, help="bundle only: evaluate this variant only")
    e.add_argument("--key", type=Path, default=None, metavar="PUB",
                   help="bundle only: verify the signature with this public key")
    e.add_argument("--trusted-key", dest="key", type=Path, help=argparse.SUPPRESS)  # old spelling
    e.add_argument("--confusion-png", type=Path, default=None, metavar="FILE", help="also draw the confusion matrix")
    add_json_flag(e)
    e.set_defaults(func=_eval)


def _dataset(args: argparse.Namespace) -> str | None:
    if args.data is not None:
        if args.dataset is not None and Path(args.dataset) != args.data:
            raise ConfigError(f"--dataset {args.dataset} conflicts with --data {args.data}", hint="give one of them")
        return str(args.data)
    return args.dataset


def _train(args: argparse.Namespace) -> int:
    from .api import TrainConfig, train_run

    config = TrainConfig(
        dataset=_dataset(args), model=args.model, image_size=args.image_size, channels=args.channels,
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed,
        patience=args.patience, dropout=args.dropout, width=args.width, augment=not args.no_augment,
        weights=args.weights, freeze_backbone=args.freeze_backbone, init_from=args.init_from,
        out_dir=str(args.out), run_name=args.name, threads=args.threads, trials=args.trials,
    )
    run_dir = train_run(config, progress=True)  # stderr: --json output stays clean
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    params = json.loads((run_dir / "params.json").read_text())
    test = metrics["test"]
    result = {"run_dir": str(run_dir), "run_id": params["run_id"], "model": params["model"]["name"],
              "dataset": params["dataset"], "num_params": params["num_params"],
              "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "test_roc_auc": test["roc_auc"],
              "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["train"]["best_epoch"],
              "epochs_run": metrics["train"]["epochs_run"], "train_seconds": metrics["train"]["train_seconds"]}
    if "tuning" in metrics:
        result["tuning"] = metrics["tuning"]

    def human() -> None:
        print(run_dir)
        print(f"  {result['model']} on {result['dataset']}: test accuracy {test['accuracy']:.4f}, "
              f"macro-F1 {test['macro_f1']:.4f}, best epoch {result['best_epoch']}/{result['epochs_run']}, "
              f"{result['train_seconds']:.0f}s, {result['num_params']:,} parameters")

    emit(args, result, human)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import save_confusion_png
    from .evaluate_cli import evaluate_target

    results = evaluate_target(args.target, split=args.split, variant=args.variant, trusted_key=args.key)
    if args.confusion_png is not None:
        first = next(iter(results.values()))
        save_confusion_png(first, args.confusion_png)

    def human() -> None:
        for name, report in results.items():
            print(f"{name}: {report.summary()}")
            worst = sorted(report.per_class, key=lambda c: c.f1)[:3]
            print("  weakest classes: " + ", ".join(f"{c.label} F1 {c.f1:.3f}" for c in worst))
        sys.stdout.flush()

    emit(args, {"target": str(args.target), "split": args.split,
                "results": {k: r.to_dict() for k, r in results.items()}}, human)
    return 0
