"""``TrainConfig``: one frozen, validated, JSON-round-tripping config per training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

from .models import MODELS

__all__ = ["TRAIN_CONFIG_SCHEMA_VERSION", "TrainConfig", "DEFAULT_EPOCHS"]

TRAIN_CONFIG_SCHEMA_VERSION = 1
# Measured on 2 cores: tiny-cnn reaches >= 97% test accuracy on digits well within this.
DEFAULT_EPOCHS = {"tiny-cnn": 30, "mobilenet_v3_small": 30, "mobilenet_v2": 20, "resnet18": 15}


def _bad(key: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"train config: {key}={value!r} is invalid", hint=hint, key=key)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model.  ``None`` means "the default" (or the parent run's value when
    fine-tuning with ``init_from``); :meth:`resolved` fills them in.

    ``dataset``: ``"digits"`` or an image folder.  ``init_from``: a run directory or a
    ``checkpoint.pt`` to fine-tune from.  ``weights``: a local state_dict / checkpoint to
    start from (head resized).  ``threads``: torch intra-op threads (fixed for
    reproducibility; ``None`` = all cores).  ``run_name``: the run directory's name under
    ``out_dir`` (default: generated, unique).  ``trials``: Optuna trials before the final
    training (0: no tuning).
    """

    dataset: str | None = None
    model: str | None = None
    image_size: int | None = None
    channels: int | None = None
    epochs: int | None = None
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    patience: int = 8
    dropout: float = 0.2
    width: float = 1.0
    augment: bool = True
    warmup_epochs: float = 1.0
    weights: str | None = None
    freeze_backbone: bool = False
    init_from: str | None = None
    out_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    trials: int = 0
    schema_version: int = TRAIN_CONFIG_SCHEMA_VERSION

    def __post_init__(self) -> None:
        for key in ("dataset", "weights", "init_from", "out_dir"):
            v = getattr(self, key)
            if isinstance(v, Path):
                object.__setattr__(self, key, str(v))
        if self.schema_version != TRAIN_CONFIG_SCHEMA_VERSION:
            raise _bad("schema_version", self.schema_version, f"this edgeloop reads {TRAIN_CONFIG_SCHEMA_VERSION}")
        if self.model is not None and self.model not in MODELS:
            raise _bad("model", self.model, f"choose one of {', '.join(MODELS)}")
        if self.dataset is not None and not self.dataset:
            raise _bad("dataset", self.dataset, "use 'digits' or an image folder")
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            raise _bad("image_size", self.image_size, "use 8 .. 512")
        if self.channels not in (None, 1, 3):
            raise _bad("channels", self.channels, "use 1 or 3")
        if self.epochs is not None and not 1 <= self.epochs <= 10_000:
            raise _bad("epochs", self.epochs, "use at least 1")
        if not 0 < self.lr < 1:
            raise _bad("lr", self.lr, "use e.g. 3e-3")
        if not 0 <= self.weight_decay < 1:
            raise _bad("weight_decay", self.weight_decay, "use e.g. 1e-4")
        if not 1 <= self.batch_size <= 4096:
            raise _bad("batch_size", self.batch_size, "use e.g. 64")
        if self.patience < 1:
            raise _bad("patience", self.patience, "use at least 1")
        if not 0 <= self.dropout < 1:
            raise _bad("dropout", self.dropout, "use 0 <= dropout < 1")
        if not 0.1 <= self.width <= 4:
            raise _bad("width", self.width, "use 0.25 .. 2")
        if self.warmup_epochs < 0:
            raise _bad("warmup_epochs", self.warmup_epochs, "use 0 or more")
        if self.threads is not None and self.threads < 1:
            raise _bad("threads", self.threads, "use at least 1")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise _bad("val_fraction/test_fraction", (self.val_fraction, self.test_fraction), "use e.g. 0.15 and 0.15")
        if not 0 <= self.trials <= 10_000:
            raise _bad("trials", self.trials, "use 0 (no tuning) or a positive number of Optuna trials")
        if self.weights and self.init_from:
            raise _bad("weights", self.weights, "give either weights or init_from, not both")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"train config: unknown key(s) {', '.join(unknown)}", key=unknown[0])
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"train config: {exc}") from exc
