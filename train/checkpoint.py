"""Self-describing training checkpoints: weights, model args, labels, preprocessing, lineage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError, TrainError
from core.manifest import Preprocessing

from .config import TrainConfig
from .loop import FitResult
from .models import EdgeModel

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "read_checkpoint", "resolve_checkpoint", "spec_dict"]

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
        "preprocessing": spec_dict(spec),
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


def spec_dict(spec: Preprocessing) -> dict[str, Any]:
    return {"size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std),
            "scale": spec.scale, "resize": spec.resize, "layout": spec.layout, "channel_order": spec.channel_order}


