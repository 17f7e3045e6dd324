"""core.drift_domains.serving_baseline: the agent keeps the class kernel's diagonal only (issue 12 §5, resident
memory), and every window's report is the one the full baseline gives."""

from __future__ import annotations

import numpy as np
import pytest

from core.drift import DriftMonitor, calibrate
from core.drift_domains import serving_baseline
from tests.core.test_drift_features import _classes

W = 25


@pytest.fixture(scope="module")
def baseline():
    rng = np.random.default_rng(5)
    return calibrate(_classes(rng, 300), _classes(rng, 300), windows=(W,), n_boot=400, seed=0)


def test_the_served_kernel_is_the_diagonal_in_a_few_bytes(baseline) -> None:
    full = baseline.class_kernel
    slim = serving_baseline(baseline).class_kernel
    assert full is not None and full.ndim == 2
    assert slim.shape == full.shape and np.array_equal(np.diag(slim), np.diag(full))
    assert slim.strides == (2 * full.itemsize, 0)  # a row per class holds one number: 2K numbers, not K x K
    assert not slim.flags.writeable
    again = serving_baseline(serving_baseline(baseline)).class_kernel
    assert again.strides == slim.strides and np.array_equal(np.diag(again), np.diag(full))


@pytest.mark.parametrize("shift", [0.0, 2.5])
def test_reports_are_the_full_baselines(baseline, shift: float) -> None:
    feats = _classes(np.random.default_rng(7), W * 12, shift=shift)
    full = DriftMonitor(baseline, window=W).update(feats)
    slim = DriftMonitor(serving_baseline(baseline), window=W).update(feats)
    assert len(full) == len(slim) == 12
    assert [r.to_dict() for r in full] == [r.to_dict() for r in slim]
