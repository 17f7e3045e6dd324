"""A run before training: resolve the config, load and split the data, pick the input spec and
architecture, and build the model (also what tuning trials build from)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, DataError
from core.manifest import Preprocessing
from core.preprocess import preprocess

from .checkpoint import read_checkpoint, resolve_checkpoint
from .config import DEFAULT_EPOCHS, TrainConfig
from .data import ImageDataset, Split, data_hash, load_dataset, split_dataset, split_labels
from .loop import FitParams
from .models import (
    EdgeModel,
    ModelArgs,
    build_model,
    default_image_size,
    default_normalisation,
    freeze_backbone,
    load_weights,
)

__all__ = ["Prepared", "prepare", "build", "fit_params", "arrays_for"]

log = logging.getLogger("train")

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


