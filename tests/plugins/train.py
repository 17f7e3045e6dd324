"""Session fixtures: models trained once per test session (loaded from conftest as a plugin).

``digits_run`` is the run directory of tiny-cnn trained on digits for a few epochs
(deterministic: seed 0, 1 thread, which also keeps it fast on a busy shared machine; test accuracy ~0.97).  Export,
agent and fleet tests reuse it; treat it as read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

DIGITS_RUN_EPOCHS = 8


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of tiny-cnn on digits at 32x32 (params.json, metrics.json, checkpoint.pt, split.json...)."""
    from train.api import TrainConfig, train_run

    out = tmp_path_factory.mktemp("train-runs")
    config = TrainConfig(dataset="digits", model="tiny-cnn", image_size=32, epochs=DIGITS_RUN_EPOCHS, seed=0,
                         threads=1, patience=DIGITS_RUN_EPOCHS, out_dir=str(out), run_name="digits-tiny-cnn")
    return train_run(config)


@pytest.fixture(scope="session")
def digits_loaded(digits_run: Path) -> Any:
    """``train.api.load_run(digits_run)``: model in eval mode, labels, preprocessing, arrays()."""
    from train.api import load_run

    return load_run(digits_run)
