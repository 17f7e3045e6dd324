"""core.sampling: ``SampleSelector.offer_one`` (the agent's per-inference call, scalars) decides, captures and keeps
exactly what ``offer`` does for a batch of one (issue 12 §3)."""

from __future__ import annotations

import numpy as np

from core.sampling import SampleSelector


def _selector() -> SampleSelector:
    t = iter(np.arange(0.0, 1e6, 0.05))  # a clock: the rate limit refills as the stream goes
    return SampleSelector("dev", "1", low_confidence=0.5, drift_threshold=2.0, rate=2.0, burst=3, reservoir_size=6,
                          seed=4, clock=lambda: float(next(t)), wall_clock=lambda: 1.0)


def test_offer_one_is_offer_of_one() -> None:
    rng = np.random.default_rng(0)
    a, b = _selector(), _selector()
    got_a, got_b = [], []
    for _ in range(400):
        img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        pred, conf, score = int(rng.integers(0, 10)), float(rng.uniform()), float(rng.exponential())
        got_a += a.offer([img], np.array([pred]), np.array([conf]), np.array([score]))
        got_b += b.offer_one(img, pred, conf, score)
    reservoir_a, reservoir_b = a.take_reservoir(), b.take_reservoir()
    assert len(got_a) == len(got_b) > 10 and a.dropped == b.dropped > 0 and len(reservoir_a) == len(reservoir_b) == 6
    for x, y in zip(got_a + reservoir_a, got_b + reservoir_b, strict=True):
        assert (x.reason, x.prediction, x.confidence, x.drift_score) == (y.reason, y.prediction, y.confidence, y.drift_score)
        assert np.array_equal(x.image, y.image)
