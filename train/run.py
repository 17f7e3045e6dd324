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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.errors import ConfigError, DataError, EdgeloopError, TrainError
from edge_agent.manifest import Preprocessing
from edge_agent.preprocess import preprocess

from .config import DEFAULT_EPOCHS, TrainConfig
from .data import ImageDataset, Split, data_hash, load_dataset, split_dataset, split_labels
from .evaluate import EvalReport, evaluate_logits, save_confusion_png
from .loop import FitParams, FitResult, deterministic, fit, predict
from .models import (
    EdgeModel,
    ModelArgs,
    build_model,
    count_params,
    default_image_size,
    default_normalisation,
    freeze_backbone,
    load_weights,
)

__all__ = ["CHECKPOINT_FORMAT", "Prepared", "prepare", "build", "fit_params", "execute", "save_checkpoint",
           "read_checkpoint", "resolve_checkpoint", "arrays_for"]

log = logging.getLogger("train")
CHECKPOINT_FORMAT = "edgeloop-checkpoint/1"


# ---------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    ckpt = p / "checkpoint.pt" if p.is_dir() else p
    if not ckpt.is_file():
        raise ConfigError(f"{p}: no checkpoint found", hint="pass a finished run directory or its checkpoint.pt", path=p)
    return ckpt


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (tensors and plain types only: ``weights_only=True``)."""
    ckpt_path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise TrainError(f"{ckpt_path}: cannot read checkpoint ({exc})", hint="the file is corrupt; retrain",
                         path=ckpt_path) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{ckpt_path}: not an edgeloop checkpoint", hint="train it with `edgeloop train`", path=ckpt_path)
    return ckpt


def save_checkpoint(path: Path, model: EdgeModel, *, labels: tuple[str, ...], spec: Preprocessing,
                    config: TrainConfig, fitted: FitResult, run_id: str, data_hash_: str) -> None:
    """Everything needed to rebuild and use the model without any other file."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "model": model.args.to_dict(),
        "labels": list(labels),
        "preprocessing": _spec_dict(spec),
        "config": config.to_dict(),
        "epoch": fitted.best_epoch,
        "best_metric": {"name": "val_accuracy", "value": fitted.best_val_accuracy, "val_loss": fitted.best_val_loss},
        "run_id": run_id,
        "data_hash": data_hash_,
        "torch_version": str(torch.__version__),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _spec_dict(spec: Preprocessing) -> dict[str, Any]:
    return {"size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std),
            "scale": spec.scale, "resize": spec.resize, "layout": spec.layout, "channel_order": spec.channel_order}


# ---------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """A resolved run before training: data, split, input spec, architecture, parent."""

    config: TrainConfig
    dataset: ImageDataset
    base_hash: str
    n_extra: int
    split: Split
    spec: Preprocessing
    model_args: ModelArgs
    parent_ckpt: dict[str, Any] | None
    parent_dir: Path | None

    def arrays(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = arrays_for(self.dataset, self.split, self.spec, part)
        return torch.from_numpy(x), torch.from_numpy(y)


def arrays_for(ds: ImageDataset, split: Split, spec: Preprocessing, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs (the device's own function) and labels of one split part."""
    idx = split.indices(part)
    if len(idx) == 0:
        raise DataError(f"split {part!r} is empty")
    return preprocess(ds.images[idx], spec), ds.labels[idx].copy()


def _extra_labels(labels: Any, class_names: tuple[str, ...]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype.kind in "US":
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted({str(v) for v in arr if str(v) not in index})
        if unknown:
            raise DataError(f"extra labels {unknown[:5]} are not classes of the dataset", hint=f"use {list(class_names)}")
        return np.array([index[str(v)] for v in arr], dtype=np.int64)
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= len(class_names))):
        raise DataError(f"extra labels must be class indices 0..{len(class_names) - 1} or class names")
    return arr.astype(np.int64)


def prepare(config: TrainConfig, *, extra_images: Any = None, extra_labels: Any = None) -> Prepared:
    """Resolve defaults (from the parent run when fine-tuning), load data and split it."""
    parent_ckpt, parent_dir, pparams = None, None, {}
    if config.init_from:
        ckpt_path = resolve_checkpoint(config.init_from)
        parent_ckpt = read_checkpoint(ckpt_path)
        parent_dir = ckpt_path.parent
        if (parent_dir / "params.json").is_file():
            pparams = json.loads((parent_dir / "params.json").read_text())
    pmodel = parent_ckpt["model"] if parent_ckpt else {}
    if parent_ckpt and config.model and config.model != pmodel["name"]:
        raise ConfigError(f"init_from is a {pmodel['name']} run but model={config.model}",
                          hint="leave model unset to fine-tune the parent's architecture", key="model")
    model_name = config.model or pmodel.get("name") or "tiny-cnn"
    dataset_name = config.dataset or pparams.get("dataset") or "digits"
    if parent_ckpt:
        psize = int(parent_ckpt["preprocessing"]["size"][0])
        if config.image_size and config.image_size != psize:
            raise ConfigError(f"init_from was trained at image size {psize}, not {config.image_size}", key="image_size")
        image_size = pparams.get("image_size", [psize])[0]
    else:
        image_size = config.image_size or default_image_size(model_name)
    channels = config.channels or pparams.get("channels")
    config = config.replace(dataset=str(dataset_name), model=model_name, image_size=int(image_size),
                            epochs=config.epochs or DEFAULT_EPOCHS[model_name])

    base = load_dataset(dataset_name, int(image_size), channels)
    base_hash = data_hash(base)
    ds, split = base, None
    if parent_dir is not None and pparams.get("base_data_hash") == base_hash and (parent_dir / "split.json").is_file():
        # Keep the parent's split (and its extra samples): the parent saw its train part,
        # so a fresh split would leak those images into this run's test set.
        split = Split.load(parent_dir / "split.json")
        if (parent_dir / "extra.npz").is_file():
            with np.load(parent_dir / "extra.npz") as z:
                ds = ds.extended(z["images"], z["labels"], "parent-extra")
        if max(split.train + split.val + split.test, default=-1) != len(ds) - 1:
            raise DataError(f"{parent_dir}: split.json does not match its data", path=parent_dir)
    elif parent_dir is not None:
        log.warning("dataset differs from the parent run's; using a fresh split")
    if split is None:
        split = split_dataset(base, config.seed, config.val_fraction, config.test_fraction)
    n_before = len(ds)
    if extra_images is not None:
        labels = _extra_labels(extra_labels, ds.class_names)
        if len(labels) != len(extra_images):
            raise DataError(f"{len(extra_images)} extra images but {len(labels)} labels")
        ds = ds.extended(np.asarray(extra_images) if not isinstance(extra_images, list) else extra_images, labels)
        tr, va, te = split_labels(labels, config.seed, config.val_fraction, config.test_fraction, at_least_one=False)
        split = Split(split.train + tuple(tr + n_before), split.val + tuple(va + n_before),
                      split.test + tuple(te + n_before), split.seed, split.val_fraction, split.test_fraction,
                      {**split.extra, "extra_from": split.extra.get("extra_from", n_before)})
    if "extra_from" not in split.extra and len(ds) > len(base):
        split = Split(split.train, split.val, split.test, split.seed, split.val_fraction, split.test_fraction,
                      {"extra_from": len(base)})

    in_ch = ds.channels if model_name == "tiny-cnn" else 3
    if parent_ckpt:
        in_ch = int(pmodel["in_channels"])
    mean, std = default_normalisation(model_name, in_ch)
    spec = Preprocessing(size=(int(image_size), int(image_size)), channels=in_ch, mean=mean, std=std)
    if parent_ckpt:
        spec = Preprocessing(**{**parent_ckpt["preprocessing"], "size": tuple(parent_ckpt["preprocessing"]["size"])})
    margs = ModelArgs(model_name, len(ds.class_names), in_channels=in_ch,
                      width=float(pmodel.get("width", config.width)), dropout=config.dropout)
    return Prepared(config, ds, base_hash, len(ds) - len(base), split, spec, margs, parent_ckpt, parent_dir)


def build(prep: Prepared, *, width: float | None = None, dropout: float | None = None) -> EdgeModel:
    """The model of a prepared run, initialised from ``weights`` / the parent, frozen if asked."""
    args = prep.model_args
    if width is not None or dropout is not None:
        args = ModelArgs(args.name, args.num_classes, args.in_channels,
                         args.width if width is None else width, args.dropout if dropout is None else dropout)
    model = build_model(args)
    if prep.parent_ckpt is not None:
        reinit = load_weights(model, prep.parent_ckpt["model_state"], path=prep.parent_dir)
        if list(prep.parent_ckpt["labels"]) != list(prep.dataset.class_names) and not reinit:
            raise ConfigError("the dataset's classes differ from the parent run's",
                              hint="fine-tune on the same classes, or train a fresh model", key="init_from")
    elif prep.config.weights:
        reinit = load_weights(model, Path(prep.config.weights))
        if reinit:
            log.info("head re-initialised for %d classes: %s", args.num_classes, ", ".join(reinit))
    if prep.config.freeze_backbone:
        freeze_backbone(model)
    return model


def fit_params(config: TrainConfig) -> FitParams:
    return FitParams(epochs=int(config.epochs or 1), lr=config.lr, weight_decay=config.weight_decay,
                     batch_size=config.batch_size, seed=config.seed, patience=config.patience,
                     augment=config.augment, warmup_epochs=config.warmup_epochs,
                     precise_bn=config.model not in (None, "tiny-cnn"))


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

    from edgeloop import __version__

    return {"edgeloop": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
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
        "model": prep.model_args.to_dict(), "preprocessing": _spec_dict(prep.spec),
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
