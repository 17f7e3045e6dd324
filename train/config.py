"""``TrainConfig``: one frozen, validated, JSON-round-tripping config per training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.configfile import check, from_mapping, invalid, knob, load_file, supported_schema
from core.configwrite import to_dict

from .models import MODELS

__all__ = ["TRAIN_CONFIG_SCHEMA_VERSION", "TrainConfig", "DEFAULT_EPOCHS"]

TRAIN_CONFIG_SCHEMA_VERSION = 1
# Measured on 2 cores: tiny-cnn reaches >= 97% test accuracy on digits well within this.
DEFAULT_EPOCHS = {"tiny-cnn": 30, "mobilenet_v3_small": 30, "mobilenet_v2": 20, "resnet18": 15}


def _model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def _path_text(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


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

    dataset: str | None = knob(None, nonempty=True, hint="use 'digits' or an image folder")
    model: str | None = knob(None, check=_model)
    image_size: int | None = knob(None, ge=8, le=512)
    channels: Literal[1, 3] | None = None
    epochs: int | None = knob(None, ge=1, le=10_000)
    lr: float = knob(3e-3, gt=0, lt=1, hint="use e.g. 3e-3")
    weight_decay: float = knob(1e-4, ge=0, lt=1, hint="use e.g. 1e-4")
    batch_size: int = knob(64, ge=1, le=4096)
    seed: int = 0
    patience: int = knob(8, ge=1)
    dropout: float = knob(0.2, ge=0, lt=1)
    width: float = knob(1.0, ge=0.1, le=4)
    augment: bool = True
    warmup_epochs: float = knob(1.0, ge=0)
    weights: str | None = None
    freeze_backbone: bool = False
    init_from: str | None = None
    out_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = knob(None, ge=1)
    val_fraction: float = knob(0.15, gt=0, lt=1)
    test_fraction: float = knob(0.15, gt=0, lt=1)
    trials: int = knob(0, ge=0, le=10_000, hint="use 0 (no tuning) or a positive number of Optuna trials")
    schema_version: int = knob(TRAIN_CONFIG_SCHEMA_VERSION, check=supported_schema(TRAIN_CONFIG_SCHEMA_VERSION))

    def __post_init__(self) -> None:
        for key in ("dataset", "weights", "init_from", "out_dir"):  # paths given as Path objects are kept as text
            object.__setattr__(self, key, _path_text(getattr(self, key)))
        check(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise invalid("val_fraction", f"val_fraction + test_fraction must be < 1, got "
                                          f"{self.val_fraction} + {self.test_fraction}", hint="use e.g. 0.15 and 0.15")
        if self.weights and self.init_from:
            raise invalid("weights", "give either weights or init_from, not both")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<train config>") -> TrainConfig:
        """Build from parsed JSON/TOML (``params.json``'s ``config``); unknown keys are refused."""
        return from_mapping(cls, d, source=source)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a training config file (JSON, or TOML for ``*.toml``)."""
        return load_file(cls, path)
