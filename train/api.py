"""The Python API of ``train``: :func:`train_run` writes a run, :func:`load_run` reads one.

``export`` and ``fleet`` use only this module (and :mod:`train.evaluate`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DataError, TrainError
from core.manifest import Lineage, Preprocessing

from .checkpoint import read_checkpoint
from .config import TrainConfig
from .data import ImageDataset, Split, data_hash, load_dataset
from .models import EdgeModel, ModelArgs, build_model
from .prepare import arrays_for
from .run import execute

__all__ = ["TrainConfig", "LoadedRun", "load_run", "load_model", "train_run"]


def train_run(config: TrainConfig, *, extra_images: Any = None, extra_labels: Any = None,
              progress: bool = False) -> Path:
    """Train per ``config`` and return the new run directory.

    Fine-tuning: set ``config.init_from`` to a run directory (or checkpoint) and pass the
    new labelled samples as ``extra_images`` (uint8 (N, H, W[, C]) or a list of images of
    any size; they are resized to the dataset's camera size) and ``extra_labels`` (class
    indices or class names).  The parent's split is kept for its data (its test set stays
    unseen) and the extras are split stratified on top; they are saved in ``extra.npz`` so
    :func:`load_run` reproduces the data exactly.
    """
    if (extra_images is None) != (extra_labels is None):
        raise DataError("pass extra_images and extra_labels together")
    return execute(config, extra_images=extra_images, extra_labels=extra_labels, progress=progress)


def load_model(checkpoint: str | Path) -> tuple[EdgeModel, dict[str, Any]]:
    """Rebuild the eval-mode model from a run directory or checkpoint; also return the checkpoint dict."""
    ckpt = read_checkpoint(checkpoint)
    model = build_model(ModelArgs(**ckpt["model"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, ckpt


@dataclass(frozen=True)
class LoadedRun:
    """A finished run, ready for export: model, labels, preprocessing, data and metrics.

    ``dataset`` (base data plus any extra samples) is loaded on first use and checked
    against the run's ``data_hash``.
    """

    path: Path
    run_id: str
    model: EdgeModel
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    split: Split
    params: dict[str, Any]
    metrics: dict[str, Any]
    data_hash: str
    checkpoint: dict[str, Any]

    @functools.cached_property
    def dataset(self) -> ImageDataset:
        ds = load_dataset(self.params["dataset"], tuple(self.params["image_size"]), self.params.get("channels"))
        extra = self.path / "extra.npz"
        if extra.is_file():
            with np.load(extra) as z:
                ds = ds.extended(z["images"], z["labels"])
        got = data_hash(ds)
        if got != self.data_hash:
            raise DataError(f"dataset {self.params['dataset']} changed since run {self.run_id} was trained",
                            hint="retrain on the current data, or restore the original images", path=self.path)
        return ds

    def arrays(self, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 NCHW preprocessed exactly as on the device, y int64) of ``train``/``val``/``test``."""
        return arrays_for(self.dataset, self.split, self.preprocessing, split_name)

    def images(self, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw uint8 camera images and labels of one split (for drift baselines and calibration)."""
        idx = self.split.indices(split_name)
        return self.dataset.images[idx], self.dataset.labels[idx]

    @property
    def model_args(self) -> ModelArgs:
        return self.model.args

    def lineage(self, parent_version: str | None = None) -> Lineage:
        """The bundle manifest's lineage for this run.

        ``params`` carries what ``edgeloop eval BUNDLE`` needs to rebuild the test split
        (dataset, image size, channels, split seed and fractions) plus the training knobs.
        """
        keys = ("seed", "split_seed", "val_fraction", "test_fraction", "image_size", "channels", "data_hash",
                "base_data_hash", "extra_samples", "num_params")
        params = {k: self.params[k] for k in keys if k in self.params}
        params["model"] = dict(self.params.get("model", {}))
        params["train"] = {k: self.params.get("config", {}).get(k) for k in
                           ("epochs", "lr", "weight_decay", "batch_size", "dropout", "width", "augment")}
        if self.params.get("parent"):
            params["parent_run"] = self.params["parent"].get("run_id")
        return Lineage(run_id=self.run_id, data_hash=self.data_hash, params=params,
                       parent_version=parent_version, dataset=str(self.params["dataset"]))


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run directory written by :func:`train_run` / ``edgeloop train``."""
    p = Path(run_dir)
    if not p.is_dir():
        raise TrainError(f"{p}: no such run directory", hint="pass a directory made by `edgeloop train`", path=p)
    missing = [f for f in ("params.json", "metrics.json", "checkpoint.pt", "split.json") if not (p / f).is_file()]
    if missing:
        raise TrainError(f"{p}: incomplete run (missing {', '.join(missing)})",
                         hint="the run failed or is still training; see its train.log", path=p)
    try:
        params = json.loads((p / "params.json").read_text())
        metrics = json.loads((p / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{p}: cannot read run metadata ({exc})", path=p) from exc
    model, ckpt = load_model(p / "checkpoint.pt")
    pre = ckpt["preprocessing"]
    spec = Preprocessing(**{**pre, "size": tuple(pre["size"])})
    return LoadedRun(path=p, run_id=str(ckpt.get("run_id") or params.get("run_id") or p.name), model=model,
                     labels=tuple(ckpt["labels"]), preprocessing=spec, split=Split.load(p / "split.json"),
                     params=params, metrics=metrics, data_hash=str(ckpt.get("data_hash") or params["data_hash"]),
                     checkpoint=ckpt)
