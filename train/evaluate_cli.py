"""What ``edgeloop eval`` evaluates: a run's checkpoint, or every variant inside a bundle.

Bundles are evaluated through the device's own path: raw test images ->
:func:`core.preprocess.preprocess` with the manifest's spec ->
:func:`core.runtime.open_model` -> :func:`train.evaluate.evaluate_logits`.  The
test split is rebuilt from the manifest's lineage (dataset, image size, split seed and
fractions), so it is the split the model never saw.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, DataError

from .evaluate import EvalReport, evaluate_logits

__all__ = ["evaluate_target", "evaluate_run", "evaluate_bundle", "bundle_eval_data"]


def evaluate_target(target: Path, *, split: str = "test", variant: str | None = None,
                    trusted_key: Path | None = None) -> dict[str, EvalReport]:
    """Dispatch on what ``target`` is: a run directory or a ``.elb`` bundle."""
    if target.is_dir():
        if variant is not None:
            raise ConfigError("--variant applies to bundles only", key="variant")
        return {"checkpoint": evaluate_run(target, split=split)}
    if target.is_file():
        return evaluate_bundle(target, split=split, variant=variant, trusted_key=trusted_key)
    raise ConfigError(f"{target}: no such run directory or bundle", hint="pass a run directory or a .elb file",
                      path=target)


def evaluate_run(run_dir: Path, *, split: str = "test") -> EvalReport:
    """The run's checkpoint on one of its splits."""
    from .api import load_run
    from .loop import predict

    run = load_run(run_dir)
    x, y = run.arrays(split)
    logits, _ = predict(run.model, x)
    return evaluate_logits(logits, y, run.labels)


def bundle_eval_data(manifest: Any, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images and labels of ``split``, rebuilt from a manifest's lineage.

    Extra samples of fine-tuned runs live in the run directory, not the bundle; only the
    base dataset's part of the split is rebuilt here.
    """
    from .data import load_dataset, split_dataset

    lin = manifest.lineage
    params = dict(lin.params or {})
    dataset = lin.dataset or params.get("dataset")
    if not dataset:
        raise DataError(f"bundle {manifest.name} {manifest.version} does not name its dataset (lineage.dataset)",
                        hint="evaluate the run directory instead")
    size = params.get("image_size") or list(manifest.preprocessing.size)
    ds = load_dataset(dataset, tuple(size) if isinstance(size, (list, tuple)) else int(size), params.get("channels"))
    if tuple(ds.class_names) != tuple(manifest.labels):
        raise DataError(f"dataset {dataset} has classes {list(ds.class_names)}, the bundle {list(manifest.labels)}",
                        hint="evaluate on the dataset the model was trained on")
    seed = int(params.get("split_seed", params.get("seed", 0)))
    sp = split_dataset(ds, seed, float(params.get("val_fraction", 0.15)), float(params.get("test_fraction", 0.15)))
    idx = sp.indices(split)
    return ds.images[idx], ds.labels[idx]


def evaluate_bundle(path: Path, *, split: str = "test", variant: str | None = None,
                    trusted_key: Path | None = None) -> dict[str, EvalReport]:
    """Every variant of the bundle (or one) through the edge runtime, on the lineage's split."""
    from core.bundle import open_bundle
    from core.preprocess import preprocess
    from core.runtime import open_model

    bundle = open_bundle(path, trusted_key=trusted_key, require_signature=trusted_key is not None)
    manifest = bundle.manifest
    variants = [manifest.variant(variant)] if variant else list(manifest.variants)
    images, y = bundle_eval_data(manifest, split)
    x = preprocess(images, manifest.preprocessing)
    results: dict[str, EvalReport] = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-eval-") as tmp:
        for v in variants:
            model_path = Path(tmp) / Path(v.file).name
            model_path.write_bytes(bundle.variant_bytes(v.id))
            backend = open_model(model_path, v, threads=1)
            # Batch 1 where the model's batch dimension is fixed (TFLite exports usually are).
            batch = len(x) if backend.input_shape and backend.input_shape[0] < 0 else 1
            logits = np.concatenate([backend.run(x[i:i + batch]).logits for i in range(0, len(x), batch)])
            results[v.id] = evaluate_logits(logits, y, manifest.labels)
    return results
