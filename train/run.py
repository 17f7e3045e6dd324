"""One training run, start to finish: resolve the config, load and split the data, build the
model, (tune,) fit, evaluate on the test split and write the run directory.

Run directory (read back by :func:`train.api.load_run`)::

    RUN/params.json     resolved config, dataset, preprocessing, model args, data hash, lineage
    RUN/metrics.json    test and val reports, training history (and the study summary when tuned)
    RUN/checkpoint.pt   self-describing checkpoint (see :func:`save_checkpoint`)
    RUN/split.json      train / val / test indices into the dataset
    RUN/train.log       the log of this run
    RUN/confusion.png   test confusion matrix
    RUN/extra.npz       labelled samples added to the base dataset (fine-tunes only)
    RUN/study.json      Optuna trials (tuned runs only)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, EdgeloopError, TrainError
from core.progress import say

from .checkpoint import save_checkpoint, spec_dict
from .config import TrainConfig
from .data import data_hash
from .evaluate import EvalReport, evaluate_logits, save_confusion_png
from .loop import deterministic, fit, predict
from .models import count_params
from .prepare import Prepared, build, fit_params, prepare

__all__ = ["execute"]

log = logging.getLogger("train")

# ---------------------------------------------------------------------------- the run


def _run_dir(config: TrainConfig) -> tuple[str, Path]:
    dsname = "digits" if config.dataset == "digits" else Path(str(config.dataset)).name
    run_id = config.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{dsname}-{secrets.token_hex(2)}"
    run_dir = Path(config.out_dir) / run_id
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: run directory exists and is not empty", hint="choose another run name",
                          path=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_id, run_dir


def _versions() -> dict[str, str]:
    import torchvision

    try:
        edgeloop_version = version("edgeloop")
    except PackageNotFoundError:  # a source tree that was never installed
        edgeloop_version = "unknown"
    return {"edgeloop": edgeloop_version, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "python": platform.python_version()}


def execute(config: TrainConfig, *, extra_images: Any = None, extra_labels: Any = None,
            progress: bool = False) -> Path:
    """Train (tuning first when ``config.trials``) and write a complete run directory."""
    prep = prepare(config, extra_images=extra_images, extra_labels=extra_labels)
    run_id, run_dir = _run_dir(prep.config)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    prev_level, prev_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # train.log always gets the epochs ...
    # ... the console only when the user asked for it (-v): otherwise the progress bar says enough.
    log.propagate = logging.getLogger().getEffectiveLevel() <= logging.INFO
    try:
        return _execute(prep, run_id, run_dir, progress)
    except EdgeloopError:
        log.exception("run failed")
        raise
    except Exception as exc:
        log.exception("run failed")
        raise TrainError(f"training failed: {exc}", hint=f"see {run_dir / 'train.log'}", path=run_dir) from exc
    finally:
        log.removeHandler(handler)
        log.setLevel(prev_level)
        log.propagate = prev_propagate
        handler.close()


def _execute(prep: Prepared, run_id: str, run_dir: Path, progress: bool) -> Path:
    config = prep.config
    study = None
    log.info("run %s: %s on %s (%d images, %d classes, %d extra), image size %s",
             run_id, config.model, config.dataset, len(prep.dataset), len(prep.dataset.class_names), prep.n_extra,
             prep.spec.size)
    if config.trials:
        from .tune import tune

        config, study = tune(prep, config.trials, progress=progress)
        prep.config = config
        (run_dir / "study.json").write_text(json.dumps(study, indent=2))
    full_hash = data_hash(prep.dataset)
    prep.split.save(run_dir / "split.json")
    if prep.n_extra:
        start = int(prep.split.extra["extra_from"])
        np.savez_compressed(run_dir / "extra.npz", images=prep.dataset.images[start:],
                            labels=prep.dataset.labels[start:])
    params: dict[str, Any] = {
        "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config.to_dict(),
        "dataset": config.dataset, "image_size": list(prep.dataset.image_size), "channels": prep.dataset.channels,
        "model": prep.model_args.to_dict(), "preprocessing": spec_dict(prep.spec),
        "labels": list(prep.dataset.class_names), "data_hash": full_hash, "base_data_hash": prep.base_hash,
        "n_images": len(prep.dataset), "extra_samples": prep.n_extra,
        "seed": config.seed, "split_seed": prep.split.seed, "val_fraction": prep.split.val_fraction,
        "test_fraction": prep.split.test_fraction,
        "parent": ({"run_id": prep.parent_ckpt.get("run_id"), "path": str(prep.parent_dir)}
                   if prep.parent_ckpt else None),
        "versions": _versions(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    with deterministic(config.seed, config.threads) as threads:
        model = build(prep, width=config.width if prep.parent_ckpt is None else None, dropout=config.dropout)
        params["model"] = model.args.to_dict()
        params["threads"] = threads
        params["num_params"] = count_params(model)
        params["trainable_params"] = count_params(model, trainable_only=True)
        (run_dir / "params.json").write_text(json.dumps(params, indent=2))
        x_tr, y_tr = prep.arrays("train")
        x_va, y_va = prep.arrays("val")
        if progress:
            say(f"train: {config.model} on {len(x_tr)} training images -> {run_dir}")
        fitted = fit(model, x_tr, y_tr, x_va, y_va, fit_params(config), progress=progress)
        reports: dict[str, EvalReport] = {}
        for part in ("val", "test"):
            x, y = prep.arrays(part)
            logits, _ = predict(model, x)
            reports[part] = evaluate_logits(logits, y.numpy(), prep.dataset.class_names)
    log.info("best epoch %d val_acc %.4f; test %s", fitted.best_epoch, fitted.best_val_accuracy,
             reports["test"].summary())
    save_checkpoint(run_dir / "checkpoint.pt", model, labels=prep.dataset.class_names, spec=prep.spec,
                    config=config, fitted=fitted, run_id=run_id, data_hash_=full_hash)
    save_confusion_png(reports["test"], run_dir / "confusion.png", f"{run_id}: test accuracy {reports['test'].accuracy:.3f}")
    metrics = {"test_accuracy": reports["test"].accuracy, "val_accuracy": reports["val"].accuracy,
               "test_macro_f1": reports["test"].macro_f1, "test": reports["test"].to_dict(),
               "val": reports["val"].to_dict(), "train": fitted.summary()}
    if study is not None:
        metrics["tuning"] = {k: study[k] for k in ("n_trials", "best_trial", "best_value", "best_params")}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir

